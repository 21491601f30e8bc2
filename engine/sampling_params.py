"""SamplingParams: how one request chooses its tokens and when it stops, validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from engine.errors import InvalidRequestError

MAX_LOGPROBS = 20  # OpenAI caps top_logprobs at 20
MAX_N = 16


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling and stopping; names and meanings follow the OpenAI and vLLM APIs.

    temperature == 0 means greedy. top_k <= 0 (or -1) disables top-k. max_tokens None means
    "up to the context limit". logprobs None means none; k >= 0 means the sampled token's
    logprob plus the top k alternatives.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # filled by the engine from the generation config, not by users
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        # accept a str or list for stop, a list for stop_token_ids: store immutable tuples
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def with_eos(self, eos_token_ids: tuple[int, ...]) -> SamplingParams:
        return replace(self, eos_token_ids=tuple(eos_token_ids))

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise InvalidRequestError naming the first bad field; return self for chaining."""
        _check(1 <= self.n <= MAX_N, f"n must be between 1 and {MAX_N}, got {self.n}", "n")
        _check(0.0 <= self.temperature <= 2.0 + 1e-9,
               f"temperature must be between 0 and 2, got {self.temperature}", "temperature")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        _check(self.top_k == -1 or self.top_k >= 0,
               f"top_k must be -1 (disabled) or >= 0, got {self.top_k}", "top_k")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        _check(self.repetition_penalty > 0.0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty}",
               "repetition_penalty")
        _check(-2.0 <= self.presence_penalty <= 2.0,
               f"presence_penalty must be between -2 and 2, got {self.presence_penalty}",
               "presence_penalty")
        _check(-2.0 <= self.frequency_penalty <= 2.0,
               f"frequency_penalty must be between -2 and 2, got {self.frequency_penalty}",
               "frequency_penalty")
        _check(self.max_tokens is None or self.max_tokens >= 1,
               f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        _check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}",
               "min_tokens")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
               "min_tokens")
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
               f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}", "logprobs")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop must be non-empty strings", "stop")
        _check(len(self.stop) <= 16, "at most 16 stop strings are allowed", "stop")
        self._validate_token_ids(vocab_size)
        return self

    def _validate_token_ids(self, vocab_size: int | None) -> None:
        for token_id, bias in (self.logit_bias or {}).items():
            _check(-100.0 <= bias <= 100.0,
                   f"logit_bias values must be between -100 and 100, got {bias}", "logit_bias")
            _check(_in_vocab(token_id, vocab_size),
                   f"logit_bias token id {token_id} is out of vocabulary", "logit_bias")
        for token_id in self.stop_token_ids:
            _check(_in_vocab(token_id, vocab_size),
                   f"stop_token_ids entry {token_id} is out of vocabulary", "stop_token_ids")


def _in_vocab(token_id: int, vocab_size: int | None) -> bool:
    return token_id >= 0 and (vocab_size is None or token_id < vocab_size)


def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise InvalidRequestError(message, param=param)

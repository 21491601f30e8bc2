"""SamplingParams: how one request chooses its tokens and when it stops, validated up front."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from engine.errors import InvalidRequestError
from engine.outputs import RequestOutputKind
from engine.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20  # OpenAI caps top_logprobs at 20
MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024  # a stop string longer than any sane completion is a mistake
MAX_TOKEN_ID_LIST = 1024  # entries in stop_token_ids and in logit_bias
MAX_BAD_WORDS = 256
MAX_BAD_WORD_CHARS = 1024
# a seed is an int64, as in OpenAI's API; sibling i of n seeds its torch.Generator with
# seed + i, which the generator's 64-bit range [-2**63, 2**64) always holds
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
# below this a temperature is greedy (as in vLLM): dividing logits by it would overflow
GREEDY_TEMPERATURE = 1e-5
# the repetition penalty multiplies or divides logits; outside this range fp32 overflows
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_TOKENS_LIMIT = 2**31 - 1  # counts the engine keeps in int32-sized tensors
# fields a checkpoint's generation_config.json may default when a request leaves them out
GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling and stopping; names and meanings follow the OpenAI and vLLM APIs.

    temperature below GREEDY_TEMPERATURE (0 included) means greedy. top_k <= 0 (or -1)
    disables top-k. max_tokens None means "up to the context limit". logprobs None means
    none; k >= 0 means the sampled token's logprob plus the top k alternatives; prompt_logprobs
    likewise for every prompt token after the first. allowed_token_ids restricts every step to
    those tokens; bad_words bans each word (all its tokens in a row) from the output.
    truncate_prompt_tokens keeps only the prompt's last k tokens. structured_outputs constrains
    the output to a JSON schema, regex, choice or grammar (engine/structured/).
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
    prompt_logprobs: int | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    truncate_prompt_tokens: int | None = None
    cache_salt: str | None = None  # prefix-cache hits only between requests with this salt
    structured_outputs: StructuredOutputsParams | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = False
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # filled by the engine from the generation config, not by users
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)
    # bad_words as token id sequences (each word with and without a leading space)
    bad_words_token_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        # accept a str or list for stop, a list for stop_token_ids: store immutable tuples
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        else:
            object.__setattr__(self, "bad_words", tuple(self.bad_words))
        object.__setattr__(self, "bad_words_token_ids",
                           tuple(tuple(ids) for ids in self.bad_words_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy, with nothing that changes the logits before the argmax or reads them after
        it (penalties, logit bias, allowed or banned tokens, min_tokens, a grammar, logprobs):
        the sampler's one argmax, whatever the output so far."""
        return (self.is_greedy and not self.needs_penalties
                and not self.logit_bias and self.allowed_token_ids is None
                and not self.bad_words_token_ids and self.min_tokens == 0
                and self.structured_outputs is None and self.logprobs is None)

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
        """Raise InvalidRequestError naming the first bad field; return self for chaining.
        Everything the engine later does with these values (tensors, generators, sampling
        arithmetic) is safe for whatever passes here: types, finiteness and ranges."""
        _int_in(self.n, "n", 1, MAX_N)
        _float_in(self.temperature, "temperature", 0.0, 2.0 + 1e-9)
        _float_in(self.top_p, "top_p", 0.0, 1.0, low_open=True)
        _int_in(self.top_k, "top_k", -1, None)
        _float_in(self.min_p, "min_p", 0.0, 1.0)
        _float_in(self.repetition_penalty, "repetition_penalty", MIN_REPETITION_PENALTY,
                  MAX_REPETITION_PENALTY)
        _float_in(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        _float_in(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        if self.seed is not None:
            _int_in(self.seed, "seed", MIN_SEED, MAX_SEED)
        if self.max_tokens is not None:
            _int_in(self.max_tokens, "max_tokens", 1, MAX_TOKENS_LIMIT)
        _int_in(self.min_tokens, "min_tokens", 0, MAX_TOKENS_LIMIT)
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
               "min_tokens")
        if self.logprobs is not None:
            _int_in(self.logprobs, "logprobs", 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _int_in(self.prompt_logprobs, "prompt_logprobs", 0, MAX_LOGPROBS)
        if self.truncate_prompt_tokens is not None:
            _int_in(self.truncate_prompt_tokens, "truncate_prompt_tokens", 1, MAX_TOKENS_LIMIT)
        self._validate_stop()
        self._validate_bad_words()
        _check(self.cache_salt is None or (isinstance(self.cache_salt, str) and
                                           0 < len(self.cache_salt) <= MAX_STOP_STRING_CHARS),
               f"cache_salt must be a non-empty string of at most {MAX_STOP_STRING_CHARS} "
               "characters", "cache_salt")
        self._validate_token_ids(vocab_size)
        if self.structured_outputs is not None:
            self.structured_outputs.validate()
            # the grammar decides which tokens may come; a second say could ban all of them
            # mid-answer, where only a failure (not a 400) could report it
            for param, value in (("allowed_token_ids", self.allowed_token_ids),
                                 ("bad_words", self.bad_words)):
                _check(not value, f"{param} cannot be combined with {self.structured_outputs.param}"
                       ": the constraint decides which tokens may come", param)
        return self

    def _validate_stop(self) -> None:
        _check(len(self.stop) <= MAX_STOP_STRINGS,
               f"at most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
        for stop in self.stop:
            _check(isinstance(stop, str) and 0 < len(stop) <= MAX_STOP_STRING_CHARS,
                   f"stop must be non-empty strings of at most {MAX_STOP_STRING_CHARS} "
                   "characters", "stop")
            _check(_is_encodable(stop), "stop strings must be valid Unicode (no lone "
                   "surrogates)", "stop")

    def _validate_bad_words(self) -> None:
        _check(len(self.bad_words) <= MAX_BAD_WORDS,
               f"at most {MAX_BAD_WORDS} bad words are allowed", "bad_words")
        for word in self.bad_words:
            _check(isinstance(word, str) and len(word.strip()) > 0 and
                   len(word) <= MAX_BAD_WORD_CHARS and _is_encodable(word),
                   f"bad_words must be non-blank strings of at most {MAX_BAD_WORD_CHARS} "
                   "characters", "bad_words")

    def _validate_token_ids(self, vocab_size: int | None) -> None:
        bias = self.logit_bias or {}
        _check(isinstance(bias, dict) and len(bias) <= MAX_TOKEN_ID_LIST,
               f"logit_bias may hold at most {MAX_TOKEN_ID_LIST} entries", "logit_bias")
        for token_id, value in bias.items():
            _float_in(value, "logit_bias", -100.0, 100.0)
            _check(_is_token_id(token_id, vocab_size),
                   f"logit_bias token id {token_id} is out of vocabulary", "logit_bias")
        _check(len(self.stop_token_ids) <= MAX_TOKEN_ID_LIST,
               f"stop_token_ids may hold at most {MAX_TOKEN_ID_LIST} entries", "stop_token_ids")
        for token_id in self.stop_token_ids:
            _check(_is_token_id(token_id, vocab_size),
                   f"stop_token_ids entry {token_id} is out of vocabulary", "stop_token_ids")
        if self.allowed_token_ids is not None:
            _check(len(self.allowed_token_ids) > 0, "allowed_token_ids must not be empty",
                   "allowed_token_ids")
            for token_id in self.allowed_token_ids:
                _check(_is_token_id(token_id, vocab_size),
                       f"allowed_token_ids entry {token_id} is out of vocabulary",
                       "allowed_token_ids")


def _is_token_id(token_id: object, vocab_size: int | None) -> bool:
    return (isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0
            and (vocab_size is None or token_id < vocab_size))


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _int_in(value: object, param: str, low: int, high: int | None) -> None:
    """An int (not a bool) in [low, high]; high None: no upper bound."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    _check(is_int, f"{param} must be an integer, got {value!r}", param)
    assert isinstance(value, int)
    bounds = f">= {low}" if high is None else f"between {low} and {high}"
    _check(value >= low and (high is None or value <= high),
           f"{param} must be {bounds}, got {value}", param)


def _float_in(value: object, param: str, low: float, high: float,
              low_open: bool = False) -> None:
    """A finite number in [low, high] ((low, high] with low_open)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    _check(is_number and math.isfinite(value),  # type: ignore[arg-type]
           f"{param} must be a finite number, got {value!r}", param)
    assert isinstance(value, (int, float))
    above = value > low if low_open else value >= low
    _check(above and value <= high, f"{param} must be in {'(' if low_open else '['}{low:g}, "
           f"{high:g}], got {value:g}", param)


def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise InvalidRequestError(message, param=param)

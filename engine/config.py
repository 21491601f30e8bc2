"""Engine configuration: frozen dataclasses for the model, the KV cache and the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from engine.errors import InvalidRequestError
from engine.kv_cache.hashing import HASH_ALGORITHMS

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("int8", "w8a8", "int4")
# "auto": Triton kernels on CUDA when Triton imports, else the torch reference; "torch":
# always the reference; "triton": the kernels or an error (on CPU only under TRITON_INTERPRET=1)
ATTENTION_BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which checkpoint to load and how. `model` is a directory, a .gguf file, a hub id, or
    None for the embedded default model."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quantization: str | None = None  # "int8"/"w8a8"/"int4": int weights on CPU
    attention_backend: str | None = None  # None: $PAGEDSERVE_ATTENTION_BACKEND, else "auto"
    enforce_eager: bool = False  # CUDA: no decode graphs
    max_model_len: int | None = None
    # seeds the one generator of the sampled rows that bring no seed of their own: the same
    # seed answers the same requests (in the same order) the same; None: fresh each start
    seed: int | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def validate(self) -> ModelConfig:
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        _check(self.quantization is None or self.quantization in QUANTIZATIONS,
               f"quantization must be one of {QUANTIZATIONS} or None, got {self.quantization!r}")
        _check(self.quantization is None or self.device != "cuda",
               f"quantization {self.quantization!r} runs on CPU only")
        _check(self.attention_backend is None or self.attention_backend in ATTENTION_BACKENDS,
               f"attention_backend must be one of {ATTENTION_BACKENDS}, got "
               f"{self.attention_backend!r}")
        _check(self.max_model_len is None or self.max_model_len >= 1,
               f"max_model_len must be >= 1, got {self.max_model_len}")
        # torch.Generator.manual_seed takes [-2**63, 2**64)
        _check(self.seed is None or -(2**63) <= self.seed < 2**64,
               f"seed must be in [-2**63, 2**64), got {self.seed}")
        return self


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache. The pool is sized from a memory budget unless num_blocks is given."""

    block_size: int = 16
    kv_cache_memory_gb: float = 2.0  # CPU budget for K and V of all layers
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory for weights + activations + KV
    num_blocks: int | None = None  # explicit pool size; overrides the memory budgets (tests)
    enable_prefix_caching: bool = True
    # what chains the prefix-cache block hashes: sha256, or xxhash (faster, not
    # cryptographic: only where every client is trusted; needs the xxhash package)
    prefix_caching_hash_algo: str = "sha256"

    def validate(self) -> CacheConfig:
        _check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128),
               f"block_size must be a power of two up to 128, got {self.block_size}")
        _check(self.kv_cache_memory_gb > 0, "kv_cache_memory_gb must be > 0")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               "gpu_memory_utilization must be in (0, 1]")
        _check(self.num_blocks is None or self.num_blocks >= 2,
               "num_blocks must be >= 2 (block 0 is reserved as the null block)")
        _check(self.prefix_caching_hash_algo in HASH_ALGORITHMS,
               f"prefix_caching_hash_algo must be one of {HASH_ALGORITHMS}, got "
               f"{self.prefix_caching_hash_algo!r}")
        return self


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous batching limits: sequences per step, tokens per step, waiting queue length."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_queue_len: int | None = None  # None: unbounded waiting queue
    # While other sequences decode, a step computes at most this many prompt tokens, counted
    # as tokens at context 0 (a token after c others costs 1 + c / the model's attention
    # break-even context), so a long prompt is prefilled in chunks that keep every running
    # stream's inter-token gap about the same from its first chunk to its last; and while
    # requests wait, a long prompt leaves them half of it (or of the budget) so they start.
    # None: prompts take whatever the token budget leaves.
    prefill_tokens_while_decoding: int | None = None

    def validate(self) -> SchedulerConfig:
        _check(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _check(self.prefill_tokens_while_decoding is None
               or self.prefill_tokens_while_decoding >= 1,
               "prefill_tokens_while_decoding must be >= 1")
        _check(self.max_queue_len is None or self.max_queue_len >= 0,
               "max_queue_len must be >= 0")
        return self


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """Several processes for one model (engine/distributed/): tensor parallel ranks split each
    layer, pipeline stages split the layer stack; world size = TP x PP. The engine spawns the
    other ranks itself, or joins a world `torchrun` started (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT in the environment)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE: whole experts per rank instead of split ones
    # how long a collective waits for a peer before the group is declared broken (a hung
    # worker); idle workers wait for the next step without limit
    distributed_timeout_s: float = 60.0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def validate(self) -> ParallelConfig:
        _check(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
               f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size!r}")
        _check(isinstance(self.pipeline_parallel_size, int) and self.pipeline_parallel_size >= 1,
               f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size!r}")
        _check(self.distributed_timeout_s > 0, "distributed_timeout_s must be > 0")
        return self


SPECULATIVE_METHODS = ("ngram", "draft_model")
_SPECULATIVE_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_min",
                     "prompt_lookup_max", "disable_by_batch_size", "adaptive")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding, in vLLM's terms: `{"method": "ngram", "num_speculative_tokens":
    5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}`, or `{"model": DIR,
    "num_speculative_tokens": 4}` for a draft model. Speculation pauses while more than
    `disable_by_batch_size` sequences run (None: never). `adaptive` sizes each sequence's
    proposals to its recent acceptance (engine/spec_decode/policy.py); off, every decoding
    sequence verifies the full count whenever the proposer has them."""

    method: str = "ngram"
    model: str | None = None  # the draft model (method "draft_model")
    num_speculative_tokens: int = 5
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    disable_by_batch_size: int | None = 4
    adaptive: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> SpeculativeConfig:
        """From the --speculative-config object: a `model` without a method means a draft
        model; unknown keys are an error."""
        unknown = sorted(set(values) - set(_SPECULATIVE_KEYS))
        _check(not unknown, f"speculative config: unknown keys {unknown}; known: "
               f"{list(_SPECULATIVE_KEYS)}")
        values = dict(values)
        if "method" not in values and values.get("model") is not None:
            values["method"] = "draft_model"
        return cls(**values).validate()  # type: ignore[arg-type]

    def validate(self) -> SpeculativeConfig:
        _check(self.method in SPECULATIVE_METHODS,
               f"speculative config: method must be one of {SPECULATIVE_METHODS}, got "
               f"{self.method!r}")
        _check((self.model is not None) == (self.method == "draft_model"),
               "speculative config: a draft model needs `model` (a directory), and only it")
        _check(isinstance(self.num_speculative_tokens, int)
               and 1 <= self.num_speculative_tokens <= 16,
               "speculative config: num_speculative_tokens must be in [1, 16], got "
               f"{self.num_speculative_tokens!r}")
        _check(isinstance(self.prompt_lookup_min, int) and isinstance(self.prompt_lookup_max, int)
               and 1 <= self.prompt_lookup_min <= self.prompt_lookup_max,
               "speculative config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
               f"{self.prompt_lookup_min!r} and {self.prompt_lookup_max!r}")
        _check(self.disable_by_batch_size is None or (
               isinstance(self.disable_by_batch_size, int) and self.disable_by_batch_size >= 1),
               "speculative config: disable_by_batch_size must be >= 1 or null, got "
               f"{self.disable_by_batch_size!r}")
        _check(isinstance(self.adaptive, bool),
               f"speculative config: adaptive must be true or false, got {self.adaptive!r}")
        return self


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **engine_args: object) -> EngineConfig:
        """Build from flat engine args (`block_size=16, dtype="float32", ...`), as LLM() and
        the CLI take them. Unknown names are an error, not silently ignored.
        `speculative_config` takes the --speculative-config object (a dict) or None."""
        speculative = engine_args.pop("speculative_config", None)
        if speculative is not None and not isinstance(speculative, (dict, SpeculativeConfig)):
            raise InvalidRequestError("speculative_config must be an object, got "
                                      f"{type(speculative).__name__}", param="speculative_config")
        parts: dict[str, dict[str, object]] = {"model": {"model": model}, "cache": {},
                                               "scheduler": {}, "parallel": {}}
        owners = {f.name: part for part, klass in _PARTS.items() for f in fields(klass)}
        for name, value in engine_args.items():
            if name not in owners:
                raise InvalidRequestError(f"unknown engine argument {name!r}", param=name)
            parts[owners[name]][name] = value
        config = cls(model=ModelConfig(**parts["model"]),  # type: ignore[arg-type]
                     cache=CacheConfig(**parts["cache"]),  # type: ignore[arg-type]
                     scheduler=SchedulerConfig(**parts["scheduler"]),  # type: ignore[arg-type]
                     parallel=ParallelConfig(**parts["parallel"]),  # type: ignore[arg-type]
                     speculative=(SpeculativeConfig.from_dict(speculative)
                                  if isinstance(speculative, dict) else speculative))
        return config.validate()

    def validate(self) -> EngineConfig:
        self.model.validate()
        self.cache.validate()
        self.scheduler.validate()
        self.parallel.validate()
        if self.speculative is not None:
            self.speculative.validate()
        return self


_PARTS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
          "parallel": ParallelConfig}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)

"""Engine configuration: frozen dataclasses for the model, the KV cache and the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from engine.errors import InvalidRequestError
from engine.kv_cache.hashing import HASH_ALGORITHMS

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("int8",)
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
    quantization: str | None = None  # "int8": weight-only int8 matmuls on CPU
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

    def validate(self) -> SchedulerConfig:
        _check(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        _check(self.max_queue_len is None or self.max_queue_len >= 0,
               "max_queue_len must be >= 0")
        return self


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_kwargs(cls, model: str | None = None, **engine_args: object) -> EngineConfig:
        """Build from flat engine args (`block_size=16, dtype="float32", ...`), as LLM() and
        the CLI take them. Unknown names are an error, not silently ignored."""
        parts: dict[str, dict[str, object]] = {"model": {"model": model}, "cache": {},
                                               "scheduler": {}}
        owners = {f.name: part for part, klass in _PARTS.items() for f in fields(klass)}
        for name, value in engine_args.items():
            if name not in owners:
                raise InvalidRequestError(f"unknown engine argument {name!r}", param=name)
            parts[owners[name]][name] = value
        config = cls(model=ModelConfig(**parts["model"]),  # type: ignore[arg-type]
                     cache=CacheConfig(**parts["cache"]),  # type: ignore[arg-type]
                     scheduler=SchedulerConfig(**parts["scheduler"]))  # type: ignore[arg-type]
        return config.validate()

    def validate(self) -> EngineConfig:
        self.model.validate()
        self.cache.validate()
        self.scheduler.validate()
        return self


_PARTS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)

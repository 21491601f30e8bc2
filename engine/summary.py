"""What the engine resolved at start-up (dtype, KV pool, kernels, speculation), as plain data:
the server's ready line reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.attention.torch_ref import native_prefill_serves
from engine.kernels.native import native_library, unsupported_reason
from engine.layers.linear import Linear
from engine.models import kv_cache_spec
from engine.models.llama import LlamaModel

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

# by class name: importing the CUDA backend's module would import Triton
_ATTENTION_NAMES = {"TorchAttentionBackend": "torch", "CudaAttentionBackend": "Triton"}


@dataclass(frozen=True, slots=True)
class EngineSummary:
    """The running engine in a few words and numbers."""

    dtype: str
    device: str
    quantization: str | None
    block_size: int
    num_blocks: int  # usable KV blocks (the null block excluded)
    max_model_len: int
    kernels: str  # which implementations run the model's hot paths
    attention_backend: str
    speculative: str | None  # None: off
    parallel: str | None = None  # the group's shape, None: one process

    @property
    def num_kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_max_len_sequences(self) -> int:
        """How many sequences of max_model_len tokens the KV pool holds at once."""
        return self.num_blocks // -(-self.max_model_len // self.block_size)


def summarize(engine: LLMEngine) -> EngineSummary:
    config, loaded = engine.config, engine.loaded
    backend = loaded.model.attn_backend
    backend_name = type(backend).__name__
    return EngineSummary(
        dtype=str(loaded.dtype).removeprefix("torch."), device=str(loaded.device),
        quantization=config.model.quantization, block_size=config.cache.block_size,
        num_blocks=engine.stats().num_total_blocks, max_model_len=engine.max_model_len,
        kernels=_kernels(engine), attention_backend=_ATTENTION_NAMES.get(backend_name,
                                                                         backend_name),
        speculative=_speculative(engine), parallel=_parallel(engine))


def _kernels(engine: LLMEngine) -> str:
    loaded = engine.loaded
    if loaded.device.type == "cuda":
        graphs = engine.core.runner.decode_graphs
        captured = graphs is not None and graphs.capture_enabled
        return f"torch on CUDA, decode {'in CUDA graphs' if captured else 'eager'}"
    parts: list[str] = []
    # native_library() is cached: the loader built (or gave up on) it for these two cases
    quantization = engine.config.model.quantization
    if quantization in ("int8", "w8a8"):
        prefill = "int8 activations" if quantization == "w8a8" else "bf16 activations"
        parts.append(f"int8 matmuls on the native VNNI kernels (prefill: {prefill})"
                     if native_library() is not None
                     else "int8 matmuls on the torch fallback (slow)")
    if loaded.dtype == torch.bfloat16:
        head_dim = kv_cache_spec(loaded.hf_config, loaded.parallel).head_dim
        prefill_attention = (", paged prefill attention (AVX512-BF16)"
                             if native_prefill_serves(head_dim) else "")
        parts.append(f"native CPU kernels (RMSNorm, SwiGLU, paged decode attention"
                     f"{prefill_attention})" if native_library() is not None
                     else f"torch fallbacks ({unsupported_reason() or 'native build failed'})")
        if any(isinstance(m, Linear) and m.packed_weight is not None
               for m in loaded.model.modules()):
            parts.append("oneDNN prepacked matmuls")
        decoder = getattr(loaded.model, "model", None)
        stack = decoder.native_stack() if isinstance(decoder, LlamaModel) else None
        if stack is not None:
            parts.append("decode steps with no Python between a layer's matmuls" if stack.bf16
                         else "decode steps through the quantized layers in one native call")
    else:
        parts.append("torch (the native CPU kernels take bfloat16 only)")
    return ", ".join(parts)


def _parallel(engine: LLMEngine) -> str | None:
    parallel = engine.loaded.parallel
    if parallel.world_size == 1:
        return None
    backend = "NCCL" if engine.loaded.device.type == "cuda" else "gloo"
    expert = ", expert parallel" if parallel.expert_parallel else ""
    return (f"tensor parallel {parallel.tp_size} x pipeline parallel {parallel.pp_size} over "
            f"{backend}{expert}")


def _speculative(engine: LLMEngine) -> str | None:
    spec = engine.config.speculative
    if spec is None:
        return None
    source = f"draft model {spec.model}" if spec.model is not None else spec.method
    return f"{source}, up to {spec.num_speculative_tokens} tokens"

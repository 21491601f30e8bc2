"""The model registry: HF architecture name -> our decoder class, and the KV cache shape."""

from __future__ import annotations

import transformers

from engine.distributed.parallel import SINGLE, Parallel
from engine.errors import UnsupportedModelError
from engine.models.base import CausalLM, KVCacheSpec
from engine.models.gpt2 import GPT2LMHeadModel
from engine.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from engine.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

_MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_MODEL_CLASSES)

__all__ = ["SUPPORTED_ARCHITECTURES", "CausalLM", "KVCacheSpec", "attention_break_even_context",
           "get_model_class", "kv_cache_spec"]


def get_model_class(hf_config: transformers.PretrainedConfig) -> type[CausalLM]:
    """The class for `hf_config.architectures[0]`; UnsupportedModelError names the ones we
    support otherwise."""
    architectures = getattr(hf_config, "architectures", None) or []
    name = architectures[0] if architectures else None
    if name not in _MODEL_CLASSES:
        found = f"architecture {name!r}" if name else "no architecture in config.json"
        raise UnsupportedModelError(
            f"unsupported model: {found}; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return _MODEL_CLASSES[name]


def kv_cache_spec(hf_config: transformers.PretrainedConfig,
                  parallel: Parallel = SINGLE) -> KVCacheSpec:
    """Layers, KV heads and head size of the KV cache this rank's part of the model needs
    (its pipeline stage's layers, its KV heads)."""
    return get_model_class(hf_config).kv_cache_spec(hf_config, parallel)


def attention_break_even_context(hf_config: transformers.PretrainedConfig) -> float:
    """The context length at which a token's attention (q.k and p.v over the context) costs
    as many multiply-adds as its linear layers, from the config alone: the scheduler's
    estimate of how much dearer a prompt token gets as its context grows."""
    hidden = int(hf_config.hidden_size)
    heads = int(hf_config.num_attention_heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    experts_per_token = getattr(hf_config, "num_experts_per_tok", None)
    expert_size = getattr(hf_config, "moe_intermediate_size", None)
    if experts_per_token and expert_size:  # Qwen MoE: routed experts plus any shared one
        intermediate = (int(experts_per_token) * int(expert_size)
                        + int(getattr(hf_config, "shared_expert_intermediate_size", 0) or 0))
    else:  # dense, or Mixtral (whose experts are intermediate_size wide)
        intermediate = int(getattr(hf_config, "intermediate_size", None)
                           or getattr(hf_config, "n_inner", None) or 4 * hidden)
        intermediate *= int(experts_per_token or 1)
    mlp_matrices = 2 if hf_config.model_type == "gpt2" else 3  # GELU MLP, or gated SwiGLU
    linear = hidden * head_dim * (2 * heads + 2 * kv_heads) + mlp_matrices * hidden * intermediate
    return linear / (2 * heads * head_dim)

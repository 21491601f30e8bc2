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

__all__ = ["SUPPORTED_ARCHITECTURES", "CausalLM", "KVCacheSpec", "get_model_class",
           "kv_cache_spec"]


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

"""GPT-2: learned position embeddings, pre-LayerNorm blocks, GELU MLP, tied LM head."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import transformers
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.errors import UnsupportedModelError
from engine.layers.activation import get_gelu
from engine.layers.linear import Linear
from engine.layers.norm import LayerNorm
from engine.models.base import CausalLM, KVCaches, KVCacheSpec, WeightTarget

# Checkpoint buffers that are not weights: the causal mask and its fill value.
_SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# GPT-2 stores these as Conv1D, i.e. [in_features, out_features]; nn.Linear wants the transpose.
_CONV1D_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def attention_scale(hf_config: transformers.PretrainedConfig, layer_idx: int) -> float:
    """1/sqrt(head_dim) unless scale_attn_weights is off, further divided by layer_idx + 1
    when scale_attn_by_inverse_layer_idx is on (as transformers does)."""
    head_dim = hf_config.n_embd // hf_config.n_head
    scale = head_dim**-0.5 if getattr(hf_config, "scale_attn_weights", True) else 1.0
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer_idx + 1)
    return scale


class GPT2Attention(nn.Module):
    def __init__(self, hf_config: transformers.PretrainedConfig, layer_idx: int,
                 attn_backend: AttentionBackend) -> None:
        super().__init__()
        hidden = hf_config.n_embd
        self.num_heads = hf_config.n_head
        self.head_dim = hidden // self.num_heads
        self.scale = attention_scale(hf_config, layer_idx)
        self.attn_backend = attn_backend
        self.c_attn = Linear(hidden, 3 * hidden)  # fused q, k, v in the checkpoint already
        self.c_proj = Linear(hidden, hidden)

    def forward(self, hidden_states: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.c_attn(hidden_states).view(-1, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(1)  # each [num_tokens, num_heads, head_dim]
        out = self.attn_backend.forward(q, k, v, kv_cache[0], kv_cache[1], metadata, self.scale)
        return self.c_proj(out.reshape(-1, self.num_heads * self.head_dim))


class GPT2MLP(nn.Module):
    def __init__(self, hf_config: transformers.PretrainedConfig) -> None:
        super().__init__()
        inner = getattr(hf_config, "n_inner", None) or 4 * hf_config.n_embd
        self.c_fc = Linear(hf_config.n_embd, inner)
        self.act = get_gelu(hf_config.activation_function)
        self.c_proj = Linear(inner, hf_config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, hf_config: transformers.PretrainedConfig, layer_idx: int,
                 attn_backend: AttentionBackend) -> None:
        super().__init__()
        eps = hf_config.layer_norm_epsilon
        self.ln_1 = LayerNorm(hf_config.n_embd, eps=eps)
        self.attn = GPT2Attention(hf_config, layer_idx, attn_backend)
        self.ln_2 = LayerNorm(hf_config.n_embd, eps=eps)
        self.mlp = GPT2MLP(hf_config)

    def forward(self, hidden_states: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), kv_cache, metadata)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    def __init__(self, hf_config: transformers.PretrainedConfig,
                 attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.wte = nn.Embedding(hf_config.vocab_size, hf_config.n_embd)
        self.wpe = nn.Embedding(hf_config.n_positions, hf_config.n_embd)
        self.h = nn.ModuleList(GPT2Block(hf_config, i, attn_backend)
                               for i in range(hf_config.n_layer))
        self.ln_f = LayerNorm(hf_config.n_embd, eps=hf_config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = self.wte(input_ids) + self.wpe(positions)  # [num_tokens, hidden_size]
        for block, kv_cache in zip(self.h, kv_caches, strict=True):
            hidden_states = block(hidden_states, kv_cache, metadata)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(CausalLM):
    """GPT-2. scale_attn_weights and scale_attn_by_inverse_layer_idx change the attention scale
    (handled); reorder_and_upcast_attn only changes rounding in transformers' eager path, so it
    is accepted as is; cross-attention variants are rejected."""

    loads_int4_checkpoints = False  # Conv1D's transposed weights: GPTQ/AWQ layout untested

    def __init__(self, hf_config: transformers.PretrainedConfig,
                 attn_backend: AttentionBackend) -> None:
        super().__init__(hf_config, attn_backend)
        if getattr(hf_config, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention is not a decoder-only model")
        self.transformer = GPT2Model(hf_config, attn_backend)
        is_tied = getattr(hf_config, "tie_word_embeddings", True)
        self.lm_head = (None if is_tied else
                        Linear(hf_config.n_embd, hf_config.vocab_size, bias=False))

    @classmethod
    def kv_cache_spec(cls, hf_config: transformers.PretrainedConfig) -> KVCacheSpec:
        return KVCacheSpec(num_layers=hf_config.n_layer, num_kv_heads=hf_config.n_head,
                           head_dim=hf_config.n_embd // hf_config.n_head)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                metadata: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, kv_caches, metadata)

    def output_head(self) -> Linear | None:
        return self.lm_head

    def output_embedding(self) -> torch.Tensor:
        return self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights((name, _from_conv1d(name, tensor)) for name, tensor in weights)

    def map_weight_name(self, name: str) -> WeightTarget | None:
        if name.endswith(_SKIPPED_SUFFIXES) or (self.lm_head is None and name == "lm_head.weight"):
            return None
        if name.startswith("lm_head."):
            return WeightTarget(name)
        # The original OpenAI-converted checkpoints omit the "transformer." prefix.
        return WeightTarget(name if name.startswith("transformer.") else f"transformer.{name}")


def _from_conv1d(name: str, tensor: torch.Tensor) -> torch.Tensor:
    is_conv1d_weight = name.endswith(".weight") and any(f".{layer}." in f".{name}"
                                                        for layer in _CONV1D_LAYERS)
    return tensor.t() if is_conv1d_weight else tensor

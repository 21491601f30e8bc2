"""GPT-2: learned position embeddings, pre-LayerNorm blocks, GELU MLP, tied LM head."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import transformers
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.distributed.parallel import SINGLE, Parallel
from engine.errors import UnsupportedModelError
from engine.layers.activation import get_gelu
from engine.layers.linear import Linear, MergedLinear
from engine.layers.norm import LayerNorm
from engine.layers.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_head,
)
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
    """Under TP: this rank's heads; c_attn column-parallel (the checkpoint's fused q|k|v
    tensor cut per part), c_proj row-parallel."""

    def __init__(self, hf_config: transformers.PretrainedConfig, layer_idx: int,
                 attn_backend: AttentionBackend, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        hidden = hf_config.n_embd
        self.head_dim = hidden // hf_config.n_head
        first_head, self.num_heads = parallel.split(hf_config.n_head, "number of attention heads")
        self.scale = attention_scale(hf_config, layer_idx)
        self.attn_backend = attn_backend
        local = self.num_heads * self.head_dim
        rows = (first_head * self.head_dim, hidden)
        # fused q, k, v in the checkpoint already: loaded whole, cut per part
        self.c_attn = MergedLinear(hidden, {"q": local, "k": local, "v": local}, bias=True,
                                   source_rows={"q": rows, "k": rows, "v": rows})
        self.c_proj = RowParallelLinear(hidden, hidden, (rows[0], local), True, parallel)

    def forward(self, hidden_states: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                metadata: AttentionMetadata,
                output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The attention output of every row, or of `output_rows` only (the cache still gets
        every row's K/V)."""
        q, k, v = self._qkv(hidden_states)
        out = self.attn_backend.forward(q, k, v, kv_cache[0], kv_cache[1], metadata, self.scale)
        if output_rows is not None:
            out = out[output_rows]
        return self.c_proj(out.reshape(-1, self.num_heads * self.head_dim))

    def fill_cache(self, hidden_states: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                   metadata: AttentionMetadata) -> None:
        """The new tokens' K/V into the cache, without attending: no row's output is read."""
        _, k, v = self._qkv(hidden_states)
        self.attn_backend.write_cache(k, v, kv_cache[0], kv_cache[1], metadata)

    def _qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        qkv = self.c_attn(hidden_states).view(-1, 3, self.num_heads, self.head_dim)
        return qkv.unbind(1)  # each [num_tokens, num_heads, head_dim]


class GPT2MLP(nn.Module):
    def __init__(self, hf_config: transformers.PretrainedConfig,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        inner = getattr(hf_config, "n_inner", None) or 4 * hf_config.n_embd
        rows = parallel.split(inner, "inner size")
        self.c_fc = ColumnParallelLinear(hf_config.n_embd, inner, rows, bias=True)
        self.act = get_gelu(hf_config.activation_function)
        self.c_proj = RowParallelLinear(inner, hf_config.n_embd, rows, True, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, hf_config: transformers.PretrainedConfig, layer_idx: int,
                 attn_backend: AttentionBackend, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        eps = hf_config.layer_norm_epsilon
        self.ln_1 = LayerNorm(hf_config.n_embd, eps=eps)
        self.attn = GPT2Attention(hf_config, layer_idx, attn_backend, parallel)
        self.ln_2 = LayerNorm(hf_config.n_embd, eps=eps)
        self.mlp = GPT2MLP(hf_config, parallel)

    def forward(self, hidden_states: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                metadata: AttentionMetadata,
                output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Every row's output, or `output_rows`' only (the model's last block: past attention
        nothing else reads the others)."""
        normed = self.ln_1(hidden_states)
        if output_rows is not None and not len(output_rows):
            self.attn.fill_cache(normed, kv_cache, metadata)
            return hidden_states[:0]
        attn_out = self.attn(normed, kv_cache, metadata, output_rows)
        if output_rows is not None:
            hidden_states = hidden_states[output_rows]
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    """The blocks of this rank's pipeline stage (`h[i]` is global block
    `stage_layers.start + i`); the embeddings (wte vocab-parallel, wpe replicated) and ln_f
    on the first stage only."""

    def __init__(self, hf_config: transformers.PretrainedConfig,
                 attn_backend: AttentionBackend, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.parallel = parallel
        self.hidden_size = hidden = hf_config.n_embd
        is_first = parallel.is_first_stage
        self.wte = (VocabParallelEmbedding(hf_config.vocab_size, hidden, parallel)
                    if is_first else None)
        self.wpe = nn.Embedding(hf_config.n_positions, hidden) if is_first else None
        self.h = nn.ModuleList(GPT2Block(hf_config, i, attn_backend, parallel)
                               for i in parallel.stage_layers(hf_config.n_layer))
        self.ln_f = (LayerNorm(hidden, eps=hf_config.layer_norm_epsilon) if is_first
                     else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = self._stage_input(input_ids, positions)  # [num_tokens, hidden_size]
        last = len(self.h) - 1 if self.parallel.is_last_stage else -1
        for index, (block, kv_cache) in enumerate(zip(self.h, kv_caches, strict=True)):
            rows = metadata.output_rows if index == last else None
            hidden_states = block(hidden_states, kv_cache, metadata, rows)
        final = self.parallel.finish_stage(hidden_states, metadata.num_output_rows)
        if final is None or self.ln_f is None:
            return hidden_states  # a later pipeline stage: nothing reads it
        return self.ln_f(final) if len(final) else final

    def _stage_input(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The embedded tokens on the first stage, the previous stage's output elsewhere."""
        if self.wte is not None and self.wpe is not None:
            return self.wte(input_ids) + self.wpe(positions)
        dtype = next(self.h.parameters()).dtype  # the model dtype
        return self.parallel.recv_hidden(input_ids.shape[0], self.hidden_size, dtype,
                                         input_ids.device)


class GPT2LMHeadModel(CausalLM):
    """GPT-2. scale_attn_weights and scale_attn_by_inverse_layer_idx change the attention scale
    (handled); reorder_and_upcast_attn only changes rounding in transformers' eager path, so it
    is accepted as is; cross-attention variants are rejected."""

    loads_int4_checkpoints = False  # Conv1D's transposed weights: GPTQ/AWQ layout untested
    layer_list_name = "h"

    def __init__(self, hf_config: transformers.PretrainedConfig,
                 attn_backend: AttentionBackend, parallel: Parallel = SINGLE) -> None:
        super().__init__(hf_config, attn_backend, parallel)
        if getattr(hf_config, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention is not a decoder-only model")
        self.transformer = GPT2Model(hf_config, attn_backend, parallel)
        is_tied = getattr(hf_config, "tie_word_embeddings", True)
        has_head = parallel.is_first_stage and not is_tied
        self.lm_head = (vocab_parallel_head(hf_config.n_embd, hf_config.vocab_size, parallel)
                        if has_head else None)

    @classmethod
    def kv_cache_spec(cls, hf_config: transformers.PretrainedConfig,
                      parallel: Parallel = SINGLE) -> KVCacheSpec:
        _, num_heads = parallel.split(hf_config.n_head, "number of attention heads")
        return KVCacheSpec(num_layers=len(parallel.stage_layers(hf_config.n_layer)),
                           num_kv_heads=num_heads, head_dim=hf_config.n_embd // hf_config.n_head)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                metadata: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, kv_caches, metadata)

    def output_head(self) -> Linear | None:
        return self.lm_head

    def output_embedding(self) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head.weight
        assert self.transformer.wte is not None, "only the first stage holds the LM head"
        return self.transformer.wte.weight

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     on_module_loaded: Callable[[str], None] | None = None) -> None:
        super().load_weights(((name, _from_conv1d(name, tensor)) for name, tensor in weights),
                             on_module_loaded)

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

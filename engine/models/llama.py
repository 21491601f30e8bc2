"""The Llama-style decoder family: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.distributed.parallel import SINGLE, Parallel
from engine.errors import UnsupportedModelError
from engine.layers.activation import SiluAndMul
from engine.layers.linear import Linear, MergedLinear
from engine.layers.norm import RMSNorm
from engine.layers.parallel import RowParallelLinear, VocabParallelEmbedding, vocab_parallel_head
from engine.layers.rotary import RotaryEmbedding, apply_rotary, rope_settings
from engine.models.base import CausalLM, KVCaches, KVCacheSpec, WeightTarget
from engine.models.native_decode import NativeDecodeStack

logger = logging.getLogger(__name__)

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, signed sin: each [num_tokens, 1, head_dim]

# prefill rows per MLP slice; bounds peak activation memory. The default 1024-token chunk goes
# whole: 1.7% faster at a 4k prompt than two 512-row slices (bf16, 2 cores), for 10 MB more
MLP_CHUNK_TOKENS = 1024

# checkpoint projection name -> (our fused layer, shard id)
_FUSED_PARTS = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}


@dataclass(frozen=True, slots=True)
class DecoderOptions:
    """What differs between family members; each class derives it from its config."""

    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE


def head_dim_of(hf_config: transformers.PretrainedConfig) -> int:
    # Qwen3 (and some Mistrals) set head_dim explicitly, unequal to hidden_size / num_heads.
    explicit = getattr(hf_config, "head_dim", None)
    return int(explicit or hf_config.hidden_size // hf_config.num_attention_heads)


def num_kv_heads_of(hf_config: transformers.PretrainedConfig) -> int:
    return int(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)


# transformers 5.24: these decoders window only the layers that `layer_types` (computed from
# use_sliding_window and max_window_layers) marks "sliding_attention"; Mistral, Mixtral and
# Qwen3-MoE window every layer, even when a config also lists layer_types; Llama never does
_LAYER_TYPED_WINDOW = frozenset({"qwen2", "qwen3", "qwen2_moe"})
_NEVER_WINDOWED = frozenset({"llama"})


def sliding_window_of(hf_config: transformers.PretrainedConfig, layer_index: int) -> int | None:
    """How many positions layer `layer_index` attends to, the query's own included (position
    i sees keys (i - window, i], transformers' sliding_window_overlay), or None: full
    attention. The configs fold use_sliding_window in already (None, or Qwen2-MoE's 0)."""
    window = getattr(hf_config, "sliding_window", None)
    if not window or hf_config.model_type in _NEVER_WINDOWED:
        return None
    if hf_config.model_type in _LAYER_TYPED_WINDOW:
        layer_types = getattr(hf_config, "layer_types", None) or []
        if layer_index >= len(layer_types) or layer_types[layer_index] != "sliding_attention":
            return None
    return int(window)


class LlamaAttention(nn.Module):
    """Under TP: this rank's query heads and the KV heads they read (`Parallel.kv_heads`),
    q/k/v column-parallel, o_proj row-parallel (all-reduced)."""

    def __init__(self, hf_config: transformers.PretrainedConfig, options: DecoderOptions,
                 attn_backend: AttentionBackend, layer_index: int,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        total_heads, total_kv_heads = hf_config.num_attention_heads, num_kv_heads_of(hf_config)
        first_head, self.num_heads = parallel.split(total_heads, "number of attention heads")
        first_kv_head, self.num_kv_heads = parallel.kv_heads(total_kv_heads, total_heads)
        self.head_dim = head_dim = head_dim_of(hf_config)
        self.scale = self.head_dim**-0.5
        # the GLOBAL layer index: a pipeline stage's layers keep their window
        self.sliding_window = sliding_window_of(hf_config, layer_index)  # None: full attention
        self.attn_backend = attn_backend
        self.q_size = q_size = self.num_heads * head_dim
        self.kv_size = kv_size = self.num_kv_heads * head_dim
        kv_rows = (first_kv_head * head_dim, total_kv_heads * head_dim)
        self.qkv_proj = MergedLinear(
            hf_config.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, options.qkv_bias,
            source_rows={"q": (first_head * head_dim, total_heads * head_dim),
                         "k": kv_rows, "v": kv_rows})
        self.o_proj = RowParallelLinear(total_heads * head_dim, hf_config.hidden_size,
                                        (first_head * head_dim, q_size), options.o_proj_bias,
                                        parallel)
        self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps) if options.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps) if options.qk_norm else None

    def forward(self, hidden_states: torch.Tensor, rope: Rope,
                kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: AttentionMetadata,
                output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The attention output of every row, or of `output_rows` only (the cache still gets
        every row's K/V)."""
        q, k, v = self._qkv(hidden_states, rope)
        out = self.attn_backend.forward(q, k, v, kv_cache[0], kv_cache[1], metadata, self.scale,
                                        sliding_window=self.sliding_window)
        if output_rows is not None:
            out = out[output_rows]
        return self.o_proj(out.reshape(-1, self.q_size))

    def fill_cache(self, hidden_states: torch.Tensor, rope: Rope,
                   kv_cache: tuple[torch.Tensor, torch.Tensor],
                   metadata: AttentionMetadata) -> None:
        """The new tokens' K/V into the cache, without attending: no row's output is read."""
        _, k, v = self._qkv(hidden_states, rope)
        self.attn_backend.write_cache(k, v, kv_cache[0], kv_cache[1], metadata)

    def _qkv(self, hidden_states: torch.Tensor,
             rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.qkv_proj(hidden_states)  # [num_tokens, (num_heads + 2 * kv_heads) * dim]
        q, k = self._rotated_qk(qkv, rope)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        return q, k, v

    def _rotated_qk(self, qkv: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim] after
        RoPE (and Qwen3's per-head norms); without the norms q and k rotate as one tensor."""
        if self.q_norm is None or self.k_norm is None:
            qk = qkv[:, :self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads,
                                                          self.head_dim)
            qk = apply_rotary(qk, *rope)
            return qk[:, :self.num_heads], qk[:, self.num_heads:]
        q = qkv[:, :self.q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size:self.q_size + self.kv_size].view(-1, self.num_kv_heads,
                                                               self.head_dim)
        return apply_rotary(self.q_norm(q), *rope), apply_rotary(self.k_norm(k), *rope)


class LlamaMLP(nn.Module):
    """Under TP: this rank's intermediate rows, gate/up column-parallel, down_proj
    row-parallel; `reduce_output` off leaves the partial sum to the caller (MoE's shared
    expert, reduced with the experts)."""

    def __init__(self, hf_config: transformers.PretrainedConfig, options: DecoderOptions,
                 intermediate_size: int | None = None, parallel: Parallel = SINGLE,
                 reduce_output: bool = True) -> None:
        super().__init__()
        hidden, inter = hf_config.hidden_size, intermediate_size or hf_config.intermediate_size
        start, local = parallel.split(inter, "intermediate size")
        self.gate_up_proj = MergedLinear(hidden, {"gate": local, "up": local}, options.mlp_bias,
                                         source_rows={"gate": (start, inter), "up": (start, inter)})
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(inter, hidden, (start, local), options.mlp_bias,
                                           parallel, reduce_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= MLP_CHUNK_TOKENS:
            return self.down_proj(self.act(self.gate_up_proj(x)))
        # long prefill chunks in slices: the [tokens, 2 * intermediate] activation is the
        # largest transient of a step (80 MB at 2048 tokens for a 0.5B model), and the
        # matmuls are already efficient at this many rows
        return torch.cat([self.down_proj(self.act(self.gate_up_proj(part)))
                          for part in x.split(MLP_CHUNK_TOKENS)])


# builds layer `layer_index`'s feed-forward block for this rank: the dense MLP, or an MoE
# block (moe.py)
MLPFactory = Callable[[transformers.PretrainedConfig, DecoderOptions, int, Parallel], nn.Module]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hf_config: transformers.PretrainedConfig, options: DecoderOptions,
                 attn_backend: AttentionBackend, layer_index: int,
                 build_mlp: MLPFactory, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        eps = hf_config.rms_norm_eps
        self.input_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.self_attn = LlamaAttention(hf_config, options, attn_backend, layer_index, parallel)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, eps)
        self.mlp = build_mlp(hf_config, options, layer_index, parallel)

    def forward(self, hidden_states: torch.Tensor, rope: Rope,
                kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: AttentionMetadata,
                output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Every row's output, or `output_rows`' only (the model's last layer: past attention
        nothing else reads the others)."""
        normed = self.input_layernorm(hidden_states)
        if output_rows is not None and not len(output_rows):
            self.self_attn.fill_cache(normed, rope, kv_cache, metadata)
            return hidden_states[:0]
        attn_out = self.self_attn(normed, rope, kv_cache, metadata, output_rows)
        if output_rows is not None:
            hidden_states = hidden_states[output_rows]
        hidden_states = hidden_states + attn_out
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaModel(nn.Module):
    """The decoder stack of this rank's pipeline stage (`layers[i]` is global layer
    `stage_layers.start + i`); the embedding and final norm on the first stage only."""

    def __init__(self, hf_config: transformers.PretrainedConfig, options: DecoderOptions,
                 attn_backend: AttentionBackend, build_mlp: MLPFactory,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.parallel = parallel
        self.hidden_size = hidden = hf_config.hidden_size
        is_first = parallel.is_first_stage
        self.embed_tokens = (VocabParallelEmbedding(hf_config.vocab_size, hidden, parallel)
                             if is_first else None)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, options, attn_backend, index, build_mlp, parallel)
            for index in parallel.stage_layers(hf_config.num_hidden_layers))
        self.norm = RMSNorm(hidden, hf_config.rms_norm_eps) if is_first else None
        self.rotary_emb = RotaryEmbedding(head_dim_of(hf_config),
                                          hf_config.max_position_embeddings,
                                          rope_settings(hf_config))
        # decode steps with no Python between the layers' kernels (native_decode.py), built
        # at the first decode step (the weights are quantized or packed by then); off: the
        # modules run every step
        self.native_decode_enabled = True
        self._native_decode: NativeDecodeStack | None = None
        self._native_decode_built = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = self._stage_input(input_ids)  # [num_tokens, hidden_size]
        rope = self.rotary_emb(positions, hidden_states.dtype)  # computed once for all layers
        native = self.native_stack() if metadata.is_decode_only else None
        decoded = native.run(hidden_states, rope, kv_caches, metadata) if native else None
        if decoded is not None and native is not None and native.applies_final_norm:
            return decoded  # one rank holds the stack: normed, the model's output
        hidden_states = (decoded if decoded is not None
                         else self._run_layers(hidden_states, rope, kv_caches, metadata))
        final = self.parallel.finish_stage(hidden_states, metadata.num_output_rows)
        if final is None or self.norm is None:
            return hidden_states  # a later pipeline stage: nothing reads it
        return self.norm(final) if len(final) else final

    def _run_layers(self, hidden_states: torch.Tensor, rope: Rope, kv_caches: KVCaches,
                    metadata: AttentionMetadata) -> torch.Tensor:
        last = len(self.layers) - 1 if self.parallel.is_last_stage else -1
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            rows = metadata.output_rows if index == last else None
            hidden_states = layer(hidden_states, rope, kv_cache, metadata, rows)
        return hidden_states

    def native_stack(self) -> NativeDecodeStack | None:
        """The native decode stack of these layers, or None where they are not what it
        computes (or it is turned off)."""
        if not self.native_decode_enabled:
            return None
        if not self._native_decode_built:
            single = self.parallel.world_size == 1
            self._native_decode = NativeDecodeStack.build(list(self.layers), single,
                                                          self.norm)
            self._native_decode_built = True
        return self._native_decode

    def _stage_input(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedded tokens on the first stage, the previous stage's output elsewhere."""
        if self.embed_tokens is not None:
            return self.embed_tokens(input_ids)
        dtype = next(self.layers.parameters()).dtype  # the model dtype
        return self.parallel.recv_hidden(input_ids.shape[0], self.hidden_size, dtype,
                                         input_ids.device)


class LlamaForCausalLM(CausalLM):
    """Llama and its relatives; subclasses only change `decoder_options`."""

    def __init__(self, hf_config: transformers.PretrainedConfig,
                 attn_backend: AttentionBackend, parallel: Parallel = SINGLE) -> None:
        super().__init__(hf_config, attn_backend, parallel)
        _check_config(hf_config)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.model = LlamaModel(hf_config, self.decoder_options(hf_config), attn_backend,
                                self.build_mlp, parallel)
        has_head = parallel.is_first_stage and not self.tie_word_embeddings
        self.lm_head = (vocab_parallel_head(hf_config.hidden_size, hf_config.vocab_size,
                                            parallel) if has_head else None)

    @classmethod
    def decoder_options(cls, hf_config: transformers.PretrainedConfig) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_proj_bias=bias,
                              mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))

    @staticmethod
    def build_mlp(hf_config: transformers.PretrainedConfig, options: DecoderOptions,
                  layer_index: int, parallel: Parallel) -> nn.Module:
        """Layer `layer_index`'s feed-forward block; the MoE families override it."""
        return LlamaMLP(hf_config, options, parallel=parallel)

    @classmethod
    def kv_cache_spec(cls, hf_config: transformers.PretrainedConfig,
                      parallel: Parallel = SINGLE) -> KVCacheSpec:
        _, num_kv_heads = parallel.kv_heads(num_kv_heads_of(hf_config),
                                            hf_config.num_attention_heads)
        return KVCacheSpec(num_layers=len(parallel.stage_layers(hf_config.num_hidden_layers)),
                           num_kv_heads=num_kv_heads, head_dim=head_dim_of(hf_config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, metadata)

    def output_head(self) -> Linear | None:
        return self.lm_head

    def output_embedding(self) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head.weight
        assert self.model.embed_tokens is not None, "only the first stage holds the LM head"
        return self.model.embed_tokens.weight

    def map_weight_name(self, name: str) -> WeightTarget | None:
        if "rotary_emb.inv_freq" in name or (self.lm_head is None and name == "lm_head.weight"):
            return None  # recomputed buffer / the tied copy of embed_tokens
        module_path, _, param = name.rpartition(".")
        parent, _, proj = module_path.rpartition(".")
        if proj in _FUSED_PARTS:
            fused, shard_id = _FUSED_PARTS[proj]
            return WeightTarget(f"{parent}.{fused}.{param}", shard_id)
        return WeightTarget(name)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama's architecture without bias options."""

    @classmethod
    def decoder_options(cls, hf_config: transformers.PretrainedConfig) -> DecoderOptions:
        return DecoderOptions()


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 always has q/k/v biases (and never an o_proj or MLP bias)."""

    @classmethod
    def decoder_options(cls, hf_config: transformers.PretrainedConfig) -> DecoderOptions:
        return DecoderOptions(qkv_bias=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 drops Qwen2's q/k/v bias (attention_bias covers all four projections) and
    RMS-normalizes each head of q and k before RoPE."""

    @classmethod
    def decoder_options(cls, hf_config: transformers.PretrainedConfig) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_proj_bias=bias, qk_norm=True)


def _check_config(hf_config: transformers.PretrainedConfig) -> None:
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")

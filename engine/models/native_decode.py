"""A Llama-family decode step with no Python between the kernels of a layer
(cpu_kernels.c: llama_decode_layers, llama_decode_attention, add_rms_norm_bf16).

At one stream the kernels of an int4 decode step are ~6 ms of the default model's ~10; the
rest is the Python between them: module calls, checks, views and the ~10 torch and ctypes
calls of each layer, ~150 us a layer. The native stack runs the same kernels in the same
order, with the same roundings, so its hidden states are bit-identical to the modules'
(tests/unit/test_native_decode.py). With int4 or int8 matmuls (the AVX-512 VNNI kernels over
their column copies: `--quantization int4`, GPTQ/AWQ checkpoints without act-order, `int8`,
`w8a8`) the whole stack is one native call, and so it is with bf16 matmuls that
engine/kernels/packed_bf16.py reads in place (oneDNN's prepacked weights, at the row counts
it takes). Otherwise, bf16 matmuls through oneDNN, torch runs the four matmuls of a layer and
four native calls do the rest: RMSNorm, RoPE + cache write + attention, residual add + RMSNorm,
SwiGLU; the last of them applies the model's final norm. The embedding, the LM head and
sampling stay in Python: a handful of calls a step.

It takes a model only where every decoder layer is plain Llama (no per-head q/k norms, no
sliding window, a dense SwiGLU MLP), all its matmuls are of one of those kinds, one rank holds
the whole stack (no tensor or pipeline parallelism), and the step decodes only (one new token
per sequence, bf16 on CPU; int8 weights without int8 prefill: fewer rows than the modules
would send to the dequantizing path). Anything else runs the modules."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from engine.attention.base import AttentionMetadata
from engine.attention.torch_ref import TorchAttentionBackend
from engine.kernels import packed_bf16, w8a8
from engine.kernels.native import native_library, stream_prefetch
from engine.layers.activation import SiluAndMul
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.models.base import KVCaches

if TYPE_CHECKING:
    from engine.models.llama import LlamaDecoderLayer, LlamaMLP

# llama_decode_layers's own statuses (cpu_kernels.c); a kernel's are small negatives
_BAD_SLOT, _NO_MEMORY = -100, -101


class _QLinear(ctypes.Structure):
    """qlinear_t"""

    _fields_ = [("bits", ctypes.c_int64), ("w", ctypes.c_void_p), ("s", ctypes.c_void_p),
                ("z", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("N", ctypes.c_int64),
                ("K", ctypes.c_int64), ("group_size", ctypes.c_int64)]


class _QLayer(ctypes.Structure):
    """q_decoder_layer_t"""

    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("input_eps", ctypes.c_float), ("post_eps", ctypes.c_float),
                ("qkv", _QLinear), ("o", _QLinear), ("gate_up", _QLinear),
                ("down", _QLinear), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class NativeDecodeStack:
    """The decoder layers of one LlamaModel as the native calls' arguments, built once; `run`
    takes a step where it can and says None where the modules must run it."""

    def __init__(self, layers: Sequence[LlamaDecoderLayer], bf16: bool,
                 final_norm: nn.Module | None = None) -> None:
        attn = layers[0].self_attn
        # the model's final norm, applied by the last native call (one Python module call
        # less a step, ~100 us with the caches cold from the weights' stream), where it is a
        # bf16 RMSNorm the kernel computes; `run`'s output is then the normed hidden states
        self.applies_final_norm = final_norm is not None and _native_norm(final_norm)
        norm = cast(RMSNorm, final_norm)
        self._final_norm = norm.weight.data_ptr() if self.applies_final_norm else None
        self._final_eps = norm.eps if self.applies_final_norm else 0.0
        self.num_heads, self.num_kv_heads = attn.num_heads, attn.num_kv_heads
        self.head_dim, self.scale = attn.head_dim, attn.scale
        self.hidden_size = layers[0].input_layernorm.weight.shape[0]
        self.intermediate_size = _mlp(layers[0]).gate_up_proj.out_features // 2
        self._biases: list[torch.Tensor] = []  # bf16 copies the structs point at: kept alive
        per_layer = [_linears(layer) for layer in layers]
        linears = [linear for group in per_layer for linear in group]
        # the most rows a step may have: int8 weights send 128 rows and more to a dequantizing
        # matmul (w8a8.DEQUANTIZE_MIN_ROWS) unless they take int8 prefill
        self.max_rows = min((w8a8.DEQUANTIZE_MIN_ROWS - 1 for linear in linears
                             if linear.int8_weight is not None
                             and not linear.int8_weight.int8_prefill), default=sys.maxsize)
        # quantized, or bf16 weights packed_bf16 reads in place: the whole stack is one native
        # call over these structs (bf16: up to the rows packed_bf16 takes for every layer, so
        # that the modules' matmuls are the same calls); otherwise torch calls the bf16 matmuls
        # between the native steps
        self.bf16 = bf16
        self.bf16_in_place = bf16 and all(linear.packed_address is not None
                                          for linear in linears)
        self.bf16_max_rows = min(packed_bf16.max_rows(linear.in_features)
                                 for linear in linears)
        self._bf16_linears = per_layer if self.bf16 else []
        self._layers = (_QLayer * len(layers))()
        for slot, layer in zip(self._layers, layers, strict=True):
            slot.input_norm = layer.input_layernorm.weight.data_ptr()
            slot.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            slot.input_eps = layer.input_layernorm.eps
            slot.post_eps = layer.post_attention_layernorm.eps
            if not self.bf16 or self.bf16_in_place:
                slot.qkv = self._linear(layer.self_attn.qkv_proj)
                slot.o = self._linear(layer.self_attn.o_proj)
                slot.gate_up = self._linear(_mlp(layer).gate_up_proj)
                slot.down = self._linear(_mlp(layer).down_proj)
        self._caches: KVCaches | None = None  # the caches the structs point at

    @classmethod
    def build(cls, layers: Sequence[nn.Module], single_rank: bool,
              final_norm: nn.Module | None = None) -> NativeDecodeStack | None:
        """The stack for these layers (and the final norm after them, where the kernel
        computes it: `applies_final_norm`), or None where one of the layers is not what the
        kernel computes (see the module docstring)."""
        if not single_rank or not layers or native_library() is None:
            return None
        if not all(_plain_layer(layer) for layer in layers):
            return None
        plain = cast("list[LlamaDecoderLayer]", list(layers))
        packed = {linear.packed_weight is not None for layer in plain
                  for linear in _linears(layer)}
        if len(packed) != 1:  # some layers bf16, others quantized: neither way takes them all
            return None
        shapes = {(layer.self_attn.num_heads, layer.self_attn.num_kv_heads,
                   layer.self_attn.head_dim, _mlp(layer).gate_up_proj.out_features)
                  for layer in plain}
        if len(shapes) != 1 or plain[0].self_attn.head_dim % 32:  # rope_bf16: whole halves
            return None
        return cls(plain, bf16=packed.pop(), final_norm=final_norm)

    def run(self, hidden_states: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
            kv_caches: KVCaches,
            metadata: AttentionMetadata) -> torch.Tensor | None:
        """The last layer's output for the embedded tokens `hidden_states` [M, hidden] (written
        in place; the final norm's output where `applies_final_norm`), or None where this step
        is not one the kernel takes. `rope`: the step's
        cos and signed sin, [M, 1, head_dim] each (apply_rotary's factors)."""
        plan = metadata.decode_plan
        cos, sin = rope
        num_rows = hidden_states.shape[0]
        if (not metadata.is_decode_only or metadata.output_rows is not None or plan is None
                or plan.rows is not None or hidden_states.dtype != torch.bfloat16
                or not hidden_states.is_cpu or not hidden_states.is_contiguous()
                or cos.dtype != torch.bfloat16 or sin.dtype != torch.bfloat16
                or cos.shape[0] != num_rows or cos.numel() != num_rows * self.head_dim
                or not cos.is_contiguous() or not sin.is_contiguous()
                or plan.lens.shape[0] != num_rows or num_rows > self.max_rows):
            return None
        if kv_caches is not self._caches and not self._point_at(kv_caches):
            return None
        k_cache = kv_caches[0][0]
        lib = native_library()
        assert lib is not None
        step = (cos.data_ptr(), sin.data_ptr(), metadata.slot_mapping.data_ptr(),
                k_cache.shape[0] * k_cache.shape[1])
        plan_args = (plan.block_tables.data_ptr(), plan.lens.data_ptr(), k_cache.shape[1],
                     plan.block_tables.shape[1], self.scale)
        threads = torch.get_num_threads()
        if self.bf16 and not (self.bf16_in_place and num_rows <= self.bf16_max_rows):
            return self._run_bf16(lib, hidden_states, step, plan_args, threads)
        _check("llama_decode_layers", lib.llama_decode_layers(
            ctypes.addressof(self._layers), len(self._layers), hidden_states.data_ptr(),
            num_rows, self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
            self.intermediate_size, *step, *plan_args, self._final_norm, self._final_eps,
            stream_prefetch(), threads))
        return hidden_states

    def _run_bf16(self, lib: ctypes.CDLL, hidden: torch.Tensor, step: tuple[int, ...],
                  plan_args: tuple[int | float, ...], threads: int) -> torch.Tensor:
        """The layers with their bf16 matmuls called from here (`packed_forward`, the modules'
        path) and everything between them native: per layer 4 matmuls and 4 native calls,
        where the modules make ~20 calls and as many checks. The same ops on the same values:
        bit-identical to the modules."""
        num_rows, width = hidden.shape
        normed = torch.empty_like(hidden)
        attn = hidden.new_empty(num_rows, self.num_heads * self.head_dim)
        act = hidden.new_empty(num_rows, self.intermediate_size)
        first = self._layers[0]  # the structs hold each layer's norms and caches
        lib.rms_norm_bf16(hidden.data_ptr(), first.input_norm, num_rows, width, first.input_eps,
                          normed.data_ptr(), threads)
        last = len(self._layers) - 1
        for index, (qkv_proj, o_proj, gate_up_proj, down_proj) in enumerate(self._bf16_linears):
            slot = self._layers[index]
            qkv = qkv_proj.packed_forward(normed)
            _check("llama_decode_attention", lib.llama_decode_attention(
                qkv.data_ptr(), num_rows, self.num_heads, self.num_kv_heads, self.head_dim,
                *step, slot.k_cache, slot.v_cache, *plan_args, attn.data_ptr(), threads))
            # each matmul's output is held by a name until the call that reads it returns
            out = o_proj.packed_forward(attn)
            lib.add_rms_norm_bf16(hidden.data_ptr(), out.data_ptr(), slot.post_norm, num_rows,
                                  width, slot.post_eps, normed.data_ptr(), threads)
            gate_up = gate_up_proj.packed_forward(normed)
            lib.silu_and_mul_bf16(gate_up.data_ptr(), num_rows, self.intermediate_size,
                                  act.data_ptr(), threads)
            out = down_proj.packed_forward(act)
            if index < last:
                following = self._layers[index + 1]
                lib.add_rms_norm_bf16(hidden.data_ptr(), out.data_ptr(), following.input_norm,
                                      num_rows, width, following.input_eps, normed.data_ptr(),
                                      threads)
            else:  # the final norm in place, or none (rms_norm_bf16 may write its input)
                lib.add_rms_norm_bf16(hidden.data_ptr(), out.data_ptr(), self._final_norm,
                                      num_rows, width, self._final_eps, hidden.data_ptr(),
                                      threads)
        return hidden

    def _point_at(self, kv_caches: KVCaches) -> bool:
        """Point the layer structs at these caches; False where the kernel cannot read them
        (not contiguous bf16 on CPU, or another shape)."""
        expected = (self.num_kv_heads, self.head_dim)
        if len(kv_caches) != len(self._layers):
            return False
        for k_cache, v_cache in kv_caches:
            for cache in (k_cache, v_cache):
                if (cache.dtype != torch.bfloat16 or not cache.is_cpu
                        or not cache.is_contiguous() or tuple(cache.shape[2:]) != expected
                        or cache.shape != kv_caches[0][0].shape):
                    return False
        for slot, (k_cache, v_cache) in zip(self._layers, kv_caches, strict=True):
            slot.k_cache, slot.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        self._caches = kv_caches
        return True

    def _linear(self, layer: Linear) -> _QLinear:
        if layer.packed_address is not None:  # packed_bf16.linear's: the bias added inside
            bias = self._keep(layer.bias, torch.bfloat16)
            return _QLinear(16, layer.packed_address, None, None, bias, layer.out_features,
                            layer.in_features, packed_bf16.padded_in_features(layer.in_features))
        if layer.int8_weight is not None:
            int8 = layer.int8_weight
            assert int8.columns is not None
            bias = self._keep(layer.int8_bias, torch.float32)  # w8a8.linear's: added inside
            rows, columns = int8.shape
            return _QLinear(8, int8.columns.data_ptr(), int8.scales.data_ptr(), None, bias,
                            rows, columns, 0)  # int8: one scale per row, no groups
        weight = layer.int4_weight
        assert weight is not None and weight.columns is not None
        nibbles, scales, zeros = weight.columns.arguments
        bias = self._keep(layer.bias, torch.bfloat16)  # w4a16.linear's: added after, in bf16
        rows, columns = weight.shape
        return _QLinear(4, nibbles, scales, zeros, bias, rows, columns, weight.group_size)

    def _keep(self, bias: torch.Tensor | None, dtype: torch.dtype) -> int | None:
        """The address of a contiguous `dtype` copy of `bias` that lives as long as the stack,
        or None."""
        if bias is None:
            return None
        copy = bias.detach().to(dtype).contiguous()
        self._biases.append(copy)
        return copy.data_ptr()


def _mlp(layer: LlamaDecoderLayer) -> LlamaMLP:
    """A checked layer's MLP (`build_mlp` types it as any module)."""
    return cast("LlamaMLP", layer.mlp)


def _linears(layer: LlamaDecoderLayer) -> tuple[Linear, ...]:
    return (layer.self_attn.qkv_proj, layer.self_attn.o_proj, _mlp(layer).gate_up_proj,
            _mlp(layer).down_proj)


def _check(name: str, status: int) -> None:
    if status == _BAD_SLOT:
        raise IndexError("a decode row's cache slot is outside the KV cache")
    if status == _NO_MEMORY:
        raise MemoryError(f"{name} could not allocate its scratch")
    if status != 0:
        raise RuntimeError(f"{name} failed in a kernel (status {status})")


def _plain_layer(layer: nn.Module) -> bool:
    """Whether one decoder layer computes exactly what the native stack does: plain Llama,
    bf16 norms, and its four matmuls all on the column kernels or all oneDNN-prepacked bf16."""
    from engine.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP

    if type(layer) is not LlamaDecoderLayer:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    if (type(attn) is not LlamaAttention or attn.q_norm is not None
            or attn.sliding_window is not None
            or not isinstance(attn.attn_backend, TorchAttentionBackend)
            or type(mlp) is not LlamaMLP or type(mlp.act) is not SiluAndMul):
        return False
    if not all(_native_norm(norm) for norm in (layer.input_layernorm,
                                                layer.post_attention_layernorm)):
        return False
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    return (all(_column_kernel(linear) for linear in linears)
            or all(linear.packed_weight is not None
                   and linear.packed_weight.dtype == torch.bfloat16 for linear in linears))


def _native_norm(norm: nn.Module) -> bool:
    """Whether rms_norm_bf16 computes this norm: an RMSNorm with a contiguous bf16 weight on
    the CPU."""
    return (type(norm) is RMSNorm and norm.weight.dtype == torch.bfloat16
            and norm.weight.is_cpu and norm.weight.is_contiguous())


def _column_kernel(layer: Linear) -> bool:
    """An int4 or int8 weight held as an AVX-512 kernel's column copy, which the module's
    decode calls run (int4: every call; int8: below DEQUANTIZE_MIN_ROWS rows, or all)."""
    if layer.int8_weight is not None:
        return layer.int8_weight.columns is not None
    weight = layer.int4_weight
    return weight is not None and weight.columns is not None

"""Linear layers, including the fused projections (qkv, gate_up) that checkpoints store split,
and their CPU fast paths: weights prepacked once into oneDNN's blocked layout, quantized to
int8 (`--quantization int8`) for the native kernel in engine/kernels/w8a8.py, or held as int4
(`--quantization int4`, GPTQ/AWQ checkpoints) for engine/kernels/w4a16.py."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import packed_bf16, w4a16, w8a8

logger = logging.getLogger(__name__)

# "0" turns prepacking off (A/B benchmarks, debugging); anything else leaves it on
PREPACK_ENV = "PAGEDSERVE_CPU_PREPACK"


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether prepacked oneDNN matmuls serve this dtype and device. bf16 on CPU only: there
    oneDNN on a prepacked weight runs 1.3-3x faster than F.linear on skinny batches (decode),
    since F.linear re-lays the weight out on every call. fp32 stays on F.linear, the path
    transformers takes, so fp32 outputs stay comparable with it."""
    if os.environ.get(PREPACK_ENV, "1") == "0":
        return False
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


class Linear(nn.Linear):
    """nn.Linear that can trade its dense weight for a oneDNN-prepacked copy, an int8 or an
    int4 one (inference only). After any of them, `weight` is an empty placeholder (None while
    an int4 checkpoint loads into the int4_* parameters)."""

    packed_weight: torch.Tensor | None = None
    # where packed_bf16.linear reads packed_weight; None: oneDNN's call only
    packed_address: int | None = None
    int8_weight: w8a8.QuantizedWeight | None = None
    int8_bias: torch.Tensor | None = None  # float32, as the int8 kernel adds it
    int4_weight: w4a16.Int4Weight | None = None
    int4_group_size = w4a16.GROUP_SIZE  # of the int4_* parameters a checkpoint loads into
    weight_dtype = torch.float32

    def quantize_int8(self, int8_prefill: bool = False) -> bool:
        """Replace the weight by its int8 form (`int8_prefill`: int8 activations for prefill
        too, w8a8.with_columns); False (nothing changed) where the kernel's block size does not
        divide in_features."""
        if self.int8_weight is not None:
            return True
        if self.packed_weight is not None or not w8a8.can_quantize(self.in_features):
            return False
        self.int8_weight = w8a8.with_columns(w8a8.quantize_weight(self.weight.detach()),
                                             int8_prefill)
        self.int8_bias = None if self.bias is None else self.bias.detach().float()
        self._drop_dense_weight()
        return True

    def quantize_int4(self) -> bool:
        """Replace the weight by its int4 form; False (nothing changed) where the group size
        does not divide in_features."""
        if self.int4_weight is not None:
            return True
        if (self.packed_weight is not None or self.int8_weight is not None
                or not w4a16.can_quantize(self.in_features)):
            return False
        self.int4_weight = w4a16.with_columns(w4a16.quantize_weight(self.weight.detach()))
        self._drop_dense_weight()
        return True

    def quantize(self, bits: int, int8_prefill: bool = False) -> bool:
        """`quantize_int8` (bits 8) or `quantize_int4` (bits 4)."""
        return self.quantize_int8(int8_prefill) if bits == 8 else self.quantize_int4()

    def prepare_int4_load(self, group_size: int) -> None:
        """Trade the dense weight for empty int4 parameters in w4a16's layout, which the loader
        fills from a GPTQ/AWQ checkpoint (converted tensor by tensor; rows per shard of a fused
        layer, like the weight's); `finish_int4_load` then builds `int4_weight` from them."""
        num_groups = -(-self.in_features // group_size)
        rows = self.out_features
        self.int4_group_size = group_size
        self.weight_dtype = self.weight.dtype  # for the placeholder finish_int4_load leaves
        for name, shape, dtype in (("int4_packed", (rows, self.in_features // 2), torch.uint8),
                                   ("int4_scales", (rows, num_groups), torch.float16),
                                   ("int4_zeros", (rows, num_groups), torch.uint8)):
            self.register_parameter(name, nn.Parameter(
                torch.empty(shape, dtype=dtype, device=self.weight.device), requires_grad=False))
        self.register_parameter("weight", None)

    def finish_int4_load(self, group_index: torch.Tensor | None) -> None:
        """`int4_weight` from the loaded int4 parameters, which it replaces."""
        packed, scales, zeros = (getattr(self, name).data
                                 for name in ("int4_packed", "int4_scales", "int4_zeros"))
        self.int4_weight = w4a16.with_columns(w4a16.Int4Weight(
            packed, scales, zeros, self.int4_group_size, group_index))
        for name in ("int4_packed", "int4_scales", "int4_zeros"):
            delattr(self, name)
        self.weight = nn.Parameter(packed.new_empty(0, dtype=self.weight_dtype),
                                   requires_grad=False)

    def prepack(self) -> None:
        if self.packed_weight is not None:
            return
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
        self._drop_dense_weight()
        self.packed_address = packed_bf16.address(
            self.packed_weight, self.out_features, self.in_features,
            None if self.bias is None else self.bias.detach())

    def _drop_dense_weight(self) -> None:
        # the dense copy would double the weights' memory; nothing reads it any more
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_weight is not None:
            return w8a8.linear(x, self.int8_weight, self.int8_bias)
        if self.int4_weight is not None:
            return w4a16.linear(x, self.int4_weight, self.bias)
        if self.packed_weight is None:
            return F.linear(x, self.weight, self.bias)
        return self.packed_forward(x)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x).float(): the LM head's logits. Where packed_bf16's kernel takes the call
        it writes the same values as float32 itself, saving a pass over [rows, vocab]."""
        if (self.int8_weight is None and self.int4_weight is None
                and self.packed_weight is not None and self._packed_kernel_takes(x)):
            assert self.packed_address is not None
            return packed_bf16.linear(x, self.packed_address, self.in_features, self.bias,
                                      self.out_features, out_dtype=torch.float32)
        return self(x).float()

    def _packed_kernel_takes(self, x: torch.Tensor) -> bool:
        return (self.packed_address is not None and x.dim() == 2
                and x.shape[0] <= packed_bf16.max_rows(self.in_features)
                and x.dtype == torch.bfloat16 and x.is_contiguous())

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T + bias through the prepacked weight (`prepack` first): packed_bf16's kernel
        where it reads the weight and takes the call, else oneDNN's. `forward`'s path for such
        a layer, without its checks (the native decode stack calls it directly)."""
        if self._packed_kernel_takes(x):
            assert self.packed_address is not None
            return packed_bf16.linear(x, self.packed_address, self.in_features, self.bias,
                                      self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [],
                                                  "")

    @classmethod
    def packed_from(cls, weight: torch.Tensor) -> Linear:
        """A bias-free packed layer computing x @ weight.T, sharing nothing with `weight` (a
        tied LM head: the embedding keeps its dense table for lookups)."""
        layer = cls.over(weight)
        layer.prepack()
        return layer

    @classmethod
    def int8_from(cls, weight: torch.Tensor, int8_prefill: bool = False) -> Linear | None:
        """A bias-free int8 layer computing x @ weight.T (a tied LM head), or None where the
        kernel cannot take its shape."""
        layer = cls.over(weight)
        return layer if layer.quantize_int8(int8_prefill) else None

    @classmethod
    def int4_from(cls, weight: torch.Tensor) -> Linear | None:
        """A bias-free int4 layer computing x @ weight.T (a tied LM head), or None where the
        group size does not divide its columns."""
        layer = cls.over(weight)
        return layer if layer.quantize_int4() else None

    @classmethod
    def over(cls, weight: torch.Tensor) -> Linear:
        """A bias-free layer whose weight is `weight` itself (to be packed or quantized)."""
        layer = cls(weight.shape[1], weight.shape[0], bias=False, device="meta",
                    dtype=weight.dtype)
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
        return layer

    def weight_regions(self) -> list[tuple[int, int]]:
        """(address, bytes) of the memory a call reads for its weight and bias: the prepacked
        copy, the int8 or int4 tensors, or the dense weight."""
        regions: list[tuple[int, int]] = []
        tensors: list[torch.Tensor | None]
        if self.packed_weight is not None:
            regions = [(torch.ops.mkldnn.data_ptr(self.packed_weight),
                        torch.ops.mkldnn._nbytes(self.packed_weight))]
            tensors = [self.bias]
        elif self.int8_weight is not None:
            tensors = [*self.int8_weight.tensors(), self.int8_bias]
        elif self.int4_weight is not None:
            tensors = [*self.int4_weight.tensors(), self.bias]
        else:
            tensors = [self.weight, self.bias]
        return regions + tensor_regions(tensors)

    def extra_repr(self) -> str:
        form = (", int8" if self.int8_weight is not None
                else ", int4" if self.int4_weight is not None
                else ", prepacked" if self.packed_weight is not None else "")
        return super().extra_repr() + form


def tensor_regions(tensors: Iterable[torch.Tensor | None]) -> list[tuple[int, int]]:
    """(address, bytes) of each tensor's storage; None and empty tensors left out."""
    storages = (tensor.untyped_storage() for tensor in tensors
                if tensor is not None and tensor.numel())
    return [(storage.data_ptr(), storage.nbytes()) for storage in storages]


def prepack_linears(model: nn.Module) -> int:
    """Prepack every Linear of `model` not already int8 or int4; returns how many."""
    layers = [m for m in model.modules()
              if isinstance(m, Linear) and m.int8_weight is None and m.int4_weight is None]
    for layer in layers:
        layer.prepack()
    return len(layers)


def quantize_linears(model: nn.Module, bits: int = 8, int8_prefill: bool = False,
                     skip: Linear | None = None) -> tuple[int, int]:
    """Quantize every Linear of `model` but `skip` to int8 or int4 where its in_features
    allow: (quantized, left as is for its in_features)."""
    layers = [m for m in model.modules() if isinstance(m, Linear) and m is not skip]
    quantized = sum(layer.quantize(bits, int8_prefill) for layer in layers)
    return quantized, len(layers) - quantized


class MergedLinear(Linear):
    """One matmul for several projections of the same input (q/k/v, gate/up): a fused
    matmul is much faster on CPU than three small ones. Checkpoints store the parts as
    separate tensors; the loader copies each into its rows through `shard_view`.

    Under tensor parallelism `output_sizes` are this rank's rows of each part, and
    `source_rows` says where they start in the part's full checkpoint tensor and how many
    rows that has (start, full size); without it every part is whole."""

    def __init__(self, input_size: int, output_sizes: dict[str, int], bias: bool,
                 source_rows: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__(input_size, sum(output_sizes.values()), bias=bias)
        self.output_sizes = dict(output_sizes)
        self.source_rows = source_rows or {shard_id: (0, size)
                                           for shard_id, size in output_sizes.items()}
        self.shard_ranges: dict[str, tuple[int, int]] = {}
        start = 0
        for shard_id, size in output_sizes.items():
            self.shard_ranges[shard_id] = (start, start + size)  # [start, end) rows
            start += size

    def shard_ids(self, param_name: str) -> list[str]:
        """The parts a checkpoint stores of `param_name` (weight and bias alike)."""
        return list(self.shard_ranges)

    def shard_view(self, param: torch.Tensor, shard_id: str) -> torch.Tensor:
        """The rows of `param` (this layer's weight or bias) that hold shard `shard_id`."""
        start, end = self.shard_ranges[shard_id]
        return param.narrow(0, start, end - start)

    def local_part(self, param_leaf: str, shard_id: str | None,
                   tensor: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a checkpoint tensor: of one part, or of every part of a tensor
        the checkpoint stores fused already (GPT-2's c_attn: q, k and v in turn)."""
        if shard_id is not None:
            return self._source_part(shard_id, tensor)
        full_sizes = [full for _, full in self.source_rows.values()]
        if full_sizes == list(self.output_sizes.values()) or tensor.shape[0] != sum(full_sizes):
            return tensor  # whole already, or a mismatch the loader's shape check names
        return torch.cat([self._source_part(shard_id, part)
                          for shard_id, part in zip(self.source_rows, tensor.split(full_sizes),
                                                    strict=True)])

    def _source_part(self, shard_id: str, tensor: torch.Tensor) -> torch.Tensor:
        start, full = self.source_rows[shard_id]
        if tensor.shape[0] != full:
            return tensor
        return tensor.narrow(0, start, self.output_sizes[shard_id])

    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split a fused output [..., sum(sizes)] into the parts, in declaration order."""
        return output.split(list(self.output_sizes.values()), dim=-1)

"""Weight-int8 linear layers for CPU: weights quantized once per output row, activations per
row and per block of 64 columns on every call, products summed exactly in int32 by AVX-512
VNNI (cpu_kernels.c explains the arithmetic), or on CPUs without it by the portable kernel
(cpu_portable.c: w8a8_linear_f32, AVX2). With the AVX-512 kernels, decode runs a GEMM over the
weight repacked 16 columns at a time (w8a8_gemm, `with_columns`, which keeps no other copy):
one row to a batch, it beats the row tiles over [N, K] bytes (w8a8_linear), which take
weights without the repacking.
Prefill-sized batches, from DEQUANTIZE_MIN_ROWS rows, multiply bf16
activations by the dequantized weight (`--quantization int8`), or take the GEMM too
(`--quantization w8a8`, `int8_prefill`): 1.3-1.5x oneDNN's bf16 matmul there, for a little
fidelity (w8a8 keeps the LM head and the token embedding in bf16, engine/loader.py: the
default model teacher-forced over 768 answer tokens picks bf16's token at 99.0% of positions,
answer NLL +0.71%). `reference_linear` is the same
arithmetic in torch: the fallback where neither can be built, and the oracle their tests
compare with."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.kernels.dequantized import linear_in_row_slices
from engine.kernels.native import native_library
from engine.kernels.portable import portable_library

BLOCK = 64  # activation columns per scale; K must be a multiple (cpu_kernels.c's BLOCK)
# rows quantized at a time: the float32 temporaries of a slice stay ~4 MB, which the heap
# reuses slice after slice; 8192-row slices (29 MB each) left the default model's int4
# load peaking at 1.27-1.40 GB RSS (0.25 GB KV pool) against 1.23-1.25, in 7.7-8.1 s
# against 6.2-7.1
_QUANTIZE_ROWS = 1024
# From this many rows (prefill), unless the weight takes int8 activations there too: a bf16
# matmul over the weight dequantized for the call (it beats the int8 row tiles: 1.08x at 128
# rows, 1.2x at 256-2048; below it the int8 weights' halved traffic wins).
DEQUANTIZE_MIN_ROWS = 128


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """W [N, K] as bytes round(W / scale) + 128 (in [1, 255]) and one float32 scale per row.
    Once `with_columns` has made the GEMM's copy, that copy is the only one (`data` is left
    empty; `values` reads the bytes back from it)."""

    data: torch.Tensor  # [N, K] uint8, or [N, 0] once the column copy holds the bytes
    scales: torch.Tensor  # [N] float32
    # `data` repacked for w8a8_gemm ([N / 16][K / 4][16][4], N padded), or None
    columns: torch.Tensor | None = None
    # int8 activations from DEQUANTIZE_MIN_ROWS rows too (--quantization w8a8), where the
    # GEMM runs
    int8_prefill: bool = False
    size: tuple[int, int] | None = None  # (N, K); None: read from `data`

    def __post_init__(self) -> None:
        if self.size is None:
            object.__setattr__(self, "size", (self.data.shape[0], self.data.shape[1]))

    @property
    def shape(self) -> tuple[int, int]:
        assert self.size is not None
        return self.size

    def tensors(self) -> list[torch.Tensor]:
        """What it holds: the row-major values (empty once the column copy holds them), the
        scales and the column copy."""
        return [t for t in (self.data, self.scales, self.columns) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    @property
    def has_rows(self) -> bool:
        """Whether `data` holds the bytes (not only the column copy)."""
        return self.data.shape[1] == self.shape[1]

    def values(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) of the stored bytes, [rows, K] uint8, from `data` or read back
        from the column copy."""
        if self.has_rows:
            return self.data[start:end]
        assert self.columns is not None
        num_rows, in_features = self.shape
        end = num_rows if end is None else end
        first, last = start // 16, -(-end // 16)
        groups = self.columns.view(-1, in_features // 4, 16, 4)[first:last]
        rows = groups.permute(0, 2, 1, 3).reshape(-1, in_features)  # [16 * groups, K]
        return rows[start - 16 * first:end - 16 * first]

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) of W in float32."""
        return (self.values(start, end).float() - 128) * self.scales[start:end, None]


def can_quantize(in_features: int) -> bool:
    return in_features % BLOCK == 0


def quantize_weight(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-row int8: scale = max|row| / 127, values rounded to nearest."""
    num_rows, in_features = weight.shape
    if not can_quantize(in_features):
        raise ValueError(f"in_features must be a multiple of {BLOCK}, got {in_features}")
    data = torch.empty(num_rows, in_features, dtype=torch.uint8)
    scales = torch.empty(num_rows, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, num_rows, _QUANTIZE_ROWS):
            rows = weight[start:start + _QUANTIZE_ROWS].float()
            row_scales = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
            quantized = torch.round(rows / row_scales[:, None]).clamp_(-127, 127)
            data[start:start + len(rows)] = (quantized + 128).to(torch.uint8)
            scales[start:start + len(rows)] = row_scales
    return QuantizedWeight(data, scales)


def with_columns(weight: QuantizedWeight, int8_prefill: bool = False) -> QuantizedWeight:
    """`weight` as its column-packed copy for the GEMM, where the AVX-512 kernels run: every
    decode batch takes the GEMM, prefill either too (`int8_prefill`) or a matmul over the
    weight dequantized from the copy (w8_dequantize_columns), so the [N, K] bytes are dropped
    (the default model's int8 weights: 0.49 GB less)."""
    lib = native_library()
    if lib is None or weight.columns is not None:
        return weight
    num_rows, in_features = weight.shape
    columns = torch.empty(-(-num_rows // 16) * 16 * in_features, dtype=torch.uint8)
    lib.w8_pack_columns(weight.data.data_ptr(), num_rows, in_features, columns.data_ptr(),
                        torch.get_num_threads())
    return dataclasses.replace(weight, columns=columns, int8_prefill=int8_prefill,
                               data=weight.data.new_empty(num_rows, 0))


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int values as float32 [M, K // BLOCK, BLOCK], scales [M, K // BLOCK, 1]):
    per block scale = max|block| / 127, values x * (1 / scale) rounded half to even: the
    kernel's float operations, in its order."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    scales = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inverse = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
    return torch.round(blocks * inverse).clamp_(-127, 127), scales


def reference_linear(x: torch.Tensor, weight: QuantizedWeight,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """`linear`'s arithmetic in torch: int8 activations per block, and every per-block dot
    product of int8 values is exact in float32 (|sum| <= 64 * 127 * 127 < 2**24), so only the
    scaling rounds. From DEQUANTIZE_MIN_ROWS rows, unless the weight runs the GEMM there
    (`int8_prefill`): a float matmul over the dequantized weight."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if flat.shape[0] >= DEQUANTIZE_MIN_ROWS and not _gemm_takes(weight, flat.shape[0]):
        out = linear_in_row_slices(flat.float(), weight.shape, weight.dequantize, bias)
        return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])
    values, scales = quantize_activations(flat)
    wq = (weight.values().float() - 128).reshape(weight.shape[0], -1, BLOCK)
    out = torch.zeros(flat.shape[0], weight.shape[0], dtype=torch.float32)
    for b in range(values.shape[1]):
        out += (values[:, b] @ wq[:, b].T) * scales[:, b]
    out *= weight.scales
    if bias is not None:
        out += bias
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def portable_linear(x: torch.Tensor, weight: QuantizedWeight,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """`reference_linear`'s decode arithmetic through the portable kernel (cpu_portable.c:
    w8a8_linear_f32, AVX2 where the AVX-512 one cannot run), float32 activations in."""
    library = portable_library()
    assert library is not None
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).float().contiguous()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=torch.float32)
    bias32 = None if bias is None else bias.float().contiguous()
    status = library.w8a8_linear_f32(flat.data_ptr(), flat.shape[0], flat.shape[1],
                                     weight.data.data_ptr(), weight.scales.data_ptr(),
                                     None if bias32 is None else bias32.data_ptr(),
                                     weight.shape[0], out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise ValueError(f"w8a8_linear_f32 refused {flat.shape[0]} rows of a {weight.shape} "
                         "weight")
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def embedding_rows(ids: torch.Tensor, weight: QuantizedWeight,
                   dtype: torch.dtype) -> torch.Tensor:
    """The rows `ids` [n] (int64, each < the table's rows) of an embedding table held as int8
    rows, dequantized: [n, K] `dtype`, (q - 128) * scale in float32 rounded once. bf16 on CPU
    in one native call (cpu_kernels.c: embed_int8_rows), the same values as the torch ops
    otherwise."""
    lib = native_library()
    if (lib is not None and dtype == torch.bfloat16 and weight.has_rows and ids.is_cpu
            and ids.dtype == torch.int64 and ids.is_contiguous()):
        num_rows, width = weight.shape
        out = torch.empty(ids.shape[0], width, dtype=torch.bfloat16)
        if lib.embed_int8_rows(ids.data_ptr(), ids.shape[0], weight.data.data_ptr(),
                               weight.scales.data_ptr(), num_rows, width, out.data_ptr()) == 0:
            return out
        raise IndexError(f"token ids outside the embedding's {num_rows} rows")
    rows = weight.data.index_select(0, ids).float().sub_(128)
    rows.mul_(weight.scales.index_select(0, ids)[:, None])
    return rows.to(dtype)


def _gemm_takes(weight: QuantizedWeight, num_rows: int) -> bool:
    """Whether w8a8_gemm runs `num_rows` rows of `weight` (where its column copy exists)."""
    return weight.columns is not None and (num_rows < DEQUANTIZE_MIN_ROWS or weight.int8_prefill)


def linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias with W int8 (`bias`: float32 or None); x any float dtype on CPU.
    The AVX-512 kernels where they run; else, for decode-sized batches, the portable one."""
    lib = native_library()
    if lib is None:
        if (x.numel() < DEQUANTIZE_MIN_ROWS * x.shape[-1] and x.device.type == "cpu"
                and portable_library() is not None):
            return portable_linear(x, weight, bias)
        return reference_linear(x, weight, bias)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if flat.dtype != torch.bfloat16 or not flat.is_contiguous():
        flat = flat.to(torch.bfloat16).contiguous()
    num_rows, in_features = flat.shape
    out_features = weight.shape[0]
    gemm = _gemm_takes(weight, num_rows)
    if num_rows >= DEQUANTIZE_MIN_ROWS and not gemm:
        dense = torch.empty(out_features, in_features, dtype=torch.bfloat16)
        dequantize = lib.w8_dequantize if weight.has_rows else lib.w8_dequantize_columns
        source = weight.data if weight.has_rows else weight.columns
        assert source is not None
        dequantize(source.data_ptr(), weight.scales.data_ptr(), out_features, in_features,
                   dense.data_ptr(), torch.get_num_threads())
        out = torch.nn.functional.linear(flat, dense, None if bias is None else bias.to(
            torch.bfloat16))
        return out.to(x.dtype).reshape(*shape[:-1], out_features)
    # the GEMM over the column-packed copy, or the row tiles over the rows: same arguments
    if gemm and weight.columns is not None:
        kernel, name, weight_bytes = lib.w8a8_gemm, "w8a8_gemm", weight.columns
    else:
        if not weight.has_rows:  # only a hand-made weight: with_columns keeps the copy
            raise ValueError("an int8 weight with neither its rows nor its column copy")
        kernel, name, weight_bytes = lib.w8a8_linear, "w8a8_linear", weight.data
    out = torch.empty(num_rows, out_features, dtype=torch.bfloat16)
    status = kernel(flat.data_ptr(), num_rows, in_features, weight_bytes.data_ptr(),
                    weight.scales.data_ptr(), bias.data_ptr() if bias is not None else None,
                    out_features, out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"{name} could not allocate its activation scratch")
    return out.to(x.dtype).reshape(*shape[:-1], out_features)

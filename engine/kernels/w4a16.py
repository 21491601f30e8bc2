"""Weight-int4 linear layers (`--quantization int4`, GPTQ and AWQ checkpoints): weights stored
as group-wise asymmetric 4-bit integers, two per byte, with one scale and one zero point per
group of input columns and output row; activations stay in the model dtype.

Where the AVX-512 VNNI kernels run, a weight made by `with_columns` also holds a copy of its
nibbles laid out 16 output columns at a time, and `columns_linear_q8` multiplies any number of
activation rows by it (cpu_kernels.c: int4_gemm_q8): activations quantized to int8 per block of
Q8_BLOCK columns, vpdpbusd on the nibbles, 1.3-1.46 TOPS from 230 rows up on the default
model's shapes (1.4-2.7x the dequantizing path at prefill sizes, 6-7x at 16 rows). Elsewhere
`linear` runs decode-sized batches (up to INT4_MAX_ROWS rows) through the portable C kernels
(cpu_portable.c), which read only the packed bytes: `kernel_linear_q8`, the same arithmetic
with AVX2 maddubs, and `kernel_linear`, float32 activations times nibbles converted to float,
for groups that are not a multiple of Q8_BLOCK. Larger batches there, act-order checkpoints and
other devices take `reference_linear`, which dequantizes the weight to the activation dtype, a
slice of rows at a time, and runs float matmuls: the oracle of the float kernel
(`reference_linear_q8` is the int8 one's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.kernels.dequantized import linear_in_row_slices
from engine.kernels.native import native_library, stream_prefetch
from engine.kernels.portable import INT4_MAX_ROWS, portable_library

GROUP_SIZE = 128  # input columns per scale and zero point of `--quantization int4`
MAX_LEVEL = 15  # 4-bit values are in [0, 15]
Q8_BLOCK = 32  # activation columns per scale in the int8-activation kernel (cpu_portable.c)
# rows quantized at a time: the float32 temporaries of a slice stay ~4 MB, which the heap
# reuses slice after slice; 8192-row slices (29 MB each) left the default model's int4
# load peaking at 1.27-1.40 GB RSS (0.25 GB KV pool) against 1.23-1.25, in 7.7-8.1 s
# against 6.2-7.1
_QUANTIZE_ROWS = 1024
# scales are stored float16 (what GPTQ and AWQ checkpoints ship); a group whose range is
# below 15 * this keeps this scale rather than a subnormal one that loses its precision
_MIN_SCALE = float(torch.finfo(torch.float16).tiny)


@dataclass(frozen=True, slots=True)
class Int4Weight:
    """W [N, K] as W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g] with g the group of column
    k: k // group_size, or group_index[k] where a checkpoint orders groups by activation
    (GPTQ act-order). q is packed two per byte, column 2j in the low nibble of byte j; once
    `with_columns` has made the AVX-512 kernel's copy, that copy is the only one (`packed` is
    left empty: every CPU call runs the kernel, and `dequantize` reads the copy)."""

    packed: torch.Tensor  # [N, K // 2] uint8, or [N, 0] once the column copy holds the values
    scales: torch.Tensor  # [N, num_groups] float16
    zeros: torch.Tensor  # [N, num_groups] uint8: GPTQ's zero+1 offset can make it 16
    group_size: int
    group_index: torch.Tensor | None = None  # [K] int64; None: column k in group k // size
    columns: Int4Columns | None = None  # the AVX-512 kernel's copy (`with_columns`), or None
    size: tuple[int, int] | None = None  # (N, K); None: read from `packed`
    # the portable kernels' view of scales and zeros, float32 [N, num_groups]: scale, and
    # zero * scale (empty once the column copy is the only copy: it holds its own)
    kernel_scales: torch.Tensor = field(init=False, repr=False)
    kernel_zero_scaled: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.size is None:
            object.__setattr__(self, "size", (self.packed.shape[0], self.packed.shape[1] * 2))
        if not self.has_rows:  # the column copy holds the kernel's scales: the rows' are unused
            object.__setattr__(self, "kernel_scales", self.scales.new_empty(0, dtype=torch.float32))
            object.__setattr__(self, "kernel_zero_scaled", self.kernel_scales)
            return
        scales = self.scales.float().contiguous()
        object.__setattr__(self, "kernel_scales", scales)
        object.__setattr__(self, "kernel_zero_scaled", (self.zeros.float() * scales).contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        assert self.size is not None
        return self.size

    def tensors(self) -> list[torch.Tensor]:
        """What it holds: the row-major nibbles (empty once the column copy holds them), the
        scales and zero points, and the column copy's."""
        tensors = [self.packed, self.scales, self.zeros]
        if self.columns is not None:
            tensors += [self.columns.nibbles, self.columns.scales, self.columns.zeros]
        return tensors

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    @property
    def has_rows(self) -> bool:
        """Whether `packed` holds the values (not only the column copy)."""
        return self.packed.shape[1] * 2 == self.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0,
                   end: int | None = None) -> torch.Tensor:
        """Rows [start, end) of the float weight: (q - zero) * scale is exact in float32 (a
        small integer times a float16), so only the final cast to `dtype` rounds. Contiguous
        groups on CPU go through the portable kernel (int4_dequantize_f32: the same values,
        written once)."""
        num_rows, num_columns = self.shape
        end = num_rows if end is None else end
        library = portable_library()
        if (self.group_index is None and num_columns % self.group_size == 0 and self.has_rows
                and self.packed.device.type == "cpu" and self.packed.is_contiguous()
                and library is not None):
            out = torch.empty(end - start, num_columns, dtype=torch.float32)
            group_offset = start * self.kernel_scales.shape[1] * 4  # bytes of float32
            status = library.int4_dequantize_f32(
                self.packed.data_ptr() + start * num_columns // 2,
                self.kernel_scales.data_ptr() + group_offset,
                self.kernel_zero_scaled.data_ptr() + group_offset, end - start, num_columns,
                self.group_size, out.data_ptr(), torch.get_num_threads())
            if status == 0:
                return out.to(dtype)
        return self.dequantize_in_torch(dtype, start, end)

    def dequantize_in_torch(self, dtype: torch.dtype = torch.float32, start: int = 0,
                            end: int | None = None) -> torch.Tensor:
        """`dequantize` in torch ops: any device, act-order group indices."""
        rows = slice(start, end)
        values = (unpack_nibbles(self.packed[rows]) if self.has_rows
                  else self._column_values(start, end)).float()
        scales, zeros = self.scales[rows].float(), self.zeros[rows].float()
        num_rows, num_columns = values.shape
        if self.group_index is None and num_columns % self.group_size == 0:
            # per group, broadcast: no [N, K] copies of the scales and zeros
            grouped = values.view(num_rows, -1, self.group_size)
            grouped.sub_(zeros[..., None]).mul_(scales[..., None])
            return values.to(dtype)
        if self.group_index is None:
            scales = scales.repeat_interleave(self.group_size, dim=1)[:, :num_columns]
            zeros = zeros.repeat_interleave(self.group_size, dim=1)[:, :num_columns]
        else:
            scales = scales.index_select(1, self.group_index)
            zeros = zeros.index_select(1, self.group_index)
        return ((values - zeros) * scales).to(dtype)

    def _column_values(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) of q, [rows, K] uint8, read back from the column copy: lane l of
        group j holds column 16j + l's octet, values k .. k + 3 in the low nibbles of its four
        bytes and k + 4 .. k + 7 in the high ones (cpu_kernels.c: int4_pack_columns)."""
        assert self.columns is not None
        num_rows, num_columns = self.shape
        end = num_rows if end is None else end
        first, last = start // 16, -(-end // 16)
        lanes = self.columns.nibbles.view(-1, num_columns // 8, 16)[first:last]
        # nibble i of a lane: byte i // 2, low (k + i // 2) or high (k + 4 + i // 2) half
        nibbles = torch.stack([(lanes >> (4 * i)) & 15 for i in _NIBBLES_IN_K_ORDER], dim=-1)
        values = nibbles.permute(0, 2, 1, 3).reshape(-1, num_columns)  # [16 * groups, K]
        return values[start - 16 * first:end - 16 * first].to(torch.uint8)


# the nibble of a column-copy lane that holds value k + i of its octet, for i = 0 .. 7
_NIBBLES_IN_K_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in [0, 15] (K even) -> [N, K // 2] uint8, column 2j in the low nibble."""
    values = values.to(torch.uint8)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """`pack_nibbles` undone: [N, K // 2] uint8 -> [N, K] uint8."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def can_quantize(in_features: int) -> bool:
    return in_features % GROUP_SIZE == 0


def quantize_weight(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Int4Weight:
    """Asymmetric 4-bit per group: scale = (max - min) / 15 (rounded to float16 first, so the
    values are rounded against the scale that is stored), zero = round(-min / scale), q =
    round(w / scale) + zero clamped to [0, 15]. Groups span 0, so the zero is in [0, 15]."""
    num_rows, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features must be a multiple of {group_size}, got {in_features}")
    num_groups = in_features // group_size
    packed = torch.empty(num_rows, in_features // 2, dtype=torch.uint8)
    scales = torch.empty(num_rows, num_groups, dtype=torch.float16)
    zeros = torch.empty(num_rows, num_groups, dtype=torch.uint8)
    with torch.no_grad():
        for start in range(0, num_rows, _QUANTIZE_ROWS):
            groups = weight[start:start + _QUANTIZE_ROWS].float().reshape(-1, num_groups,
                                                                          group_size)
            scale, zero = group_scale_and_zero(groups)  # [rows, num_groups]
            q = torch.round(groups / scale.float()[..., None]) + zero[..., None]
            end = start + groups.shape[0]
            packed[start:end] = pack_nibbles(q.clamp_(0, MAX_LEVEL).reshape(-1, in_features))
            scales[start:end] = scale
            zeros[start:end] = zero.to(torch.uint8)
    return Int4Weight(packed, scales, zeros, group_size)


def group_scale_and_zero(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., group_size] weights -> the float16 scale and the (float, integral) zero point of
    each group, as `quantize_weight` stores them; engine/kernels/gptq.py shares them."""
    low = groups.amin(dim=-1).clamp_max(0)  # 0 stays exact
    high = groups.amax(dim=-1).clamp_min(0)
    scale = ((high - low) / MAX_LEVEL).clamp_min(_MIN_SCALE).half()
    zero = torch.round(-low / scale.float()).clamp_(0, MAX_LEVEL)
    return scale, zero


def reference_linear(x: torch.Tensor, weight: Int4Weight,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias over W dequantized to x's dtype: the oracle, and the path of large
    batches (dequantizing costs a pass over the weight, small beside a prefill's matmul), a
    slice of rows at a time (dequantized.linear_in_row_slices)."""
    return linear_in_row_slices(
        x, weight.shape, lambda start, end: weight.dequantize(x.dtype, start, end),
        None if bias is None else bias.to(x.dtype))


def kernel_linear(x: torch.Tensor, weight: Int4Weight,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias through the portable int4 kernel: x [..., K] with at most
    INT4_MAX_ROWS rows, on CPU, weight groups contiguous (no act-order group index). The
    activations go in as float32 (bf16 ones are converted, as the oracle's matmul accumulates
    in float32 too); y comes back in x's dtype."""
    library = portable_library()
    assert library is not None and weight.group_index is None
    num_rows, in_features = weight.shape
    rows = x.reshape(-1, in_features).float()
    num_x_rows = rows.shape[0]
    if num_x_rows > 1 and num_x_rows % 4:  # the kernel's batch path takes rows in fours
        rows = torch.nn.functional.pad(rows, (0, 0, 0, 4 - num_x_rows % 4))
    x_even = rows[:, 0::2].contiguous()
    x_odd = rows[:, 1::2].contiguous()
    group_sums = rows.reshape(rows.shape[0], -1, weight.group_size).sum(dim=-1).contiguous()
    out = torch.empty(rows.shape[0], num_rows, dtype=torch.float32)
    status = library.int4_linear_f32(
        x_even.data_ptr(), x_odd.data_ptr(), group_sums.data_ptr(), weight.packed.data_ptr(),
        weight.kernel_scales.data_ptr(), weight.kernel_zero_scaled.data_ptr(), rows.shape[0],
        num_rows, in_features, weight.group_size, out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise ValueError(f"int4_linear_f32 refused {num_x_rows} rows of a {weight.shape} weight "
                         f"in groups of {weight.group_size}")
    out = out[:num_x_rows]
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], num_rows)


def quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 -> the activations `kernel_linear_q8` multiplies, dequantized: per
    row and block of Q8_BLOCK columns, scale = max|block| / 127 and x * (127 / max) rounded
    half to even (a zero block stays zero)."""
    blocks = x.reshape(*x.shape[:-1], -1, Q8_BLOCK)
    peak = blocks.abs().amax(dim=-1, keepdim=True)
    # a true division, as the kernel's: `127 / peak` would multiply by peak's reciprocal
    inverse = torch.where(peak > 0, torch.full_like(peak, 127).div(peak), 0)
    return (torch.round(blocks * inverse) * (peak / 127)).reshape(x.shape)


def reference_linear_q8(x: torch.Tensor, weight: Int4Weight,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """The oracle of `kernel_linear_q8`: the quantized activations, dequantized, times W in
    float32."""
    out = torch.nn.functional.linear(quantize_activations_q8(x.float()), weight.dequantize(),
                                     None if bias is None else bias.float())
    return out.to(x.dtype)


@dataclass(frozen=True, slots=True)
class Int4Columns:
    """An Int4Weight repacked for cpu_kernels.c's int4_gemm_q8 (int4_pack_columns): the nibbles
    of 16 output columns by 8 input columns per 64 bytes, scales and zero points per group
    of 16 columns, float16 (a one-row call reads 10% faster than with float32 scale and zero
    * scale, with the same sums: zero * scale is exact in float32)."""

    nibbles: torch.Tensor  # [ceil(N / 16) * K / 8 * 16] int32 lanes
    scales: torch.Tensor  # [ceil(N / 16), num_groups, 16] float16
    zeros: torch.Tensor  # the same shape: the integer zero points as float16
    # the three tensors' addresses, the kernel's fixed arguments: a one-row call is ~3 us of
    # kernel, and ~100 of them make a decode step
    arguments: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arguments", (
            self.nibbles.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr()))


def with_columns(weight: Int4Weight) -> Int4Weight:
    """`weight` as the AVX-512 VNNI kernel's copy, where that kernel runs and takes the weight
    (groups in order and a multiple of Q8_BLOCK columns); else `weight` itself. The row-major
    nibbles are dropped: every CPU call then takes the kernel, at any batch size, and the
    copy is all `dequantize` needs (the default model's int4 weights: 0.25 GB less)."""
    lib = native_library()
    if (lib is None or weight.columns is not None or weight.group_index is not None
            or weight.group_size % Q8_BLOCK or weight.shape[1] % weight.group_size
            or not weight.packed.is_contiguous()):
        return weight
    num_rows, in_features = weight.shape
    groups, num_groups = -(-num_rows // 16), in_features // weight.group_size
    columns = Int4Columns(torch.empty(groups * in_features * 2, dtype=torch.int32),
                          torch.empty(groups, num_groups, 16, dtype=torch.float16),
                          torch.empty(groups, num_groups, 16, dtype=torch.float16))
    scales, zeros = weight.scales.contiguous(), weight.zeros.contiguous()
    lib.int4_pack_columns(weight.packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                          num_rows, in_features, num_groups, columns.nibbles.data_ptr(),
                          columns.scales.data_ptr(), columns.zeros.data_ptr(),
                          torch.get_num_threads())
    return dataclasses.replace(weight, columns=columns,
                               packed=weight.packed.new_empty(num_rows, 0))


def columns_linear_q8(x: torch.Tensor, weight: Int4Weight,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """`kernel_linear_q8`'s arithmetic through the AVX-512 VNNI kernel (cpu_kernels.c:
    int4_gemm_q8) over the weight's column copy, any number of rows: bf16 activations go in and
    come out as they are (prefill's rows are many: no float32 copies of them), others through
    float32."""
    lib, columns = native_library(), weight.columns
    assert lib is not None and columns is not None
    nibbles, scales, zeros = columns.arguments
    return _int8_activation_kernel(
        "int4_gemm_q8", x, weight, bias,
        lambda rows, out: lib.int4_gemm_q8(
            rows.data_ptr(), rows.shape[0], rows.shape[1], nibbles, scales, zeros, out.shape[1],
            weight.group_size, out.data_ptr(), rows.dtype == torch.bfloat16,
            stream_prefetch(), torch.get_num_threads()),
        keep_bf16=True)


def kernel_linear_q8(x: torch.Tensor, weight: Int4Weight,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias through the int8-activation kernel (cpu_portable.c: int4_linear_q8):
    the conditions of `kernel_linear`, and groups a multiple of Q8_BLOCK columns."""
    library = portable_library()
    assert library is not None and weight.group_index is None
    return _int8_activation_kernel(
        "int4_linear_q8", x, weight, bias,
        lambda rows, out: library.int4_linear_q8(
            rows.data_ptr(), weight.packed.data_ptr(), weight.kernel_scales.data_ptr(),
            weight.kernel_zero_scaled.data_ptr(), rows.shape[0], out.shape[1], rows.shape[1],
            weight.group_size, out.data_ptr(), torch.get_num_threads()))


def _int8_activation_kernel(name: str, x: torch.Tensor, weight: Int4Weight,
                            bias: torch.Tensor | None,
                            run: Callable[[torch.Tensor, torch.Tensor], int],
                            keep_bf16: bool = False) -> torch.Tensor:
    """x's rows through `run(rows, out)` (a kernel call returning its status), then the bias,
    in x's dtype and leading dims: rows and out float32, or bf16 as they come where the kernel
    takes them (`keep_bf16`)."""
    num_rows, in_features = weight.shape
    # the model's activations are already [tokens, features]: no reshape and view back, ~1.5
    # us of a one-row call that runs ~100 times a decode step
    is_2d = x.dim() == 2
    rows = x if is_2d else x.reshape(-1, in_features)
    rows = (rows if keep_bf16 and rows.dtype == torch.bfloat16 else rows.float()).contiguous()
    out = torch.empty(rows.shape[0], num_rows, dtype=rows.dtype)
    status = run(rows, out)
    if status != 0:
        raise ValueError(f"{name} refused {rows.shape[0]} rows of a {weight.shape} weight in "
                         f"groups of {weight.group_size} (status {status})")
    if bias is not None:
        out += bias.to(out.dtype)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out if is_2d else out.view(*x.shape[:-1], num_rows)


def takes_columns_kernel(x: torch.Tensor, weight: Int4Weight) -> bool:
    """Whether `columns_linear_q8` runs this call: any rows on CPU, the weight's column copy
    made (`with_columns`)."""
    return weight.columns is not None and x.is_cpu


def takes_kernel(x: torch.Tensor, weight: Int4Weight) -> bool:
    """Whether `kernel_linear` can run this call (see its conditions)."""
    return (x.device.type == "cpu" and weight.group_index is None and weight.has_rows
            and x.numel() <= INT4_MAX_ROWS * x.shape[-1] and weight.packed.is_contiguous()
            and portable_library() is not None)


def kernel_description() -> str:
    """What runs int4 matmuls on this machine, for the load log line."""
    if native_library() is not None:
        return ("AVX-512 VNNI int4 kernel with int8 activations at every batch size "
                "(act-order checkpoints dequantize + float matmul)")
    if portable_library() is None:
        return "torch dequantize fallback (the portable kernel is unavailable: slow decode)"
    return (f"portable int4 kernel with int8 activations for batches of up to {INT4_MAX_ROWS} "
            "rows (act-order checkpoints excepted), dequantize + float matmul for larger ones")


def linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias with W int4: the AVX-512 VNNI kernel at every batch size where it
    holds the weight (1.4-7x the dequantizing path, prefill included), else a portable kernel
    for decode-sized batches (int8 activations where the groups allow), else the dequantizing
    reference."""
    if takes_columns_kernel(x, weight):
        return columns_linear_q8(x, weight, bias)
    if takes_kernel(x, weight):
        if weight.group_size % Q8_BLOCK == 0:
            return kernel_linear_q8(x, weight, bias)
        return kernel_linear(x, weight, bias)
    return reference_linear(x, weight, bias)

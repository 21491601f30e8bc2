"""Weight-int4 linear layers (`--quantization int4`, GPTQ and AWQ checkpoints): weights stored
as group-wise asymmetric 4-bit integers, two per byte, with one scale and one zero point per
group of input columns and output row; activations stay in the model dtype.

There is no native kernel yet: `linear` is `reference_linear`, which dequantizes the whole
weight to the activation dtype on every call and runs a float matmul. That saves memory now
(a quarter of bf16's weight bytes at rest) but costs time on decode, where a fused int4 kernel
would read only the packed bytes; it is the oracle such a kernel will be tested against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZE = 128  # input columns per scale and zero point of `--quantization int4`
MAX_LEVEL = 15  # 4-bit values are in [0, 15]
_QUANTIZE_ROWS = 8192  # rows quantized at a time: bounds the float32 copy of a large head
# scales are stored float16 (what GPTQ and AWQ checkpoints ship); a group whose range is
# below 15 * this keeps this scale rather than a subnormal one that loses its precision
_MIN_SCALE = float(torch.finfo(torch.float16).tiny)


@dataclass(frozen=True, slots=True)
class Int4Weight:
    """W [N, K] as W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g] with g the group of column
    k: k // group_size, or group_index[k] where a checkpoint orders groups by activation
    (GPTQ act-order). q is packed two per byte, column 2j in the low nibble of byte j."""

    packed: torch.Tensor  # [N, K // 2] uint8
    scales: torch.Tensor  # [N, num_groups] float16
    zeros: torch.Tensor  # [N, num_groups] uint8: GPTQ's zero+1 offset can make it 16
    group_size: int
    group_index: torch.Tensor | None = None  # [K] int64; None: column k in group k // size

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [N, K] float weight: (q - zero) * scale is exact in float32 (a small integer
        times a float16), so only the final cast to `dtype` rounds."""
        values = unpack_nibbles(self.packed).float()
        if self.group_index is None:
            scales = self.scales.float().repeat_interleave(self.group_size, dim=1)
            zeros = self.zeros.float().repeat_interleave(self.group_size, dim=1)
            num_columns = values.shape[1]
            scales, zeros = scales[:, :num_columns], zeros[:, :num_columns]
        else:
            scales = self.scales.float().index_select(1, self.group_index)
            zeros = self.zeros.float().index_select(1, self.group_index)
        return ((values - zeros) * scales).to(dtype)


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
            low = groups.amin(dim=-1).clamp_max(0)  # [rows, num_groups]: 0 stays exact
            high = groups.amax(dim=-1).clamp_min(0)
            scale = ((high - low) / MAX_LEVEL).clamp_min(_MIN_SCALE).half()
            zero = torch.round(-low / scale.float()).clamp_(0, MAX_LEVEL)
            q = torch.round(groups / scale.float()[..., None]) + zero[..., None]
            end = start + groups.shape[0]
            packed[start:end] = pack_nibbles(q.clamp_(0, MAX_LEVEL).reshape(-1, in_features))
            scales[start:end] = scale
            zeros[start:end] = zero.to(torch.uint8)
    return Int4Weight(packed, scales, zeros, group_size)


def reference_linear(x: torch.Tensor, weight: Int4Weight,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias over W dequantized to x's dtype: the oracle, and the only path until
    a native kernel lands (dequantizing every call is correct but slow for decode)."""
    out = torch.nn.functional.linear(x, weight.dequantize(x.dtype),
                                     None if bias is None else bias.to(x.dtype))
    return out


def linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias with W int4; the seam where a native kernel will plug in."""
    return reference_linear(x, weight, bias)

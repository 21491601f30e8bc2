"""GPTQ and AWQ checkpoints: which of them load (config.json's quantization_config), and their
int32 packings converted, tensor by tensor, into engine/kernels/w4a16.py's int4 layout.

The packings (8 four-bit values per int32, value i in bits [4i, 4i + 4)):
- GPTQ: qweight [K / 8, N] packs 8 consecutive input columns; qzeros [G, N / 8] and scales
  [G, N] per group; g_idx [K] maps each input column to its group (act-order checkpoints
  permute it). The "v1" format, AutoGPTQ's and every hub GPTQ checkpoint's, stores zero - 1
  (checkpoint_format "gptq_v2", GPTQModel's, stores the zero itself): the zero is stored + 1.
- AWQ "gemm": qweight [K, N / 8] and qzeros [G, N / 8] pack 8 output columns, value i holding
  column AWQ_ORDER[i] of its 8; scales [G, N]; zeros are stored as they are.
w4a16 keeps per-output-row tensors ([N, ...]), so a fused layer's shards are row ranges of
every int4 tensor, as of its dense weight."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import transformers

from engine.errors import UnsupportedModelError
from engine.kernels import w4a16

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # packed value i holds output column AWQ_ORDER[i]
_AWQ_UNPACK = tuple(AWQ_ORDER.index(column) for column in range(8))  # column j: value this
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
# checkpoint tensor suffix -> the Linear parameter (Linear.prepare_int4_load) it fills
INT4_PARAMS = {"qweight": "int4_packed", "scales": "int4_scales", "qzeros": "int4_zeros"}


@dataclass(frozen=True, slots=True)
class CheckpointQuantization:
    """A GPTQ or AWQ 4-bit checkpoint we can load."""

    method: str  # "gptq" or "awq"
    group_size: int | None  # None: one group per row (group_size -1)
    zero_offset: int  # added to every stored zero point: 1 for GPTQ's v1 format
    act_order: bool  # GPTQ desc_act: g_idx permutes the groups

    def name(self) -> str:
        return f"{self.method.upper()} 4-bit" + (" act-order" if self.act_order else "")


def checkpoint_quantization(hf_config: transformers.PretrainedConfig
                            ) -> CheckpointQuantization | None:
    """The checkpoint's quantization, None for a plain float one; formats we cannot load
    raise, named, before any weight is read."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    values: Mapping[str, object] = config if isinstance(config, Mapping) else config.to_dict()
    method = str(values.get("quant_method", "unknown")).lower()
    if method not in ("gptq", "awq"):
        raise UnsupportedModelError(
            f"checkpoint quantization {method!r} is not supported: only GPTQ and AWQ 4-bit "
            "checkpoints load (or load the float checkpoint with --quantization int4/int8)")
    bits = values.get("bits", values.get("w_bit"))
    if bits != 4:
        raise UnsupportedModelError(f"{method.upper()} checkpoints with {bits} bits are not "
                                    "supported, only 4-bit ones")
    group_size = int(values.get("group_size", values.get("q_group_size", -1)))  # type: ignore[call-overload]
    return (_gptq(values, group_size) if method == "gptq" else _awq(values, group_size))


def _gptq(values: Mapping[str, object], group_size: int) -> CheckpointQuantization:
    layout = str(values.get("checkpoint_format", "gptq")).lower()
    if layout not in ("gptq", "gptq_v2") or values.get("is_marlin_format"):
        raise UnsupportedModelError(f"GPTQ checkpoint format {layout!r} is not supported "
                                    "(only 'gptq' and 'gptq_v2' packings, not Marlin's)")
    return CheckpointQuantization("gptq", group_size if group_size > 0 else None,
                                  zero_offset=1 if layout == "gptq" else 0,
                                  act_order=bool(values.get("desc_act", False)))


def _awq(values: Mapping[str, object], group_size: int) -> CheckpointQuantization:
    version = str(values.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedModelError(f"AWQ version {version!r} is not supported (only 'gemm')")
    if not values.get("zero_point", True):
        raise UnsupportedModelError("AWQ checkpoints without zero points are not supported")
    return CheckpointQuantization("awq", group_size if group_size > 0 else None,
                                  zero_offset=0, act_order=False)


def convert_weights(weights: Iterator[tuple[str, torch.Tensor]],
                    quantization: CheckpointQuantization,
                    group_indices: dict[str, torch.Tensor]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with qweight/qzeros/scales converted to w4a16's layout and
    renamed to the Linear parameters they fill; each g_idx goes into `group_indices` by
    module name instead (applied once every shard of a fused layer is known)."""
    for name, tensor in weights:
        module, _, suffix = name.rpartition(".")
        if suffix == "g_idx":
            group_indices[module] = tensor.to(torch.int64)
        elif suffix in INT4_PARAMS:
            yield f"{module}.{INT4_PARAMS[suffix]}", _convert(suffix, tensor, quantization)
        else:
            yield name, tensor


def _convert(suffix: str, tensor: torch.Tensor,
             quantization: CheckpointQuantization) -> torch.Tensor:
    if suffix == "scales":
        return tensor.t().to(torch.float16).contiguous()  # [G, N] -> [N, G]
    is_awq = quantization.method == "awq"
    if suffix == "qzeros":  # [G, N / 8] -> [N, G]
        zeros = unpack_int32(tensor, awq_order=is_awq) + quantization.zero_offset
        return zeros.t().to(torch.uint8).contiguous()
    if is_awq:  # qweight [K, N / 8] -> [N, K]
        return w4a16.pack_nibbles(unpack_int32(tensor, awq_order=True).t())
    return w4a16.pack_nibbles(unpack_int32(tensor.t(), awq_order=False))  # [K / 8, N]


def unpack_int32(packed: torch.Tensor, awq_order: bool) -> torch.Tensor:
    """[R, C] int32 -> [R, 8 * C] int32 in [0, 15], the 8 values of each int32 in order
    (AWQ's interleaved order undone when `awq_order`)."""
    values = (packed.to(torch.int32).unsqueeze(-1) >> _SHIFTS) & 0xF  # [R, C, 8]
    if awq_order:
        values = values[..., list(_AWQ_UNPACK)]
    return values.reshape(packed.shape[0], -1)


def pack_int32(values: torch.Tensor, awq_order: bool) -> torch.Tensor:
    """`unpack_int32` undone: [R, 8 * C] values in [0, 15] -> [R, C] int32 (how the tests
    write GPTQ and AWQ checkpoints)."""
    groups = values.to(torch.int64).reshape(values.shape[0], -1, 8)
    if awq_order:
        groups = groups[..., list(AWQ_ORDER)]
    packed = (groups << _SHIFTS.to(torch.int64)).sum(dim=-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def group_index(indices: list[torch.Tensor], in_features: int,
                group_size: int) -> torch.Tensor | None:
    """One layer's group index from its shards' g_idx (one per checkpoint projection): they
    must agree (q/k/v, gate/up see the same input, so GPTQ orders them alike); None where it
    is the plain k // group_size."""
    first = indices[0]
    if first.shape != (in_features,) or any(not torch.equal(first, i) for i in indices[1:]):
        raise UnsupportedModelError("GPTQ act-order: the g_idx of a fused layer's projections "
                                    "differ or do not match its input size")
    plain = torch.arange(in_features) // group_size
    return None if torch.equal(first, plain) else first

"""Activation functions: SwiGLU (SiluAndMul) for the Llama family, GELU variants for GPT-2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UnsupportedModelError
from engine.kernels.native import loaded_library, takes_bf16


class SiluAndMul(nn.Module):
    """silu(gate) * up on a fused [..., 2 * intermediate_size] gate_up projection."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if takes_bf16(gate_up):
            return silu_and_mul_native(gate_up)
        return silu_and_mul_reference(gate_up)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The same two roundings as transformers' act(gate) * up, the product written over the
    silu's output: one large buffer a call, not two (a 512-token prefill chunk of a 0.5B
    model: 10 MB less to allocate and fault in per layer)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def silu_and_mul_native(gate_up: torch.Tensor) -> torch.Tensor:
    """The reference's two roundings (silu, then the product) in one native pass (bf16 on
    CPU), without the gate and up intermediates."""
    intermediate = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], intermediate)
    loaded_library().silu_and_mul_bf16(gate_up.data_ptr(),
                                       gate_up.numel() // (2 * intermediate), intermediate,
                                       out.data_ptr(), torch.get_num_threads())
    return out


class GELU(nn.Module):
    """GELU, exact or with the tanh approximation ("gelu_new", GPT-2's choice)."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


_GELU_APPROXIMATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh",
                        "gelu": "none"}


def get_gelu(name: str) -> GELU:
    """The GELU module for an HF `activation_function` name."""
    if name not in _GELU_APPROXIMATIONS:
        raise UnsupportedModelError(
            f"activation function {name!r} is not supported; expected one of "
            f"{sorted(_GELU_APPROXIMATIONS)}")
    return GELU(_GELU_APPROXIMATIONS[name])

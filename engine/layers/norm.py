"""Normalization layers: RMSNorm (Llama family) and LayerNorm (GPT-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm as HF Llama computes it: normalize in float32, cast back, then scale by the
    weight in the model dtype (the order matters for bf16 parity with transformers)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# GPT-2's LayerNorm has nothing to add to torch's.
LayerNorm = nn.LayerNorm

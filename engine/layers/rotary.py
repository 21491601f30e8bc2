"""Rotary position embeddings (RoPE): settings read from an HF config, `default` and `llama3`
frequency schedules, a precomputed cos/sin table indexed by absolute position."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from engine.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


@dataclass(frozen=True, slots=True)
class RopeSettings:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_settings(hf_config: transformers.PretrainedConfig) -> RopeSettings:
    """RoPE settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`
    (transformers 4); a later source overrides an earlier one key by key."""
    params: dict[str, object] = {}
    legacy_theta = getattr(hf_config, "rope_theta", None)
    if legacy_theta is not None:
        params["rope_theta"] = legacy_theta
    for source in ("rope_scaling", "rope_parameters"):
        value = getattr(hf_config, source, None)
        if isinstance(value, dict):
            params.update(value)
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:  # type: ignore[arg-type]
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    theta = float(params.get("rope_theta", 10000.0))  # type: ignore[arg-type]
    if rope_type == "default":
        return RopeSettings(theta=theta)
    # transformers defaults the pre-scaling context to max_position_embeddings; so do we.
    params.setdefault("original_max_position_embeddings",
                      getattr(hf_config, "max_position_embeddings", None))
    missing = [key for key in _LLAMA3_KEYS if params.get(key) is None]
    if missing:
        raise UnsupportedModelError(f"llama3 rope parameters lack {missing}")
    return RopeSettings(
        theta=theta, rope_type=rope_type, factor=float(params["factor"]),  # type: ignore[arg-type]
        low_freq_factor=float(params["low_freq_factor"]),  # type: ignore[arg-type]
        high_freq_factor=float(params["high_freq_factor"]),  # type: ignore[arg-type]
        original_max_position_embeddings=int(
            params["original_max_position_embeddings"]),  # type: ignore[call-overload]
    )


def inverse_frequencies(head_dim: int, settings: RopeSettings) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, computed exactly as transformers does so
    fp32 outputs match it bit for bit."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (settings.theta ** exponents)
    if settings.rope_type == "llama3":
        inv_freq = _llama3_adjust(inv_freq, settings)
    return inv_freq


def _llama3_adjust(inv_freq: torch.Tensor, s: RopeSettings) -> torch.Tensor:
    """Llama 3.1 schedule: long wavelengths divided by `factor`, short ones kept, and a smooth
    interpolation between the two bands."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table for positions [0, max_position) and looks rows up by position.

    The table is built on the host in float32 even when the module is constructed on the meta
    device (the loader does that to avoid allocating weights twice), so it is always real; the
    loader moves it to the target device. One instance serves every layer."""

    cos_sin_cache: torch.Tensor  # [max_position, head_dim]: cos then sin halves, float32

    def __init__(self, head_dim: int, max_position: int, settings: RopeSettings) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, settings)  # [head_dim // 2]
        steps = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = steps[:, None] * inv_freq[None, :]  # [max_position, head_dim // 2]
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_position, head_dim]
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)
        self.max_position = max_position

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, cos) and (-sin, sin) for each token, each [num_tokens, 1, head_dim], in
        `dtype`: the factors `apply_rotary` multiplies x and its swapped halves by. Built once
        a step for every layer."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        cos_full = torch.cat((cos, cos), dim=-1).to(dtype)  # [num_tokens, head_dim]
        sin_signed = torch.cat((-sin, sin), dim=-1).to(dtype)
        return cos_full.unsqueeze(1), sin_signed.unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor
                 ) -> torch.Tensor:
    """Neox-style (rotate-half) RoPE on x [num_tokens, num_heads, head_dim], as HF Llama does:
    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) is the half-swap (x2, x1)
    times the signs folded into sin_signed. Bit-identical to HF's form, in four ops (no
    chunk/cat per call), and it takes q and k together as one [num_tokens, heads, dim] view."""
    swapped = torch.roll(x, shifts=x.shape[-1] // 2, dims=-1)  # (x2, x1)
    return x * cos_full + swapped * sin_signed

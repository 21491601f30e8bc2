"""Rotary position embeddings (RoPE): settings read from an HF config, the `default`, `linear`,
`dynamic`, `yarn` and `llama3` frequency schedules, a precomputed cos/sin table indexed by
absolute position."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from engine.errors import UnsupportedModelError
from engine.kernels.native import loaded_library, native_library

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")
# types whose pre-scaling context transformers fills in from the config (standardize_rope_params)
_ORIGINAL_CONTEXT_TYPES = ("llama3", "yarn")


@dataclass(frozen=True, slots=True)
class RopeSettings:
    """A RoPE schedule as read from the config. `attention_factor` multiplies the whole cos/sin
    table (yarn's mscale); `scaled_max_position` is the context linear/dynamic/yarn scaling
    stretches the model to (0: none, max_position_embeddings stands)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0
    scaled_max_position: int = 0


def rope_settings(hf_config: transformers.PretrainedConfig) -> RopeSettings:
    """RoPE settings from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`
    (transformers 4); a later source overrides an earlier one key by key."""
    params = _rope_parameters(hf_config)
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if _number(params, "partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    theta = _number(params, "rope_theta", 10000.0)
    if rope_type == "default":
        return RopeSettings(theta=theta)
    max_position = getattr(hf_config, "max_position_embeddings", None)
    if rope_type in _ORIGINAL_CONTEXT_TYPES:
        # as transformers does: a top-level original_max_position_embeddings (Phi-3 style) wins
        # over the rope parameters' own, and max_position_embeddings is the fallback.
        top_level = getattr(hf_config, "original_max_position_embeddings", None)
        if top_level is not None:
            params["original_max_position_embeddings"] = top_level
        params.setdefault("original_max_position_embeddings", max_position)
    return _SCALED_SETTINGS[rope_type](params, theta, max_position)


def _rope_parameters(hf_config: transformers.PretrainedConfig) -> dict[str, object]:
    params: dict[str, object] = {}
    legacy_theta = getattr(hf_config, "rope_theta", None)
    if legacy_theta is not None:
        params["rope_theta"] = legacy_theta
    for source in ("rope_scaling", "rope_parameters"):
        value = getattr(hf_config, source, None)
        if isinstance(value, dict):
            params.update(value)
    return params


def _number(params: Mapping[str, object], key: str, default: float) -> float:
    """params[key] as a float; `default` when absent or null (config.json writes None as null)."""
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnsupportedModelError(f"rope parameter {key!r} must be a number, got {value!r}")
    return float(value)


def _required(params: Mapping[str, object], keys: tuple[str, ...], rope_type: str) -> None:
    missing = [key for key in keys if params.get(key) is None]
    if missing:
        raise UnsupportedModelError(f"{rope_type} rope parameters lack {missing}")


def _pre_scaling_context(max_position: int | None, rope_type: str) -> int:
    if max_position is None:
        raise UnsupportedModelError(f"{rope_type} rope needs max_position_embeddings")
    return int(max_position)


def _linear_settings(params: Mapping[str, object], theta: float, max_position: int | None
                     ) -> RopeSettings:
    """Position interpolation: every frequency divided by `factor`. As vLLM derives it, the
    config's max_position_embeddings is the pre-scaling context, stretched `factor` times."""
    _required(params, ("factor",), "linear")
    factor = _number(params, "factor", 1.0)
    original = _pre_scaling_context(max_position, "linear")
    return RopeSettings(theta=theta, rope_type="linear", factor=factor,
                        scaled_max_position=int(original * factor))


def _dynamic_settings(params: Mapping[str, object], theta: float, max_position: int | None
                      ) -> RopeSettings:
    """Dynamic NTK: a larger base; max_position_embeddings is the pre-scaling context (the
    length transformers' formula divides by), stretched `factor` times as vLLM derives it."""
    _required(params, ("factor",), "dynamic")
    factor = _number(params, "factor", 1.0)
    original = _pre_scaling_context(max_position, "dynamic")
    return RopeSettings(theta=theta, rope_type="dynamic", factor=factor,
                        original_max_position_embeddings=original,
                        scaled_max_position=int(original * factor))


def _llama3_settings(params: Mapping[str, object], theta: float, max_position: int | None
                     ) -> RopeSettings:
    """Llama 3.1 bands; the config's max_position_embeddings already counts the scaled context."""
    _required(params, _LLAMA3_KEYS, "llama3")
    return RopeSettings(
        theta=theta, rope_type="llama3", factor=_number(params, "factor", 1.0),
        low_freq_factor=_number(params, "low_freq_factor", 1.0),
        high_freq_factor=_number(params, "high_freq_factor", 4.0),
        original_max_position_embeddings=int(
            _number(params, "original_max_position_embeddings", 0)),
    )


def _yarn_settings(params: Mapping[str, object], theta: float, max_position: int | None
                   ) -> RopeSettings:
    """YaRN, read as transformers' _compute_yarn_parameters reads it: a null factor is the ratio
    of the two contexts (DeepSeek-V3 style); the scaled context is original * factor (vLLM),
    never shorter than max_position_embeddings."""
    _required(params, ("original_max_position_embeddings",), "yarn")
    original = int(_number(params, "original_max_position_embeddings", 0))
    if params.get("factor") is None and max_position is None:
        raise UnsupportedModelError("yarn rope parameters lack ['factor']")
    factor = _number(params, "factor", (max_position or 0) / original)
    attention_factor = params.get("attention_factor")
    return RopeSettings(
        theta=theta, rope_type="yarn", factor=factor,
        original_max_position_embeddings=original,
        beta_fast=_number(params, "beta_fast", 0.0) or 32.0,  # transformers: `or 32`, 0 too
        beta_slow=_number(params, "beta_slow", 0.0) or 1.0,
        truncate=bool(params.get("truncate", True)),
        attention_factor=(_yarn_attention_factor(factor, params) if attention_factor is None
                          else _number(params, "attention_factor", 1.0)),
        scaled_max_position=max(int(original * factor), int(max_position or 0)),
    )


def _yarn_attention_factor(factor: float, params: Mapping[str, object]) -> float:
    """YaRN's cos/sin scale 0.1 ln(factor) + 1; with both mscale and mscale_all_dim set
    (DeepSeek style), the ratio of the two such scales, each with its own coefficient."""
    mscale = _number(params, "mscale", 0.0)
    mscale_all_dim = _number(params, "mscale_all_dim", 0.0)
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


_SCALED_SETTINGS: dict[str, Callable[[dict[str, object], float, int | None], RopeSettings]] = {
    "linear": _linear_settings, "dynamic": _dynamic_settings,
    "llama3": _llama3_settings, "yarn": _yarn_settings,
}


def inverse_frequencies(head_dim: int, settings: RopeSettings) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies, computed exactly as transformers does so
    fp32 outputs match it bit for bit (dynamic: as vLLM does, see _dynamic_ntk_theta)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    theta = settings.theta
    if settings.rope_type == "dynamic":
        theta = _dynamic_ntk_theta(head_dim, settings)
    if settings.rope_type == "yarn":
        return _yarn_blend(theta ** exponents, head_dim, settings)
    inv_freq = 1.0 / (theta ** exponents)
    if settings.rope_type == "linear":
        # scaling positions by 1/factor (the original recipe) is the same as scaling frequencies
        inv_freq = inv_freq / settings.factor
    elif settings.rope_type == "llama3":
        inv_freq = _llama3_adjust(inv_freq, settings)
    return inv_freq


def _dynamic_ntk_theta(head_dim: int, s: RopeSettings) -> float:
    """The NTK-scaled base, as vLLM's DynamicNTKScalingRotaryEmbedding computes it: ONE base for
    the whole scaled context [0, max_len), the one transformers' _compute_dynamic_ntk_parameters
    gives at seq_len = max_len. transformers instead recomputes the base from the current length
    every forward: the plain base up to max_position_embeddings (so it is NOT ours inside the
    original context), then a base growing with the length. A position-indexed table shared by
    every sequence cannot follow each one's length (and cached keys keep the rotation they were
    written with), so outputs differ from transformers' short of a max_len-long sequence."""
    original = s.original_max_position_embeddings
    max_len = original * s.factor
    return s.theta * ((s.factor * max_len / original) - (s.factor - 1)) ** (
        head_dim / (head_dim - 2))


def _yarn_blend(base_powers: torch.Tensor, head_dim: int, s: RopeSettings) -> torch.Tensor:
    """YaRN: high frequencies (many rotations within the original context) kept, low ones
    interpolated by `factor`, a linear ramp between; base_powers [head_dim // 2] is theta^(2i/d).
    Same expressions in the same order as transformers' _compute_yarn_parameters."""
    low, high = _yarn_correction_range(head_dim, s)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    dims = torch.arange(head_dim // 2, dtype=torch.float32, device="cpu")
    ramp = torch.clamp((dims - low) / (high - low), 0, 1)  # 0 below low, 1 above high
    extrapolation_share = 1 - ramp
    interpolated = 1.0 / (s.factor * base_powers)
    extrapolated = 1.0 / base_powers
    return interpolated * (1 - extrapolation_share) + extrapolated * extrapolation_share


def _yarn_correction_range(head_dim: int, s: RopeSettings) -> tuple[float, float]:
    """[low, high] dimensions of the ramp: where a dimension turns beta_fast and beta_slow times
    within the original context; floored/ceiled unless `truncate` is false."""
    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(s.original_max_position_embeddings
                                    / (num_rotations * 2 * math.pi))) / (2 * math.log(s.theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


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
    """Holds the cos/sin table for positions [0, max_position) and looks rows up by position;
    the table covers at least settings.scaled_max_position, the context scaling extends to.

    The table is built on the host in float32 even when the module is constructed on the meta
    device (the loader does that to avoid allocating weights twice), so it is always real; the
    loader moves it to the target device. One instance serves every layer."""

    cos_sin_cache: torch.Tensor  # [max_position, head_dim]: cos then sin halves, float32

    def __init__(self, head_dim: int, max_position: int, settings: RopeSettings) -> None:
        super().__init__()
        max_position = max(max_position, settings.scaled_max_position)
        inv_freq = inverse_frequencies(head_dim, settings)  # [head_dim // 2]
        steps = torch.arange(max_position, dtype=torch.float32, device="cpu")
        freqs = steps[:, None] * inv_freq[None, :]  # [max_position, head_dim // 2]
        cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_position, head_dim]
        if settings.attention_factor != 1.0:
            cos_sin = cos_sin * settings.attention_factor  # yarn: transformers scales cos and sin
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)
        self.max_position = max_position
        # dtype -> every position's two factors, [max_position, 1, head_dim] each, made once
        self._factor_tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, cos) and (-sin, sin) for each token, each [num_tokens, 1, head_dim], in
        `dtype`: the factors `apply_rotary` multiplies x and its swapped halves by. Built once
        a step for every layer. On the host they are looked up whole in tables made on first
        use (two ops: at one stream the eight below cost ~80 us a step, the caches cold from
        the weights' stream); on a device, where steps may be captured graphs, they are
        built per call."""
        if positions.is_cpu and self.cos_sin_cache.is_cpu:
            tables = self._factor_tables.get(dtype)
            if tables is None:
                cos_table, sin_table = self._factors(self.cos_sin_cache, dtype)
                tables = self._factor_tables[dtype] = (cos_table.unsqueeze(1),
                                                       sin_table.unsqueeze(1))
            return tables[0].index_select(0, positions), tables[1].index_select(0, positions)
        cos_full, sin_signed = self._factors(self.cos_sin_cache.index_select(0, positions),
                                             dtype)
        return cos_full.unsqueeze(1), sin_signed.unsqueeze(1)

    @staticmethod
    def _factors(cos_sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, cos) and (-sin, sin) [n, head_dim] in `dtype` from rows of cos_sin_cache."""
        cos, sin = cos_sin.chunk(2, dim=-1)
        return (torch.cat((cos, cos), dim=-1).to(dtype),
                torch.cat((-sin, sin), dim=-1).to(dtype))


def apply_rotary(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor
                 ) -> torch.Tensor:
    """Neox-style (rotate-half) RoPE on x [num_tokens, num_heads, head_dim], as HF Llama does:
    x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) is the half-swap (x2, x1)
    times the signs folded into sin_signed. Bit-identical to HF's form, in four ops (no
    chunk/cat per call), and it takes q and k together as one [num_tokens, heads, dim] view."""
    if _takes_native(x, cos_full, sin_signed):
        return apply_rotary_native(x, cos_full, sin_signed)
    return apply_rotary_reference(x, cos_full, sin_signed)


def apply_rotary_reference(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor
                           ) -> torch.Tensor:
    """`apply_rotary` in torch ops: any dtype and device, and the native kernel's oracle."""
    swapped = torch.roll(x, shifts=x.shape[-1] // 2, dims=-1)  # (x2, x1)
    return x * cos_full + swapped * sin_signed


def apply_rotary_native(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor
                        ) -> torch.Tensor:
    """`apply_rotary` in one native call (bf16 on CPU, the same three roundings), reading x
    in place where its tokens are strided (q and k as a view into the fused qkv output): at
    one decode token, ~2 us against ~15 for the four torch ops."""
    num_tokens, num_heads, head_dim = x.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=x.dtype)
    loaded_library().rope_bf16(x.data_ptr(), num_tokens, num_heads, head_dim, x.stride(0),
                               cos_full.data_ptr(), sin_signed.data_ptr(), out.data_ptr(),
                               torch.get_num_threads())
    return out


def _takes_native(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor) -> bool:
    """rope_bf16's conditions: bf16 on CPU, halves of whole 16-lane vectors, heads contiguous
    within a token (tokens may be strided), one factor row per token."""
    return (x.dtype == torch.bfloat16 and x.is_cpu and x.dim() == 3
            and x.shape[-1] % 32 == 0 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
            and x.shape[0] == cos_full.shape[0] and cos_full.is_cpu
            and cos_full.dtype == sin_signed.dtype == torch.bfloat16
            and cos_full.is_contiguous() and sin_signed.is_contiguous()
            and native_library() is not None)

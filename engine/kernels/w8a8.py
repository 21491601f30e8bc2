"""Weight-int8 linear layers for CPU decode: weights quantized once per output row, activations
per row and per block of 64 columns on every call, products summed exactly in int32 by AVX-512
VNNI (w8a8_cpu.c explains the arithmetic). `reference_linear` is the same arithmetic in torch:
the fallback where the native kernel cannot be built, and the oracle its tests compare with."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BLOCK = 64  # activation columns per scale; K must be a multiple (w8a8_cpu.c's BLOCK)
SOURCE = Path(__file__).with_name("w8a8_cpu.c")
CFLAGS = ("-O3", "-march=x86-64-v4", "-mavx512vnni", "-fopenmp", "-shared", "-fPIC")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni")
_QUANTIZE_ROWS = 8192  # rows quantized at a time: bounds the float32 copy of a large head
# From this many rows (prefill) the matmul is compute-bound, and oneDNN's bf16 matmul over the
# weight dequantized for the call beats the int8 tiles (measured 1.2-1.3x at 1024-2048 rows);
# below it (decode) the int8 kernel's halved weight traffic wins.
DEQUANTIZE_MIN_ROWS = 256


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """W [N, K] as bytes round(W / scale) + 128 (in [1, 255]) and one float32 scale per row."""

    data: torch.Tensor  # [N, K] uint8
    scales: torch.Tensor  # [N] float32

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.data.shape[1]

    def dequantize(self) -> torch.Tensor:
        return (self.data.float() - 128) * self.scales[:, None]


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
    """`linear`'s arithmetic in torch. Decode-sized batches: int8 activations per block, and
    every per-block dot product of int8 values is exact in float32 (|sum| <= 64 * 127 * 127
    < 2**24), so only the scaling rounds. From DEQUANTIZE_MIN_ROWS rows: a float matmul over
    the dequantized weight."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if flat.shape[0] >= DEQUANTIZE_MIN_ROWS:
        out = torch.nn.functional.linear(flat.float(), weight.dequantize(), bias)
        return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])
    values, scales = quantize_activations(flat)
    wq = (weight.data.float() - 128).reshape(weight.shape[0], -1, BLOCK)
    out = torch.zeros(flat.shape[0], weight.shape[0], dtype=torch.float32)
    for b in range(values.shape[1]):
        out += (values[:, b] @ wq[:, b].T) * scales[:, b]
    out *= weight.scales
    if bias is not None:
        out += bias
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias with W int8 (`bias`: float32 or None); x any float dtype on CPU."""
    lib = native_library()
    if lib is None:
        return reference_linear(x, weight, bias)
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if flat.dtype != torch.bfloat16 or not flat.is_contiguous():
        flat = flat.to(torch.bfloat16).contiguous()
    num_rows, in_features = flat.shape
    out_features = weight.shape[0]
    if num_rows >= DEQUANTIZE_MIN_ROWS:
        dense = torch.empty(out_features, in_features, dtype=torch.bfloat16)
        lib.w8_dequantize(weight.data.data_ptr(), weight.scales.data_ptr(), out_features,
                          in_features, dense.data_ptr(), torch.get_num_threads())
        out = torch.nn.functional.linear(flat, dense, None if bias is None else bias.to(
            torch.bfloat16))
        return out.to(x.dtype).reshape(*shape[:-1], out_features)
    out = torch.empty(num_rows, out_features, dtype=torch.bfloat16)
    status = lib.w8a8_linear(flat.data_ptr(), num_rows, in_features, weight.data.data_ptr(),
                             weight.scales.data_ptr(),
                             bias.data_ptr() if bias is not None else None,
                             out_features, out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("w8a8_linear could not allocate its activation scratch")
    return out.to(x.dtype).reshape(*shape[:-1], out_features)


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None (with the reason logged once) where this
    machine cannot run or build it."""
    reason = _unsupported_reason()
    if reason is not None:
        logger.warning("int8 kernel: %s; using the torch implementation (slower)", reason)
        return None
    try:
        path = _build()
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("int8 kernel: build failed (%s); using the torch implementation (slower)",
                       str(detail).strip()[:500])
        return None
    lib = ctypes.CDLL(str(path))  # torch is loaded first, so both share one libgomp
    lib.w8a8_linear.restype = ctypes.c_int
    lib.w8a8_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.w8_dequantize.restype = None
    lib.w8_dequantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib


def _unsupported_reason() -> str | None:
    if os.environ.get("PAGEDSERVE_NATIVE_KERNELS", "1") == "0":
        return "native kernels turned off by PAGEDSERVE_NATIVE_KERNELS=0"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"needs Linux on x86-64, this is {sys.platform} on {platform.machine()}"
    flags = _cpu_flags()
    missing = [flag for flag in CPU_FLAGS if flag not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C compiler found (set CC, or install gcc)"
    return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _build() -> Path:
    from engine.gguf import cache_root, file_lock  # the model cache's root and lock

    compiler = _compiler()
    assert compiler is not None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler, *CFLAGS)).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"w8a8-{digest}.so"
    if target.exists():
        return target
    with file_lock(target.with_suffix(".lock")):
        if target.exists():  # another process built it while we waited
            return target
        logger.info("int8 kernel: compiling %s with %s (once)", SOURCE.name, compiler)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *CFLAGS, "-o", str(built), str(SOURCE)], check=True,
                           capture_output=True, text=True, timeout=120)
            built.replace(target)
    return target

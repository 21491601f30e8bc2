"""Builds and loads cpu_portable.c: kernels in plain C that the compiler vectorizes for the
CPU it runs on (-march=native), so they need no particular instruction set: the float32 paged
decode attention, the weight-int4 linears for decode (int8 or float32 activations) and the
int4 dequantize of prefill, and the weight-int8 linear for decode on CPUs without AVX-512.
Built once per source version and CPU into the cache directory, as native.py builds the
AVX-512 ones. Where it cannot be built (no compiler, not Linux, or
PAGEDSERVE_NATIVE_KERNELS=0), `portable_library()` is None and callers use torch."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from pathlib import Path

import torch

from engine.kernels.native import build, find_compiler, load_library
from engine.runtime import cpu_flags

SOURCE = Path(__file__).with_name("cpu_portable.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# name -> (restype, argtypes), as declared in cpu_portable.c
SIGNATURES = {
    "paged_decode_attention_f32": (ctypes.c_int, [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64,
                                                  _I64, _I64, _F32, _P, _I32]),
    "int4_linear_f32": (ctypes.c_int, [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P,
                                       _I32]),
    "int4_linear_q8": (ctypes.c_int, [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _I32]),
    "int4_dequantize_f32": (ctypes.c_int, [_P, _P, _P, _I64, _I64, _I64, _P, _I32]),
    "w8a8_linear_f32": (ctypes.c_int, [_P, _I64, _I64, _P, _P, _P, _I64, _P, _I32]),
    "kv_cache_write": (ctypes.c_int, [_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _I64]),
}
INT4_MAX_ROWS = 16  # the int4 kernel's most activation rows (INT4_MAX_ROWS in the C source)


@functools.cache
def portable_library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (with the reason logged once) where
    this machine cannot build them."""
    # -march=native code runs on this CPU only: its model and flags are part of the key
    salt = f"{platform.processor()} {' '.join(sorted(cpu_flags()))}"
    return load_library("portable CPU kernels", unsupported_reason(),
                        lambda: build(SOURCE, CFLAGS, name="cpu-portable", salt=salt),
                        SIGNATURES)


def takes_f32(*tensors: torch.Tensor) -> bool:
    """Whether the float32 kernels can run on these tensors: contiguous float32 on the CPU,
    and the library available here."""
    for tensor in tensors:  # as takes_bf16
        if tensor.dtype != torch.float32 or not tensor.is_cpu or not tensor.is_contiguous():
            return False
    return portable_library() is not None


def unsupported_reason() -> str | None:
    if os.environ.get("PAGEDSERVE_NATIVE_KERNELS", "1") == "0":
        return "turned off by PAGEDSERVE_NATIVE_KERNELS=0"
    if sys.platform != "linux":
        return f"they need Linux, this is {sys.platform}"
    if find_compiler() is None:
        return "no C compiler found (set CC, or install gcc)"
    return None

"""Builds and loads cpu_kernels.c (int8 matmul; RMSNorm, SwiGLU, decode attention): once per
source version, with the system compiler, into the cache directory; called through ctypes (no
torch headers, so the build takes a second). Where it cannot be built or run (no compiler, not
x86-64, a CPU without AVX-512 VNNI, or PAGEDSERVE_NATIVE_KERNELS=0), `native_library()` is
None and callers use torch."""

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch  # loaded before the kernels, so they share its libgomp

from engine.cache_dir import cache_root, file_lock
from engine.progress import stage
from engine.runtime import cpu_family, cpu_flags

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
CFLAGS = ("-O3", "-march=x86-64-v4", "-mavx512vnni", "-fopenmp", "-shared", "-fPIC")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni")
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# name -> (restype, argtypes), as declared in cpu_kernels.c
SIGNATURES = {
    "w8a8_linear": (ctypes.c_int, [_P, _I64, _I64, _P, _P, _P, _I64, _P, _I32]),
    "w8_dequantize": (None, [_P, _P, _I64, _I64, _P, _I32]),
    "w8_dequantize_columns": (None, [_P, _P, _I64, _I64, _P, _I32]),
    "rope_bf16": (None, [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _I32]),
    "w8_pack_columns": (None, [_P, _I64, _I64, _P, _I32]),
    "w8a8_gemm": (ctypes.c_int, [_P, _I64, _I64, _P, _P, _P, _I64, _P, _I32]),
    "int4_pack_columns": (None, [_P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _I32]),
    "int4_gemm_q8": (ctypes.c_int, [_P, _I64, _I64, _P, _P, _P, _I64, _I64, _P, _I32,
                                     _I32, _I32]),
    # x, M, K, w, Kp, bias, N, y, stream (prefetch kind), threads
    "bf16_packed_linear": (ctypes.c_int, [_P, _I64, _I64, _P, _I64, _P, _I64, _P, _I32,
                                          _I32]),
    "bf16_packed_linear_f32": (ctypes.c_int, [_P, _I64, _I64, _P, _I64, _P, _I64, _P, _I32,
                                              _I32]),  # the same, y float32
    "rms_norm_bf16": (None, [_P, _P, _I64, _I64, _F32, _P, _I32]),
    # ids, M, table, scales, num_rows, E, out
    "embed_int8_rows": (ctypes.c_int, [_P, _I64, _P, _P, _I64, _I64, _P]),
    "silu_and_mul_bf16": (None, [_P, _I64, _I64, _P, _I32]),
    "paged_decode_attention_bf16": (ctypes.c_int, [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64,
                                                   _I64, _I64, _F32, _P, _I32]),
    "paged_prefill_attention_bf16": (ctypes.c_int, [_P, _P, _P, _P, _I64, _I64, _I64, _I64,
                                                    _I64, _I64, _F32, _P, _I32]),
    # layers (an array of q_decoder_layer_t: engine/models/native_decode.py), L, hidden, M,
    # E, H, KVH, D, I, cos, sin, slots, num_slots, block tables, lens, BS, W, scale, final
    # norm (or None), its eps, stream, threads
    "llama_decode_layers": (ctypes.c_int, [_P, _I64, _P, _I64, _I64, _I64, _I64, _I64,
                                              _I64, _P, _P, _P, _I64, _P, _P, _I64, _I64,
                                              _F32, _P, _F32, _I32, _I32]),
    # qkv, M, H, KVH, D, cos, sin, slots, num_slots, k cache, v cache, block tables, lens, BS,
    # W, scale, attn, threads
    "llama_decode_attention": (ctypes.c_int, [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _I64, _P,
                                              _P, _P, _P, _I64, _I64, _F32, _P, _I32]),
    "add_rms_norm_bf16": (None, [_P, _P, _P, _I64, _I64, _F32, _P, _I32]),
    # x, M, N, out
    "argmax_rows_f32": (None, [_P, _I64, _I64, _P]),
}


@functools.cache
def native_library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (with the reason logged once) where
    this machine cannot run or build them."""
    lib = load_library("native CPU kernels", unsupported_reason(), build, SIGNATURES)
    if lib is not None:
        stream_prefetch()  # chosen, and logged, with the library's load
    return lib


Signatures = Mapping[str, tuple[object, Sequence[object]]]


def load_library(label: str, reason: str | None, build_it: Callable[[], Path],
                 signatures: Signatures) -> ctypes.CDLL | None:
    """Build (unless `reason` says this machine can't) and load a kernel library, its
    functions typed from `signatures`; None, with the reason logged once, where it fails."""
    if reason is not None:
        logger.warning("%s: %s; using torch implementations (slower)", label, reason)
        return None
    try:
        path = build_it()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("%s: build failed (%s); using torch implementations (slower)", label,
                       str(detail).strip()[:500])
        return None
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    logger.info("%s: %s", label, path)
    return lib


def takes_bf16(*tensors: torch.Tensor) -> bool:
    """Whether the bf16 kernels can run on these tensors: contiguous bf16 on the CPU, and the
    library available here."""
    # a plain loop and is_cpu: called several times a layer, this costs 0.4 us, not 1.2
    for tensor in tensors:
        if tensor.dtype != torch.bfloat16 or not tensor.is_cpu or not tensor.is_contiguous():
            return False
    return native_library() is not None


# cpu_kernels.c's prefetch kinds for weights that one pass reads once (one-row decode)
PREFETCH_L2, PREFETCH_NTA = 1, 2
STREAM_PREFETCH_ENV = "PAGEDSERVE_STREAM_PREFETCH"  # "l2" or "nta": A/B benchmarks
_STREAM_PREFETCH_NAMES = {"l2": PREFETCH_L2, "nta": PREFETCH_NTA}
ZEN5 = ("AuthenticAMD", 26)  # vendor, family: Zen 5 (family 25 is Zen 3 and 4)


@functools.cache
def stream_prefetch() -> int:
    """Where the matmul kernels prefetch weights read once: non-temporal into L1 on Zen 5,
    into L2 elsewhere. The same loop runs 1.1x faster on Zen 5 with the first, and 1.26x
    faster on Zen 4 with the second (cpu_kernels.c: prefetch_line); other CPUs take L2, the
    usual target of a streaming prefetch. PAGEDSERVE_STREAM_PREFETCH=l2|nta overrides it."""
    chosen = os.environ.get(STREAM_PREFETCH_ENV, "").strip().lower()
    if chosen not in _STREAM_PREFETCH_NAMES:
        if chosen:
            logger.warning("%s=%s: not one of %s; choosing by CPU", STREAM_PREFETCH_ENV,
                           chosen, ", ".join(_STREAM_PREFETCH_NAMES))
        chosen = "nta" if cpu_family() == ZEN5 else "l2"
    logger.info("native CPU kernels: weights read once are prefetched %s",
                "non-temporally into L1" if chosen == "nta" else "into L2")
    return _STREAM_PREFETCH_NAMES[chosen]


@functools.cache
def has_bf16_dot_products() -> bool:
    """Whether this CPU has AVX512-BF16 (vdpbf16ps), which paged_prefill_attention_bf16 needs
    beyond the library's own flags."""
    return "avx512_bf16" in cpu_flags()


def loaded_library() -> ctypes.CDLL:
    """The library, for callers that checked it is available (`takes_bf16`)."""
    lib = native_library()
    assert lib is not None, "native CPU kernels unavailable"
    return lib


def unsupported_reason() -> str | None:
    if os.environ.get("PAGEDSERVE_NATIVE_KERNELS", "1") == "0":
        return "turned off by PAGEDSERVE_NATIVE_KERNELS=0"
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"they need Linux on x86-64, this is {sys.platform} on {platform.machine()}"
    flags = cpu_flags()
    missing = [flag for flag in CPU_FLAGS if flag not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if find_compiler() is None:
        return "no C compiler found (set CC, or install gcc)"
    return None


def find_compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def build(source_path: Path = SOURCE, cflags: tuple[str, ...] = CFLAGS,
          name: str = "cpu-kernels", salt: str = "") -> Path:
    """The shared library for the current source and flags (and `salt`: what else the build
    depends on, e.g. the CPU that -march=native targets), compiled unless cached."""
    compiler = find_compiler()
    assert compiler is not None
    source = source_path.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler, *cflags, salt)).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"{name}-{digest}.so"
    if target.exists():
        return target
    with file_lock(target.with_suffix(".lock")):
        if target.exists():  # another process built it while we waited
            return target
        with (stage(f"compiling {source_path.name}") as progress,
              tempfile.TemporaryDirectory(dir=target.parent) as scratch):
            built = Path(scratch) / target.name
            subprocess.run([compiler, *cflags, "-o", str(built), str(source_path)], check=True,
                           capture_output=True, text=True, timeout=120)
            built.replace(target)
        logger.info("native CPU kernels: compiled %s with %s in %.1f s (once)", source_path.name,
                    compiler, progress.seconds)
    return target

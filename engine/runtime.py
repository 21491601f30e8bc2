"""The process's compute runtime: which device and dtype to run in, the intra-op threads used
while setting up, handing the heap's freed pages back to the OS afterwards, and keeping the
steps' buffers resident from then on."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Iterator

import torch
import transformers

from engine.errors import InvalidRequestError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA when available, else CPU; an explicit CUDA request must be satisfiable."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise InvalidRequestError(f"unknown device {device!r}", param="device") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' requested but CUDA is not available",
                                  param="device")
    return resolved


# CPU flags of native bf16 matmuls (oneDNN runs them at full rate); without them bf16 is
# emulated in fp32 arithmetic: half the weight bytes, but slower prefill than float32
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str, hf_config: transformers.PretrainedConfig,
                  device: torch.device, cpu_native_bf16: bool | None = None) -> torch.dtype:
    """Explicit dtypes are honored. "auto" takes the checkpoint's dtype (float32 when it
    names none we support), except on CPU: float16 becomes bfloat16 (CPU fp16 matmuls are
    slow), and float32 becomes bfloat16 where the CPU computes bf16 natively
    (`cpu_native_bf16`, probed from the CPU's flags when None), as vLLM does: half the bytes
    per decoded token, at the fidelity every bf16 checkpoint is served with."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise InvalidRequestError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, "
                                      f"got {dtype!r}", param="dtype")
        return _DTYPES[dtype]
    resolved = _config_dtype(hf_config) or torch.float32
    if device.type != "cpu":
        return resolved
    if resolved == torch.float16:
        return torch.bfloat16
    if cpu_native_bf16 is None:
        cpu_native_bf16 = bool(NATIVE_BF16_FLAGS & cpu_flags())
    return torch.bfloat16 if cpu_native_bf16 else resolved


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_family() -> tuple[str, int] | None:
    """The CPU's vendor and family from /proc/cpuinfo ("AuthenticAMD", 26), or None."""
    vendor, family = _cpuinfo_field("vendor_id"), _cpuinfo_field("cpu family")
    return (vendor, int(family)) if vendor and family and family.isdigit() else None


def _cpuinfo_field(name: str) -> str | None:
    """The first processor's value of `name` in /proc/cpuinfo; None where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def _config_dtype(hf_config: transformers.PretrainedConfig) -> torch.dtype | None:
    # transformers 5 calls it `dtype`, 4 `torch_dtype`; either a string or a torch.dtype.
    for attr in ("dtype", "torch_dtype"):
        value = getattr(hf_config, attr, None)
        if isinstance(value, str):
            value = _DTYPES.get(value.removeprefix("torch."))
        if value in _DTYPES.values():
            return value
    return None


@contextlib.contextmanager
def single_threaded_setup() -> Iterator[None]:
    """Run the enclosed torch work on one intra-op thread; the global count is left as it was.

    libgomp keeps an OpenMP thread team for every thread that ever ran a parallel region, for
    as long as that thread lives. Once there are more team threads than cores it stops
    spinning between regions, so every matmul of a decode step pays a futex wake-up: 15-35%
    slower steps on 2 cores. Setup usually runs in a helper thread that outlives it
    (asyncio.to_thread), so setup must not start a team: the thread that steps the engine
    should own the only one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)  # no team is started until a parallel region runs


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc only; a no-op elsewhere). Loading
    frees read buffers and, when prepacking, every dense weight; glibc would otherwise keep
    ~50 MB of that counted in our RSS for the life of the process."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# "0" leaves glibc's malloc thresholds alone (A/B benchmarks)
HEAP_TUNING_ENV = "PAGEDSERVE_HEAP_TUNING"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit
TRIM_THRESHOLD = 256 << 20


def keep_step_buffers_resident() -> bool:
    """Serve a step's large transient tensors (activations, logits, attention outputs: up to
    tens of MB) from the heap instead of a fresh mmap each: glibc maps every allocation over
    its threshold anew, so each one page-faults and zeroes all its pages, and it gives the
    heap's free top back to the OS past the trim threshold, to fault it in again next step.
    glibc raises the threshold by itself once such a buffer is freed, but only after the
    first steps have paid: the first 1k-token prefill after start took 89k minor page faults
    (6.2 s) without this and 1.4k (5.75 s) with it (fp32, 0.5B model, 2 cores); later ones
    are level. Keeps allocations up to 32 MB on the heap and up to 256 MB of it free. Called
    after loading, whose freed buffers `release_free_heap` has already returned. True when
    set (glibc on Linux, not turned off by PAGEDSERVE_HEAP_TUNING=0)."""
    if sys.platform != "linux" or os.environ.get(HEAP_TUNING_ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    done = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if not done:
        logger.warning("could not raise malloc's mmap/trim thresholds; large step buffers "
                       "will be mapped afresh each step (slower on CPU)")
    return done

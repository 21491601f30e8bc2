"""The process's compute runtime: which device and dtype to run in, the intra-op threads used
while setting up, handing the heap's freed pages back to the OS afterwards, keeping the steps'
buffers resident from then on, and the weights on huge pages."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import sys
from collections.abc import Iterable, Iterator

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


# "0" leaves the matmul weights on the pages they were loaded into (A/B benchmarks)
HUGE_PAGES_ENV = "PAGEDSERVE_HUGE_PAGES"
HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
_MADV_COLLAPSE = 25  # <linux/mman.h>, Linux 6.1 and later


def huge_pages_allowed() -> bool:
    """Whether the weights may be moved onto huge pages: Linux, and not turned off by
    PAGEDSERVE_HUGE_PAGES=0."""
    return sys.platform == "linux" and os.environ.get(HUGE_PAGES_ENV, "1") != "0"


def collapse_into_huge_pages(regions: Iterable[tuple[int, int]]) -> int | None:
    """Move the memory under `regions` ((address, bytes): the weights a decode step streams)
    onto 2 MB transparent huge pages, in place: madvise(MADV_COLLAPSE) has the kernel copy
    each 2 MB stretch into one huge page, contents and addresses unchanged. Loading leaves
    the weights on 4 KB pages spread over physical memory, and a one-row matmul streams them
    slower from there: with the default model's bf16 weights collapsed, a decode step took
    0.955x the time of an uncollapsed copy's (two engines in one process, 8 paired rounds,
    Zen 4; 0.999x before), and the one-row matmuls alone 0.91x when the machine's read
    bandwidth was high (README, "Weights on 2 MB pages"). Each region is widened to whole
    huge pages within its mapping, so neighbours sharing a page with it (mostly other
    weights) come along, and the few of their pages not yet in memory are filled (13 MB
    over the default model's 1.2 GB). Only what is mapped now changes: nothing asks huge
    pages of later allocations, whose faults would then wait on memory compaction (a step's
    buffers).
    Returns the bytes the process gained on huge pages, or None where it was not tried: not
    Linux, PAGEDSERVE_HUGE_PAGES=0, or a kernel without MADV_COLLAPSE (before 6.1)."""
    if not huge_pages_allowed():
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    try:
        before, mappings = _anonymous_huge_bytes(), _anonymous_mappings()
    except OSError:  # no /proc (a sandbox): nothing to go by
        return None
    for start, end in huge_page_spans(regions, mappings):
        if madvise(start, end - start, _MADV_COLLAPSE) != 0 and ctypes.get_errno() in (
                errno.EINVAL, errno.EPERM):  # no MADV_COLLAPSE here, or THP turned off
            if _anonymous_huge_bytes() == before:
                return None
            break
        # EAGAIN or ENOMEM: no huge page to be had for some stretch just now; best effort
    return _anonymous_huge_bytes() - before


def huge_page_spans(regions: Iterable[tuple[int, int]],
                    mappings: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The [start, end) stretches of whole huge pages to collapse for `regions`: each region
    widened to huge-page boundaries, cut to the mappings it overlaps (`mappings`: [start,
    end) each) and narrowed to whole huge pages inside each; sorted, touching ones merged."""
    spans = []
    for address, nbytes in regions:
        if nbytes <= 0:
            continue
        start = address // HUGE_PAGE * HUGE_PAGE
        end = -(-(address + nbytes) // HUGE_PAGE) * HUGE_PAGE
        for low, high in mappings:
            first = -(-max(start, low) // HUGE_PAGE) * HUGE_PAGE
            last = min(end, high) // HUGE_PAGE * HUGE_PAGE
            if first < last:
                spans.append((first, last))
    merged: list[tuple[int, int]] = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _anonymous_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process's private anonymous read-write mappings (the heap
    included), from /proc/self/maps: where weights live, and the only memory collapsed."""
    mappings = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            span, perms, inode = fields[0], fields[1], fields[4]
            name = fields[5] if len(fields) > 5 else ""
            if (inode == "0" and perms.startswith("rw") and perms.endswith("p")
                    and name in ("", "[heap]")):
                low, high = span.split("-")
                mappings.append((int(low, 16), int(high, 16)))
    return mappings


def _anonymous_huge_bytes() -> int:
    """Bytes of this process's anonymous memory on transparent huge pages."""
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    return 0

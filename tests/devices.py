"""The device engine tests run on: `pytest --device cuda` (or PAGEDSERVE_TEST_DEVICE=cuda, as
bench/gpu_check.py sets it) moves them to a GPU; the default is the CPU that CI has."""

from __future__ import annotations

import os

import pytest

DEVICE_ENV = "PAGEDSERVE_TEST_DEVICE"
TEST_DEVICE = os.environ.get(DEVICE_ENV, "cpu")
GPU_NUM_BLOCKS = 512  # per engine on a GPU: tiny models, many engines per test process

cpu_only = pytest.mark.skipif(TEST_DEVICE != "cpu",
                              reason=f"CPU-specific code path ({DEVICE_ENV}={TEST_DEVICE})")


def device_args(**engine_args: object) -> dict[str, object]:
    """Engine args on the test device. On a GPU every engine would otherwise take 90% of its
    memory for KV blocks, so engines there get a fixed small pool unless the test sets one."""
    args: dict[str, object] = {"device": TEST_DEVICE, **engine_args}
    if TEST_DEVICE == "cuda":
        args.setdefault("num_blocks", GPU_NUM_BLOCKS)
    return args

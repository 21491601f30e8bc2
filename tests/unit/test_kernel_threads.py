"""The native matmul kernels split their weight blocks into balanced shares (cpu_kernels.c:
shares_next): a thread that runs out of its own takes the last blocks of another's. Each
block is still summed whole by one thread, so the thread count changes no bit: fewer blocks
than threads, shares that are stolen from, one thread alone and more than the machine has
all give the one-thread product."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from engine.kernels import native, packed_bf16, w4a16, w8a8
from engine.layers.linear import can_prepack
from tests.devices import cpu_only
from tests.unit.test_packed_bf16 import packed_case

pytestmark = [
    cpu_only,
    pytest.mark.skipif(native.native_library() is None,
                       reason=f"native kernels unavailable here: {native.unsupported_reason()}"),
]

THREAD_COUNTS = (2, 3, 5, 16, 64)


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _same_bits_at_every_thread_count(run: Callable[[], torch.Tensor]) -> None:
    with _threads(1):
        alone = run()
    for count in THREAD_COUNTS:
        with _threads(count):
            for _ in range(3):  # who steals what differs from call to call
                assert torch.equal(run(), alone), count


# (out_features, in_features): one block, a few, and enough that shares are stolen from
SHAPES = [(64, 128), (200, 256), (1152, 896), (5000, 128)]


@pytest.mark.skipif(not can_prepack(torch.bfloat16, torch.device("cpu"))
                    or not native.has_bf16_dot_products(),
                    reason="needs oneDNN bf16 and AVX512-BF16")
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("num_rows", [1, 7])
def test_bf16_packed_matmul(out_features: int, in_features: int, num_rows: int) -> None:
    x, _packed, address, bias = packed_case(out_features, in_features, num_rows,
                                            seed=out_features + num_rows)
    _same_bits_at_every_thread_count(
        lambda: packed_bf16.linear(x, address, in_features, bias, out_features))


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("num_rows", [1, 4, 9])
def test_int4_matmul(out_features: int, in_features: int, num_rows: int) -> None:
    generator = torch.Generator().manual_seed(out_features + num_rows)
    weight = w4a16.with_columns(w4a16.quantize_weight(
        torch.randn(out_features, in_features, generator=generator)))
    bias = torch.randn(out_features, generator=generator)
    x = torch.randn(num_rows, in_features, generator=generator)
    _same_bits_at_every_thread_count(lambda: w4a16.columns_linear_q8(x, weight, bias))


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("num_rows", [1, 9])
def test_int8_matmul(out_features: int, in_features: int, num_rows: int) -> None:
    generator = torch.Generator().manual_seed(out_features + num_rows)
    weight = w8a8.with_columns(w8a8.quantize_weight(
        torch.randn(out_features, in_features, generator=generator)))
    assert weight.columns is not None
    bias = torch.randn(out_features, generator=generator)
    x = torch.randn(num_rows, in_features, generator=generator).bfloat16()
    _same_bits_at_every_thread_count(lambda: w8a8.linear(x, weight, bias))

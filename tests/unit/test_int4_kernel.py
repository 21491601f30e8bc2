"""The portable int4 kernel (cpu_portable.c: int4_linear_f32) against the dequantizing
reference, and which calls take it."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import w4a16
from engine.kernels.portable import INT4_MAX_ROWS, portable_library

pytestmark = pytest.mark.skipif(portable_library() is None,
                                reason="portable CPU kernels unavailable here")


def quantized(num_rows: int, in_features: int, group_size: int,
              seed: int = 0) -> w4a16.Int4Weight:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, in_features, generator=generator) * 0.05
    weight[:, :group_size] += 0.3  # a group off-centre: zero points away from 8
    return w4a16.quantize_weight(weight, group_size)


@pytest.mark.parametrize("num_x_rows", [1, 2, 5, INT4_MAX_ROWS])
@pytest.mark.parametrize(("num_rows", "in_features", "group_size"),
                         [(896, 896, 128), (37, 256, 32), (64, 1024, 1024), (5, 2048, 64),
                          (21, 96, 16)],  # groups of 16: the plain-C path
                         ids=["square", "odd-rows", "one-group", "few-rows", "plain-c"])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_the_reference_in_float32(num_x_rows: int, num_rows: int,
                                                 in_features: int, group_size: int,
                                                 bias: bool) -> None:
    weight = quantized(num_rows, in_features, group_size)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(num_x_rows, in_features, generator=generator)
    b = torch.randn(num_rows, generator=generator) if bias else None
    expected = w4a16.reference_linear(x.double(), weight, None if b is None else b.double())
    got = w4a16.kernel_linear(x, weight, b)
    assert got.dtype == torch.float32 and got.shape == (num_x_rows, num_rows)
    scale = expected.abs().max().item()
    assert (got.double() - expected).abs().max().item() < 2e-6 * scale * in_features ** 0.5


def test_kernel_takes_bf16_activations_and_keeps_leading_dims() -> None:
    """bf16 in, bf16 out: the float32 result rounded once (the reference in bf16 would also
    round the dequantized weight, so the float32 reference is the one to meet)."""
    weight = quantized(96, 512, 128, seed=3)
    x = torch.randn(2, 3, 512).bfloat16()
    got = w4a16.kernel_linear(x, weight, None)
    expected = w4a16.reference_linear(x.float(), weight, None)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 96)
    assert torch.allclose(got.float(), expected, rtol=2 ** -8, atol=1e-3)


def test_decode_batches_take_the_kernel_and_larger_ones_the_reference(
        monkeypatch: pytest.MonkeyPatch) -> None:
    weight = quantized(64, 256, 128, seed=4)
    calls: list[int] = []
    real = w4a16.kernel_linear
    monkeypatch.setattr(w4a16, "kernel_linear",
                        lambda x, *args: calls.append(x.numel() // x.shape[-1]) or real(x, *args))
    for num_x_rows in (1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1, 300):
        x = torch.randn(num_x_rows, 256)
        got = w4a16.linear(x, weight, None)
        assert torch.allclose(got, w4a16.reference_linear(x, weight, None), atol=1e-4)
    assert calls == [1, INT4_MAX_ROWS]


def test_act_order_weights_take_the_reference() -> None:
    weight = quantized(32, 256, 128, seed=5)
    permuted = w4a16.Int4Weight(weight.packed, weight.scales, weight.zeros, 128,
                                torch.arange(256) % 2)
    assert not w4a16.takes_kernel(torch.randn(1, 256), permuted)
    assert w4a16.takes_kernel(torch.randn(1, 256), weight)


def test_the_kernel_refuses_more_rows_than_it_holds() -> None:
    weight = quantized(8, 128, 128, seed=6)
    with pytest.raises(ValueError, match="refused 17 rows"):
        w4a16.kernel_linear(torch.randn(INT4_MAX_ROWS + 1, 128), weight, None)

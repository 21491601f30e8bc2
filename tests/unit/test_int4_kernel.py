"""The portable int4 kernels (cpu_portable.c: int4_linear_f32, and int4_linear_q8 with int8
activations) against their torch oracles, and which calls take which."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine.kernels import dequantized, w4a16
from engine.kernels.native import PREFETCH_L2, PREFETCH_NTA, native_library
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


@pytest.mark.parametrize(("kernel", "oracle"),
                         [(w4a16.kernel_linear, w4a16.reference_linear),
                          (w4a16.kernel_linear_q8, w4a16.reference_linear_q8)],
                         ids=["float-activations", "int8-activations"])
def test_kernels_take_bf16_activations_and_keep_leading_dims(
        kernel: Callable[..., torch.Tensor], oracle: Callable[..., torch.Tensor]) -> None:
    """bf16 in, bf16 out: the float32 result rounded once (the reference in bf16 would also
    round the dequantized weight, so the float32 reference is the one to meet)."""
    weight = quantized(96, 512, 128, seed=3)
    x = torch.randn(2, 3, 512).bfloat16()
    got = kernel(x, weight, None)
    expected = oracle(x.float(), weight, None)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 96)
    assert torch.allclose(got.float(), expected, rtol=2 ** -8, atol=1e-3)


@pytest.mark.parametrize("group_size", [128, 16])
def test_decode_batches_take_a_kernel_and_larger_ones_the_reference(
        monkeypatch: pytest.MonkeyPatch, group_size: int) -> None:
    """Groups of a multiple of Q8_BLOCK columns take the int8-activation kernel, others the
    float one; batches beyond INT4_MAX_ROWS rows dequantize."""
    weight = quantized(64, 256, group_size, seed=4)
    calls: list[tuple[str, int]] = []
    for name in ("kernel_linear", "kernel_linear_q8"):
        real = getattr(w4a16, name)
        monkeypatch.setattr(w4a16, name, lambda x, *args, name=name, real=real: calls.append(
            (name, x.numel() // x.shape[-1])) or real(x, *args))
    for num_x_rows in (1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1, 300):
        x = torch.randn(num_x_rows, 256)
        got = w4a16.linear(x, weight, None)
        oracle = (w4a16.reference_linear_q8 if group_size % w4a16.Q8_BLOCK == 0
                  and num_x_rows <= INT4_MAX_ROWS else w4a16.reference_linear)
        assert torch.allclose(got, oracle(x, weight, None), atol=1e-4)
    kernel = "kernel_linear_q8" if group_size == 128 else "kernel_linear"
    assert calls == [(kernel, 1), (kernel, INT4_MAX_ROWS)]


def test_act_order_weights_take_the_reference() -> None:
    weight = quantized(32, 256, 128, seed=5)
    permuted = w4a16.Int4Weight(weight.packed, weight.scales, weight.zeros, 128,
                                torch.arange(256) % 2)
    assert not w4a16.takes_kernel(torch.randn(1, 256), permuted)
    assert w4a16.takes_kernel(torch.randn(1, 256), weight)


def test_the_kernels_refuse_more_rows_than_they_hold() -> None:
    weight = quantized(8, 128, 128, seed=6)
    with pytest.raises(ValueError, match="refused 17 rows"):
        w4a16.kernel_linear(torch.randn(INT4_MAX_ROWS + 1, 128), weight, None)
    with pytest.raises(ValueError, match="int4_linear_q8 refused 17 rows"):
        w4a16.kernel_linear_q8(torch.randn(INT4_MAX_ROWS + 1, 128), weight, None)


def test_the_int8_activation_kernel_refuses_groups_it_cannot_block() -> None:
    with pytest.raises(ValueError, match="in groups of 16"):
        w4a16.kernel_linear_q8(torch.randn(1, 96), quantized(21, 96, 16), None)


@pytest.mark.parametrize("num_x_rows", [1, 3, 4, 5, INT4_MAX_ROWS])
@pytest.mark.parametrize(("num_rows", "in_features", "group_size"),
                         [(896, 896, 128), (37, 256, 32), (64, 1024, 1024), (6, 2048, 64),
                          (895, 4864, 128)],  # 895: rows past the last four (M=1's plain C)
                         ids=["square", "odd-rows", "one-group", "few-rows", "wide"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel", ["portable", "avx512"])
def test_int8_activation_kernel_matches_its_oracle(num_x_rows: int, num_rows: int,
                                                   in_features: int, group_size: int,
                                                   bias: bool, kernel: str) -> None:
    """The activations quantized as the oracle does (the same bytes and scales), so only the
    order of the float additions differs: the integer dot products are exact. The portable
    kernel (int4_linear_q8) and the AVX-512 one over the column copy (int4_gemm_q8: tiles of
    4 rows and single ones, 16-column groups padded past the last row of W)."""
    weight = quantized(num_rows, in_features, group_size)
    if kernel == "avx512":
        if native_library() is None:
            pytest.skip("the AVX-512 kernels are unavailable here")
        weight = w4a16.with_columns(weight)
        assert weight.columns is not None
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(num_x_rows, in_features, generator=generator) * 3
    x[0, :w4a16.Q8_BLOCK] = 0  # a zero block: scale 0, no division by it
    b = torch.randn(num_rows, generator=generator) if bias else None
    expected = torch.nn.functional.linear(w4a16.quantize_activations_q8(x).double(),
                                          weight.dequantize().double(),
                                          None if b is None else b.double())
    run = w4a16.columns_linear_q8 if kernel == "avx512" else w4a16.kernel_linear_q8
    got = run(x, weight, b)
    assert got.dtype == torch.float32 and got.shape == (num_x_rows, num_rows)
    scale = expected.abs().max().item()
    assert (got.double() - expected).abs().max().item() < 2e-6 * scale * in_features ** 0.5
    assert torch.allclose(got, w4a16.reference_linear_q8(x, weight, b), rtol=1e-4, atol=1e-4)


def test_activation_quantization_keeps_each_block_within_half_a_step() -> None:
    """Per row and block of Q8_BLOCK columns: the largest magnitude is kept exactly (it maps to
    +-127), every value moves by at most half its block's step, zero blocks stay zero."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4 * w4a16.Q8_BLOCK, generator=generator)
    x[1, w4a16.Q8_BLOCK:2 * w4a16.Q8_BLOCK] = 0
    x[2, :w4a16.Q8_BLOCK] *= 1000  # a loud block does not coarsen its neighbours
    got = w4a16.quantize_activations_q8(x)
    blocks, got_blocks = (t.view(3, 4, w4a16.Q8_BLOCK) for t in (x, got))
    peaks = blocks.abs().amax(dim=-1, keepdim=True)
    assert torch.allclose(got_blocks.abs().amax(dim=-1, keepdim=True), peaks, rtol=1e-6, atol=0)
    assert ((got_blocks - blocks).abs() <= peaks / 127 / 2 * (1 + 1e-6)).all()
    assert torch.equal(got[1, w4a16.Q8_BLOCK:2 * w4a16.Q8_BLOCK],
                       torch.zeros(w4a16.Q8_BLOCK))
    steps = (got_blocks / (peaks / 127)).nan_to_num()
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # integers times the block's step


@pytest.mark.parametrize(("num_rows", "in_features", "group_size"),
                         [(96, 512, 128), (37, 256, 32), (5, 96, 16), (3, 40, 8)])
def test_dequantize_kernel_is_bitwise_the_torch_one(num_rows: int, in_features: int,
                                                    group_size: int) -> None:
    """int4_dequantize_f32 (groups of 32 and more in AVX2, the rest in plain C) writes exactly
    the values of the torch ops, and the prefill's reference path uses it."""
    weight = quantized(num_rows, in_features, group_size, seed=8)
    got = weight.dequantize()
    assert got.dtype == torch.float32 and torch.equal(got, weight.dequantize_in_torch())
    assert torch.equal(weight.dequantize(torch.bfloat16),
                       weight.dequantize_in_torch(torch.bfloat16))
    x = torch.randn(INT4_MAX_ROWS + 1, in_features)
    assert torch.equal(w4a16.reference_linear(x, weight, None),
                       torch.nn.functional.linear(x, weight.dequantize_in_torch()))


def test_large_weights_dequantize_in_slices_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past dequantized.CHUNK_VALUES values the reference multiplies slices of rows (the
    last one short), each dequantized alone: the rows of the whole product, bias included."""
    monkeypatch.setattr(dequantized, "CHUNK_VALUES", 10 * 256)
    weight = quantized(45, 256, 128, seed=9)
    assert torch.equal(weight.dequantize(start=10, end=20), weight.dequantize_in_torch()[10:20])
    act_order = w4a16.Int4Weight(weight.packed, weight.scales, weight.zeros, 128,
                                 torch.arange(256) % 2)  # a slice reads only its rows' values
    assert torch.equal(act_order.dequantize(start=10, end=20), act_order.dequantize()[10:20])
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(2, 40, 256, generator=generator)
    bias = torch.randn(45, generator=generator)
    got = w4a16.reference_linear(x, weight, bias)
    expected = torch.nn.functional.linear(x, weight.dequantize_in_torch(), bias)
    assert got.shape == (2, 40, 45)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # summation order


# ---- the AVX-512 VNNI kernel over the column copy (cpu_kernels.c: int4_gemm_q8) -----------------

needs_native = pytest.mark.skipif(native_library() is None,
                                  reason="the AVX-512 kernels are unavailable here")


@needs_native
def test_column_copy_holds_sixteen_columns_by_eight_values_per_64_bytes() -> None:
    rows = quantized(20, 64, 32, seed=8)
    weight = w4a16.with_columns(rows)
    assert weight.columns is not None
    values = w4a16.unpack_nibbles(rows.packed).int()  # [20, 64]
    values = torch.cat([values, torch.zeros(12, 64, dtype=torch.int32)])  # padded to 32 rows
    lanes = weight.columns.nibbles.view(2, 64 // 8, 16)  # [column group][octet][column]
    octets = values.view(2, 16, 8, 8).permute(0, 2, 1, 3)  # [group][octet][column][value]
    nibbles = [(lanes >> (4 * i)) & 15 for i in range(8)]  # byte c: low i = 2c, high 2c + 1
    for c in range(4):
        assert torch.equal(nibbles[2 * c], octets[..., c])  # values k .. k + 3: low nibbles
        assert torch.equal(nibbles[2 * c + 1], octets[..., 4 + c])  # k + 4 .. k + 7: high
    # [column group][group][16] -> [row][group]: the float16 scales and zero points, zeros past
    # the last row
    for packed, plain in ((weight.columns.scales, rows.scales),
                          (weight.columns.zeros, rows.zeros.half())):
        by_row = packed.permute(0, 2, 1).reshape(32, 2)
        assert torch.equal(by_row[:20], plain) and not by_row[20:].any()


@needs_native
@pytest.mark.parametrize(("num_rows", "start", "end"),
                         [(20, 0, None), (40, 5, 37), (40, 16, 32), (896, 100, 101)])
def test_column_copy_replaces_the_rows_and_dequantizes_alike(num_rows: int, start: int,
                                                             end: int | None) -> None:
    """with_columns keeps one copy of the nibbles, the kernel's; `dequantize` (any row
    slice, through the group scales and zeros) reads it back to the same values."""
    rows = quantized(num_rows, 256, 64, seed=num_rows)
    weight = w4a16.with_columns(rows)
    assert weight.columns is not None and weight.packed.numel() == 0 and not weight.has_rows
    assert weight.kernel_scales.numel() == 0  # the copy holds the scales the kernel reads
    assert weight.shape == rows.shape and rows.has_rows
    assert torch.equal(weight.dequantize(start=start, end=end),
                       rows.dequantize(start=start, end=end))
    assert torch.equal(weight.dequantize(torch.bfloat16), rows.dequantize(torch.bfloat16))
    assert not w4a16.takes_kernel(torch.randn(1, 256), weight)  # no rows for the portable one


@needs_native
def test_linear_takes_the_avx512_kernel_at_every_batch_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights with the column copy run it for decode batches and prefill-sized ones alike
    (rows past the kernel's 128-row stretches and 4-row tiles included); act-order weights get
    no copy (their groups are not in column order)."""
    weight = w4a16.with_columns(quantized(64, 256, 128, seed=9))
    calls: list[int] = []
    real = w4a16.columns_linear_q8
    monkeypatch.setattr(w4a16, "columns_linear_q8",
                        lambda x, *args: calls.append(x.numel() // x.shape[-1]) or real(x, *args))
    sizes = (1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1, 300)
    for num_x_rows in sizes:
        x = torch.randn(num_x_rows, 256)
        assert torch.allclose(w4a16.linear(x, weight, None),
                              w4a16.reference_linear_q8(x, weight, None), atol=1e-4)
    assert calls == list(sizes)
    permuted = w4a16.Int4Weight(weight.packed, weight.scales, weight.zeros, 128,
                                torch.arange(256) % 2)
    assert w4a16.with_columns(permuted).columns is None


@needs_native
@pytest.mark.parametrize("num_x_rows", [1, 7, 300])
def test_bf16_activations_go_through_the_kernel_unwidened(num_x_rows: int) -> None:
    """bf16 rows go into the kernel as they are and come back bf16: the same int8 activations
    and sums as the float32 path (bf16 values are exact in float32), rounded once at the end;
    the bias is added in bf16 after it, as the float path adds it in float32."""
    weight = w4a16.with_columns(quantized(40, 256, 64, seed=10))
    x = torch.randn(num_x_rows, 256).bfloat16()
    got = w4a16.linear(x, weight, None)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, w4a16.linear(x.float(), weight, None).bfloat16())
    bias = torch.randn(40).bfloat16()
    assert torch.equal(w4a16.linear(x, weight, bias), got + bias)


@needs_native
@pytest.mark.parametrize("num_x_rows", [1, 4, 7])
def test_the_prefetch_kind_leaves_the_values_alone(num_x_rows: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass over the tiles (1 or 4 rows) prefetches them as native.stream_prefetch says,
    more passes into L1: either kind gives the same bits."""
    weight = w4a16.with_columns(quantized(96, 512, 128, seed=11))
    x = torch.randn(num_x_rows, 512).bfloat16()
    outputs = []
    for kind in (PREFETCH_L2, PREFETCH_NTA):
        monkeypatch.setattr(w4a16, "stream_prefetch", lambda kind=kind: kind)
        outputs.append(w4a16.linear(x, weight, None))
    assert torch.equal(outputs[0], outputs[1])
    assert torch.allclose(outputs[0].float(),
                          w4a16.reference_linear_q8(x.float(), weight, None), atol=2e-2,
                          rtol=1e-2)

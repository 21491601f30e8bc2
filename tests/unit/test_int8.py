"""`--quantization int8`: weight quantization, the native VNNI kernel against the torch
reference of the same arithmetic (tile remainders, row chunks, bias, zero rows, outliers), the
reference against exact float matmuls, and whole models: int8 logits close to bf16 ones, greedy
text from the int8 engine, and the flag reaching the loader from the CLI's settings."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.kernels import dequantized, native, w8a8
from engine.kernels.portable import portable_library
from engine.layers.linear import Linear
from engine.layers.parallel import VocabParallelEmbedding
from engine.loader import load_model
from tests.devices import cpu_only
from tests.unit.test_cpu_fast_paths import _greedy_logits

NATIVE = native.native_library()
needs_native = pytest.mark.skipif(
    NATIVE is None, reason=f"native kernels unavailable here: {native.unsupported_reason()}")
pytestmark = cpu_only  # CPU code paths


def _within_bf16_rounding(out: torch.Tensor, expected: torch.Tensor) -> bool:
    """Both sides round float32 sums of the same exact block products, taken in a different
    order, to bf16: at most one bf16 step (2**-7 relative) apart, plus float32 noise near 0."""
    out, expected = out.float(), expected.float()
    step = expected.abs() * 2.0**-7 + expected.abs().max() * 1e-5
    return bool(((out - expected).abs() <= step).all())


# ---- quantization ------------------------------------------------------------------------------

def test_weight_quantization_round_trips_within_half_a_step() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 128, generator=gen) * torch.logspace(-3, 1, 37)[:, None]
    weight[5] = 0.0  # an all-zero row must not divide by zero
    quantized = w8a8.quantize_weight(weight)
    assert quantized.data.dtype == torch.uint8 and quantized.scales.dtype == torch.float32
    assert int(quantized.data.min()) >= 1 and int(quantized.data.max()) <= 255
    assert torch.equal(quantized.data[5], torch.full((128,), 128, dtype=torch.uint8))
    error = (quantized.dequantize() - weight).abs()
    assert bool((error <= quantized.scales[:, None] / 2 * (1 + 1e-5)).all())
    # the largest magnitude of each row is exactly representable: +-127 steps
    peaks = (quantized.data.float() - 128).abs().amax(dim=1)
    assert torch.equal(peaks[peaks > 0], torch.full_like(peaks[peaks > 0], 127))


def test_in_features_must_fill_whole_blocks() -> None:
    assert w8a8.can_quantize(64) and w8a8.can_quantize(896) and not w8a8.can_quantize(96)
    with pytest.raises(ValueError, match="multiple of 64"):
        w8a8.quantize_weight(torch.randn(4, 96))
    layer = Linear(96, 8, bias=False)
    assert not layer.quantize_int8() and layer.weight.numel() == 96 * 8  # left as it was


@needs_native
@pytest.mark.parametrize("num_ids", [1, 7])
def test_int8_embedding_rows_are_the_torch_lookups(num_ids: int) -> None:
    """The native lookup of an int8 table's rows (one call for the five torch ops a decode
    step's embedding took): the same bf16 values bit for bit, a repeated id and an all-zero row
    (scale 0) included; an id past the table is refused before anything is read."""
    gen = torch.Generator().manual_seed(num_ids)
    table = torch.randn(500, 128, generator=gen) * 0.02
    table[3] = 0.0
    table[4, 7] = 5.0  # an outlier: the row's scale
    weight = w8a8.quantize_weight(table)
    ids = torch.tensor([3, 4, 499, 4, 0, 17, 250][:num_ids], dtype=torch.long)
    rows = w8a8.embedding_rows(ids, weight, torch.bfloat16)
    expected = ((weight.data[ids].float() - 128) * weight.scales[ids][:, None]).bfloat16()
    assert rows.dtype == torch.bfloat16 and torch.equal(rows, expected)
    with pytest.raises(IndexError, match="500 rows"):
        w8a8.embedding_rows(torch.tensor([1, 500]), weight, torch.bfloat16)


@pytest.mark.parametrize("num_rows", [1, 7, 64])
def test_reference_is_close_to_the_float_matmul(num_rows: int) -> None:
    gen = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(96, 1024, generator=gen) * 0.05
    x = torch.randn(num_rows, 1024, generator=gen)
    bias = torch.randn(96, generator=gen)
    quantized = w8a8.quantize_weight(weight)

    def relative_error(x: torch.Tensor) -> float:
        expected = F.linear(x, weight, bias)
        out = w8a8.reference_linear(x, quantized, bias)
        return float((out - expected).norm() / expected.norm())

    assert relative_error(x) < 0.01
    # one outlier channel: per-block scales confine the damage to its own block, so the error
    # stays well under that of one scale for the whole row
    x[:, 3] = 40.0
    row_values = torch.round(x / (x.abs().amax(dim=1, keepdim=True) / 127)).clamp(-127, 127)
    row_scaled = row_values * (x.abs().amax(dim=1, keepdim=True) / 127)
    row_error = float((F.linear(row_scaled, quantized.dequantize(), bias)
                       - F.linear(x, weight, bias)).norm() / F.linear(x, weight, bias).norm())
    assert relative_error(x) < 0.5 * row_error, (relative_error(x), row_error)


# ---- the native kernel -------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4, 5, 16, 63, 64, 65, 127])
@pytest.mark.parametrize(("out_features", "in_features"), [(8, 64), (13, 192), (130, 896)])
def test_kernel_matches_reference(num_rows: int, out_features: int, in_features: int) -> None:
    """Row tiles of 4 and the remainders, activation tiles of 4 and 1, chunks of 64 rows (all
    below DEQUANTIZE_MIN_ROWS, where the int8 tiles run)."""
    assert num_rows < w8a8.DEQUANTIZE_MIN_ROWS
    gen = torch.Generator().manual_seed(num_rows * 1000 + out_features)
    weight = w8a8.quantize_weight(torch.randn(out_features, in_features, generator=gen))
    x = torch.randn(num_rows, in_features, generator=gen).to(torch.bfloat16)
    for bias in (None, torch.randn(out_features, generator=gen)):
        out = w8a8.linear(x, weight, bias)
        assert out.dtype == torch.bfloat16 and out.shape == (num_rows, out_features)
        assert _within_bf16_rounding(out, w8a8.reference_linear(x.float(), weight, bias))


@needs_native
@pytest.mark.parametrize("num_rows", [w8a8.DEQUANTIZE_MIN_ROWS, 300])
def test_prefill_sized_batches_use_the_dequantized_weight(num_rows: int) -> None:
    """From DEQUANTIZE_MIN_ROWS rows: a bf16 matmul over the weight dequantized in C, equal to
    the float reference up to bf16 rounding of the weight and the output."""
    gen = torch.Generator().manual_seed(num_rows)
    weight = w8a8.quantize_weight(torch.randn(72, 192, generator=gen))
    x = torch.randn(num_rows, 192, generator=gen).to(torch.bfloat16)
    bias = torch.randn(72, generator=gen)
    out = w8a8.linear(x, weight, bias).float()
    expected = w8a8.reference_linear(x.float(), weight, bias)
    assert float((out - expected).norm() / expected.norm()) < 0.005
    # the dequantized weight itself: the int8 values times the scale, rounded once to bf16
    dense = torch.empty(72, 192, dtype=torch.bfloat16)
    NATIVE.w8_dequantize(weight.data.data_ptr(), weight.scales.data_ptr(), 72, 192,
                         dense.data_ptr(), 1)
    assert torch.equal(dense, weight.dequantize().to(torch.bfloat16))


@needs_native
@pytest.mark.parametrize("num_rows", [3, 4, 5, 7, 16, 65, w8a8.DEQUANTIZE_MIN_ROWS - 1])
@pytest.mark.parametrize(("out_features", "in_features"), [(13, 192), (48, 64), (130, 896)])
def test_batch_gemm_matches_reference(num_rows: int, out_features: int, in_features: int) -> None:
    """Below DEQUANTIZE_MIN_ROWS (decode), a weight with its column-packed copy takes the GEMM:
    the row tiles' per-block int8 arithmetic (tiles of 4 rows and the remainders, groups of 16
    columns padded, 3 groups a tile)."""
    gen = torch.Generator().manual_seed(num_rows * 1000 + out_features)
    plain = w8a8.quantize_weight(torch.randn(out_features, in_features, generator=gen))
    weight = w8a8.with_columns(plain)
    assert weight.columns is not None and not weight.has_rows  # the copy is the only one
    assert weight.columns.numel() == -(-out_features // 16) * 16 * in_features
    x = torch.randn(num_rows, in_features, generator=gen).to(torch.bfloat16)
    x[1] = 0.0  # an all-zero row: the bias exactly
    x[2, 5] = 3e4  # an outlier, which only its own block's scale sees
    for bias in (None, torch.randn(out_features, generator=gen)):
        out = w8a8.linear(x, weight, bias)
        assert out.dtype == torch.bfloat16 and out.shape == (num_rows, out_features)
        expected = w8a8.reference_linear(x.float(), weight, bias)
        assert _within_bf16_rounding(out, expected)
        assert torch.equal(out[1], torch.zeros(out_features, dtype=torch.bfloat16)
                           if bias is None else bias.to(torch.bfloat16))
    # one row alone, and the row tiles (the weight before the copy): the same arithmetic
    for rows in (x[:1], x):
        assert _within_bf16_rounding(w8a8.linear(rows, weight, None),
                                     w8a8.linear(rows, plain, None))
    # from DEQUANTIZE_MIN_ROWS (prefill) the dequantized weight, from the copy
    # (w8_dequantize_columns) or from the rows (w8_dequantize): the same bf16 weight
    tall = x.repeat(-(-w8a8.DEQUANTIZE_MIN_ROWS // num_rows), 1)
    assert torch.equal(w8a8.linear(tall, weight, None), w8a8.linear(tall, plain, None))


@needs_native
@pytest.mark.parametrize("num_rows", [w8a8.DEQUANTIZE_MIN_ROWS, 300])
def test_w8a8_weights_take_the_gemm_for_prefill_sized_batches(num_rows: int) -> None:
    """`int8_prefill` (--quantization w8a8): int8 activations from DEQUANTIZE_MIN_ROWS rows
    too, the decode arithmetic at prefill sizes, not the dequantized weight's."""
    gen = torch.Generator().manual_seed(num_rows)
    quantized = w8a8.quantize_weight(torch.randn(72, 192, generator=gen))
    weight = w8a8.with_columns(quantized, int8_prefill=True)
    assert weight.int8_prefill
    x = torch.randn(num_rows, 192, generator=gen).to(torch.bfloat16)
    bias = torch.randn(72, generator=gen)
    out = w8a8.linear(x, weight, bias)
    expected = w8a8.reference_linear(x.float(), weight, bias)
    assert _within_bf16_rounding(out, expected)
    # the block arithmetic, row by row: as the row tiles compute each row alone
    rows = torch.cat([w8a8.reference_linear(x[i:i + 1].float(), quantized, bias)
                      for i in range(0, num_rows, 37)])
    assert _within_bf16_rounding(out[::37], rows)


@needs_native
def test_column_packing_lays_out_sixteen_columns_by_four_bytes() -> None:
    plain = w8a8.quantize_weight(torch.randn(20, 128))
    weight = w8a8.with_columns(plain)
    assert weight.columns is not None
    packed = weight.columns.view(2, 128 // 4, 16, 4)
    rows = torch.cat([plain.data, torch.full((12, 128), 128, dtype=torch.uint8)])
    expected = rows.view(2, 16, 32, 4).permute(0, 2, 1, 3)  # [group][quad][column][byte]
    assert torch.equal(packed, expected)


@needs_native
@pytest.mark.parametrize(("num_rows", "start", "end"),
                         [(20, 0, None), (40, 5, 37), (896, 100, 101)])
def test_column_copy_reads_back_as_the_rows(num_rows: int, start: int, end: int | None) -> None:
    """A weight whose copy is its only one: the bytes, the float weight (any row slice) and
    the bf16 weight dequantized in C from the copy are the rows' own."""
    plain = w8a8.quantize_weight(torch.randn(num_rows, 192))
    weight = w8a8.with_columns(plain)
    assert weight.data.numel() == 0 and weight.shape == plain.shape
    assert torch.equal(weight.values(start, end), plain.data[start:end])
    assert torch.equal(weight.dequantize(start, end), plain.dequantize(start, end))
    dense = torch.empty(num_rows, 192, dtype=torch.bfloat16)
    assert weight.columns is not None
    NATIVE.w8_dequantize_columns(weight.columns.data_ptr(), weight.scales.data_ptr(), num_rows,
                                 192, dense.data_ptr(), 2)
    assert torch.equal(dense, plain.dequantize().to(torch.bfloat16))


@needs_native
def test_kernel_edge_rows_and_layouts() -> None:
    gen = torch.Generator().manual_seed(7)
    weight = w8a8.quantize_weight(torch.randn(20, 128, generator=gen))
    bias = torch.randn(20, generator=gen)
    x = torch.randn(6, 128, generator=gen).to(torch.bfloat16)
    x[2] = 0.0  # an all-zero activation row gives the bias exactly
    x[4, 70] = 3e4  # a huge outlier in one block
    out = w8a8.linear(x, weight, bias)
    assert torch.equal(out[2], bias.to(torch.bfloat16))
    assert _within_bf16_rounding(out, w8a8.reference_linear(x.float(), weight, bias))
    # batched [B, T, K] input and a non-contiguous float32 view give the same rows
    batched = w8a8.linear(x.view(2, 3, 128), weight, bias)
    assert torch.equal(batched.view(6, 20), out)
    strided = torch.cat([x.float(), x.float()], dim=1)[:, :128]
    assert torch.equal(w8a8.linear(strided, weight, bias).bfloat16(), out)


def test_reference_prefill_multiplies_slices_of_dequantized_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dequantized, "CHUNK_VALUES", 16 * 128)
    gen = torch.Generator().manual_seed(11)
    weight = w8a8.quantize_weight(torch.randn(40, 128, generator=gen))
    assert torch.equal(weight.dequantize(16, 32), weight.dequantize()[16:32])
    x = torch.randn(w8a8.DEQUANTIZE_MIN_ROWS, 128, generator=gen)
    bias = torch.randn(40, generator=gen)
    torch.testing.assert_close(w8a8.reference_linear(x, weight, bias),
                               F.linear(x, weight.dequantize(), bias), rtol=1e-5, atol=1e-5)


# ---- the portable kernel (CPUs without AVX-512) ------------------------------------------------

needs_portable = pytest.mark.skipif(portable_library() is None,
                                    reason="portable CPU kernels unavailable here")


@needs_portable
@pytest.mark.parametrize("num_rows", [1, 2, 5, 16, 127])
@pytest.mark.parametrize(("out_features", "in_features"), [(8, 64), (13, 192), (130, 896)])
def test_portable_kernel_matches_reference(num_rows: int, out_features: int,
                                           in_features: int) -> None:
    """Rows in fours and the remainder (one activation row), several activation rows; the
    activations quantized as the reference does, so only float addition order differs."""
    gen = torch.Generator().manual_seed(num_rows * 1000 + out_features)
    weight = w8a8.quantize_weight(torch.randn(out_features, in_features, generator=gen))
    x = torch.randn(num_rows, in_features, generator=gen)
    x[0, :w8a8.BLOCK] = 0  # a zero block: scale 0, no division by it
    for bias in (None, torch.randn(out_features, generator=gen)):
        out = w8a8.portable_linear(x, weight, bias)
        assert out.dtype == torch.float32 and out.shape == (num_rows, out_features)
        expected = w8a8.reference_linear(x.double(), weight,
                                         None if bias is None else bias.double())
        scale = expected.abs().max().item()
        assert (out.double() - expected).abs().max().item() <= 2e-6 * scale * in_features**0.5


@needs_portable
def test_portable_kernel_keeps_outliers_in_their_block_and_the_bias_exact() -> None:
    gen = torch.Generator().manual_seed(7)
    weight = w8a8.quantize_weight(torch.randn(20, 128, generator=gen))
    bias = torch.randn(20, generator=gen)
    x = torch.randn(6, 128, generator=gen)
    x[2] = 0.0  # an all-zero activation row gives the bias exactly
    x[4, 70] = 3e4  # a huge outlier in one block
    out = w8a8.portable_linear(x.bfloat16().view(2, 3, 128), weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 20)
    assert torch.equal(out.view(6, 20)[2], bias.bfloat16())
    expected = w8a8.reference_linear(x.bfloat16().float(), weight, bias)
    assert _within_bf16_rounding(out.view(6, 20), expected)


@pytest.mark.skipif(NATIVE is not None, reason="the AVX-512 kernel runs here")
def test_without_avx512_decode_takes_the_portable_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = w8a8.portable_linear
    monkeypatch.setattr(w8a8, "portable_linear",
                        lambda x, *args: calls.append(x.numel() // x.shape[-1]) or real(x, *args))
    weight = w8a8.quantize_weight(torch.randn(16, 128))
    for num_rows in (1, w8a8.DEQUANTIZE_MIN_ROWS - 1, w8a8.DEQUANTIZE_MIN_ROWS):
        x = torch.randn(num_rows, 128)
        torch.testing.assert_close(w8a8.linear(x, weight, None),
                                   w8a8.reference_linear(x, weight, None), rtol=1e-4, atol=1e-4)
    expected_calls = [1, w8a8.DEQUANTIZE_MIN_ROWS - 1] if portable_library() else []
    assert calls == expected_calls


@needs_native
def test_kernel_builds_into_a_fresh_cache(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    built = native.build()
    assert built.parent == tmp_path / "kernels" and built.stat().st_size > 0
    assert native.build() == built  # cached: same file, not rebuilt
    symbols = subprocess.run(["nm", "-D", str(built)], capture_output=True, text=True).stdout
    assert all(name in symbols for name in native.SIGNATURES)


def test_native_kernels_are_built_in_ci() -> None:
    """CI installs a compiler (.ci/run), so on a CPU with the instructions the kernels must
    build there and their tests run rather than skip."""
    if not os.environ.get("CI"):
        pytest.skip("outside CI a machine may lack a compiler")
    reason = native.unsupported_reason()
    if reason is not None and "CPU lacks" in reason:
        pytest.skip(reason)
    assert NATIVE is not None, reason


def test_turned_off_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_NATIVE_KERNELS", "0")
    assert "PAGEDSERVE_NATIVE_KERNELS=0" in (native.unsupported_reason() or "")


# ---- models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("quantization", ["int8", "w8a8"])
def test_int8_model_logits_close_to_bf16(arch: str, quantization: str,
                                         tiny_model_dirs: dict[str, Path],
                                         caplog: pytest.LogCaptureFixture) -> None:
    model_dir = tiny_model_dirs[arch]
    with caplog.at_level(logging.INFO, logger="engine.loader"):
        int8 = load_model(str(model_dir), dtype="bfloat16", device="cpu",
                          quantization=quantization).model
    plain = load_model(str(model_dir), dtype="bfloat16", device="cpu").model
    head = int8.output_head() or int8.tied_output_head
    assert head is not None
    linears = [m for m in int8.modules() if isinstance(m, Linear) and m is not head]
    assert linears and all(m.int8_weight is not None for m in linears)
    embeddings = [m for m in int8.modules() if isinstance(m, VocabParallelEmbedding)]
    # int8 quantizes the LM head and holds the embedding as int8 rows; w8a8 keeps both in
    # the model dtype, as W8A8 checkpoints leave the head (the head packed for oneDNN)
    if quantization == "int8":
        assert head.int8_weight is not None
        assert embeddings and all(m.int8_rows is not None for m in embeddings)
    else:
        assert head.int8_weight is None and head.packed_weight is not None
        assert embeddings and all(m.int8_rows is None for m in embeddings)
    # w8a8 marks every weight for int8 prefill (where the column copy, hence the GEMM, exists)
    if NATIVE is not None:
        assert all(w.int8_weight.int8_prefill == (quantization == "w8a8")
                   for w in [*linears, head] if w.int8_weight is not None)
    assert f"{quantization}:" in caplog.text
    tokens = [5, 17, 99, 3, 250, 41, 7]
    ours, reference = _greedy_logits(int8, tokens).float(), _greedy_logits(plain, tokens).float()
    cosine = F.cosine_similarity(ours, reference, dim=-1)
    assert bool((cosine > 0.99).all()), cosine


def test_int8_engine_greedy_follows_the_int8_model(tiny_model_dirs: dict[str, Path]) -> None:
    """Each greedy token of the int8 engine (batched, incremental decode) is the argmax of the
    same int8 model run over the whole prefix again, up to near-ties: the two paths round
    bf16 attention differently, so only a token within 2% of the logit range of the top one
    may stand in for it."""
    model_dir = tiny_model_dirs["llama"]
    prompt = [11, 200, 37, 401, 9, 64, 128, 3]
    llm = LLM(str(model_dir), dtype="bfloat16", quantization="int8", num_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([prompt, prompt[:5]], params)
    model = load_model(str(model_dir), dtype="bfloat16", device="cpu",
                       quantization="int8").model
    exact = 0
    for output, tokens in zip(outputs, (prompt, prompt[:5]), strict=True):
        generated = output.outputs[0].token_ids
        assert len(generated) == 6
        for i, token in enumerate(generated):
            logits = _greedy_logits(model, list(tokens) + generated[:i])[-1].float()
            top, bottom = float(logits.max()), float(logits.min())
            assert float(logits[token]) >= top - 0.02 * (top - bottom), (i, token)
            exact += int(logits.argmax()) == token
    assert exact >= 10  # of 12: near-ties are the exception


def test_int8_needs_cpu() -> None:
    with pytest.raises(InvalidRequestError, match="CPU only"):
        EngineConfig.from_kwargs("m", quantization="int8", device="cuda")
    with pytest.raises(InvalidRequestError, match="quantization must be one of"):
        EngineConfig.from_kwargs("m", quantization="int2")

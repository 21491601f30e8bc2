"""packed_bf16: bf16 matmuls read oneDNN's prepacked weights in place. Against oneDNN's own
call on the same weight (within one bf16 rounding, nearly always equal) and the float32
product; weights whose bytes are not the layout the kernel reads are refused; Linear sends the
kernel the calls it takes and oneDNN the rest; the prefetch kind, chosen by CPU, changes no
value."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import native, packed_bf16
from engine.kernels.native import PREFETCH_L2, PREFETCH_NTA, has_bf16_dot_products, native_library
from engine.layers.linear import Linear, can_prepack
from tests.devices import cpu_only

pytestmark = [
    cpu_only,
    pytest.mark.skipif(not can_prepack(torch.bfloat16, torch.device("cpu"))
                       or native_library() is None or not has_bf16_dot_products(),
                       reason="needs oneDNN bf16, the native kernels and AVX512-BF16"),
]


def _onednn(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@pytest.mark.parametrize(("out_features", "in_features"), [
    (64, 64), (100, 64),  # a last block of 36 columns
    (130, 896), (64, 66), (200, 130), (96, 30),  # inputs padded to 32 in the packed rows
    (1152, 896), (896, 4864),  # the default model's qkv and down projections
])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_gives_onednns_products(out_features: int, in_features: int, bias: bool) -> None:
    generator = torch.Generator().manual_seed(out_features * in_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias_value = torch.randn(out_features, generator=generator).bfloat16() if bias else None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    address = packed_bf16.address(packed, out_features, in_features, bias_value)
    assert address is not None
    for num_rows in (1, 2, 3, 4, 5, 6, 7, 13, 17, 32, 300):
        x = torch.randn(num_rows, in_features, generator=generator).bfloat16()
        got = packed_bf16.linear(x, address, in_features, bias_value, out_features)
        expected = _onednn(x, packed, bias_value)
        assert got.shape == (num_rows, out_features) and got.dtype == torch.bfloat16
        # float32 sums rounded once: within one bf16 rounding of the exact product, plus what
        # float32 sums of these terms can lose
        exact = F.linear(x.double(), weight.double(),
                         None if bias_value is None else bias_value.double())
        terms = F.linear(x.double().abs(), weight.double().abs(),
                         None if bias_value is None else bias_value.double().abs())
        error = (got.double() - exact).abs()
        assert bool((error <= exact.abs() * 2.0 ** -8 + terms * 1e-5).all()), num_rows
        # and oneDNN's sums in its order: the same bf16 values nearly everywhere
        assert float((got != expected).float().mean()) < 0.01


def packed_case(out_features: int, in_features: int, num_rows: int,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """A random bf16 weight prepacked by oneDNN, for the kernel: (x [num_rows, in_features],
    the packed weight (keep it while its address is used), its address, bias
    [out_features])."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias = torch.randn(out_features, generator=generator).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    address = packed_bf16.address(packed, out_features, in_features, bias)
    assert address is not None
    x = torch.randn(num_rows, in_features, generator=generator).bfloat16()
    return x, packed, address, bias


def test_a_weight_in_another_layout_is_refused() -> None:
    """The kernel reads bytes, not a descriptor: a buffer of the right size holding the weight
    in another order is refused, and so are odd inputs and biases it cannot take."""
    weight = torch.randn(128, 64).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    assert packed_bf16.address(packed, 128, 64, None) is not None
    assert packed_bf16.address(packed, 64, 128, None) is None  # not its shape
    # the same size in another layout (row-major, which oneDNN's call reads as such)
    other = weight.to_mkldnn()
    assert torch.ops.mkldnn._nbytes(other) == torch.ops.mkldnn._nbytes(packed)
    assert torch.equal(_onednn(torch.eye(64).bfloat16(), other, None), weight.t())
    assert packed_bf16.address(other, 128, 64, None) is None
    odd = torch.ops.mkldnn._reorder_linear_weight(torch.randn(64, 33).bfloat16(), None)
    assert packed_bf16.address(odd, 64, 33, None) is None  # pairs of inputs only
    assert packed_bf16.address(packed, 128, 64, torch.zeros(128)) is None  # a float32 bias
    assert packed_bf16.address(packed, 128, 64, torch.randn(128).bfloat16()) is not None


@pytest.mark.parametrize("in_features", [896, 8192])
def test_linear_sends_the_kernel_the_rows_it_takes(in_features: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode batches up to MAX_ROWS where a block stays in L2 between passes (896 inputs:
    112 KiB), one pass's worth where it would not (8192: 1 MiB a block); prefill-sized calls
    and the rest to oneDNN."""
    layer = Linear(in_features, 192, bias=True).to(torch.bfloat16)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.prepack()
    assert layer.packed_address is not None
    calls: list[int] = []
    real = packed_bf16.linear

    def counting(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(packed_bf16, "linear", counting)
    rows = (1, packed_bf16.ROWS_PER_PASS, packed_bf16.ROWS_PER_PASS + 1, packed_bf16.MAX_ROWS,
            packed_bf16.MAX_ROWS + 1, 300)
    for num_rows in rows:
        x = torch.randn(num_rows, in_features).bfloat16()
        torch.testing.assert_close(layer(x).float(), F.linear(x.float(), weight.float(),
                                                              bias.float()),
                                   atol=0.05 * in_features ** 0.5 / 30, rtol=0.02)
    one_pass = [1, packed_bf16.ROWS_PER_PASS]
    assert calls == (list(rows[:4]) if in_features == 896 else one_pass)
    assert packed_bf16.max_rows(896) == packed_bf16.MAX_ROWS
    assert packed_bf16.max_rows(8192) == packed_bf16.ROWS_PER_PASS
    strided = torch.randn(in_features, 2).bfloat16().t()  # not contiguous: oneDNN's call
    torch.testing.assert_close(layer(strided).float(), F.linear(
        strided.float(), weight.float(), bias.float()), atol=0.1, rtol=0.02)
    assert len(calls) == (4 if in_features == 896 else 2)


@pytest.mark.parametrize("num_rows", [1, 7, 300])
def test_float_forward_is_forward_widened(num_rows: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The LM head's logits: where the kernel takes the rows (1, 7) it writes them as float32
    itself, oneDNN's (300) are widened after; forward(x).float() bit for bit either way, with
    either prefetch kind."""
    layer = Linear(896, 200, bias=True).to(torch.bfloat16)  # a last block of 8 columns
    layer.prepack()
    assert layer.packed_address is not None
    x = torch.randn(num_rows, 896).bfloat16()
    written: list[torch.dtype] = []
    real = packed_bf16.linear

    def recording(*args: object, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        written.append(out_dtype)
        return real(*args, out_dtype=out_dtype)  # type: ignore[arg-type]

    monkeypatch.setattr(packed_bf16, "linear", recording)
    for kind in (PREFETCH_L2, PREFETCH_NTA):
        monkeypatch.setattr(packed_bf16, "stream_prefetch", lambda kind=kind: kind)
        logits = layer.float_forward(x)
        assert logits.dtype == torch.float32 and torch.equal(logits, layer(x).float())
    taken = num_rows <= packed_bf16.max_rows(896)
    assert written == ([torch.float32, torch.bfloat16] * 2 if taken else [])


def test_the_switch_leaves_oneDNN_its_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(packed_bf16.ENV, "0")
    layer = Linear(64, 128).to(torch.bfloat16)
    layer.prepack()
    assert layer.packed_weight is not None and layer.packed_address is None


@pytest.mark.parametrize("num_rows", [1, 4, 7])
@pytest.mark.parametrize(("out_features", "in_features"), [
    (1152, 896), (100, 64), (96, 30), (64, 66)])  # an odd number of input pairs: 30, 66
def test_the_prefetch_kind_leaves_the_values_alone(num_rows: int, out_features: int,
                                                   in_features: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where one-row matmuls prefetch their weight (native.stream_prefetch, chosen by CPU)
    changes nothing but speed: both kinds give the same bits (one row streamed into L2 reads
    in 256-bit loads, non-temporally in 512-bit ones: the same sums per column), more rows
    too."""
    x, packed, address, bias = packed_case(out_features, in_features, num_rows,
                                           seed=num_rows * in_features)
    outputs = []
    for kind in (PREFETCH_L2, PREFETCH_NTA):
        monkeypatch.setattr(packed_bf16, "stream_prefetch", lambda kind=kind: kind)
        outputs.append(packed_bf16.linear(x, address, in_features, bias, out_features))
    assert torch.equal(outputs[0], outputs[1])
    assert float((outputs[0] != _onednn(x, packed, bias)).float().mean()) < 0.01


@pytest.mark.parametrize(("cpu", "setting", "expected"), [
    (("AuthenticAMD", 26), None, PREFETCH_NTA),  # Zen 5
    (("AuthenticAMD", 25), None, PREFETCH_L2),  # Zen 4
    (("GenuineIntel", 6), None, PREFETCH_L2),
    (None, None, PREFETCH_L2),
    (("AuthenticAMD", 25), "nta", PREFETCH_NTA),
    (("AuthenticAMD", 26), " L2 ", PREFETCH_L2),
    (("AuthenticAMD", 26), "t0", PREFETCH_NTA),  # not a kind: the CPU's choice, with a warning
])
def test_the_stream_prefetch_follows_the_cpu_unless_set(
        cpu: tuple[str, int] | None, setting: str | None, expected: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "cpu_family", lambda: cpu)
    if setting is None:
        monkeypatch.delenv(native.STREAM_PREFETCH_ENV, raising=False)
    else:
        monkeypatch.setenv(native.STREAM_PREFETCH_ENV, setting)
    native.stream_prefetch.cache_clear()
    try:
        assert native.stream_prefetch() == expected
    finally:
        native.stream_prefetch.cache_clear()

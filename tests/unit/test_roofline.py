"""bench/roofline.py's --prefill: one row per decoder matmul and row count (no LM head), the
engine's Linear prepacked exactly where the loader would prepack, and totals that add each
layer's flops over its rate."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from bench.roofline import (
    PREFILL_LAYERS,
    ModelShape,
    PrefillRate,
    _row_counts,
    prefill_rates,
    prefill_totals,
    prepack_skip_reason,
)
from engine.layers.linear import PREPACK_ENV, can_prepack
from tests.devices import cpu_only

pytestmark = cpu_only  # CPU matmuls and the CPU prepack decision

TINY = ModelShape(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                  num_kv_heads=2, head_dim=8, vocab_size=100, tied=True)


@pytest.fixture
def one_thread() -> Iterator[None]:
    # tiny matmuls on a thread team spend their time in its barriers, slowest on a busy machine
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_table_has_a_row_per_layer_and_row_count(dtype: torch.dtype) -> None:
    rates = prefill_rates(TINY, dtype, (2, 5), gemm_gflops=10.0, min_seconds=0.003)
    assert [(r.layer, r.rows) for r in rates] == [(name, m) for name in PREFILL_LAYERS
                                                  for m in (2, 5)]
    shapes = TINY.linear_shapes()
    for r in rates:
        assert (r.in_features, r.out_features) == shapes[r.layer]
        assert r.torch_gflops > 0 and r.engine_gflops > 0
        assert r.engine_of_gemm == pytest.approx(r.engine_gflops / 10.0)
        assert r.torch_of_gemm == pytest.approx(r.torch_gflops / 10.0)
        assert (r.not_prepacked_reason is None) == can_prepack(dtype, torch.device("cpu"))


def test_prepack_skip_reason_names_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    assert prepack_skip_reason(torch.float32) == "float32 runs F.linear"
    monkeypatch.setenv(PREPACK_ENV, "0")
    assert prepack_skip_reason(torch.bfloat16) == f"{PREPACK_ENV}=0"


def test_prefill_totals_add_flops_over_rates() -> None:
    shapes = TINY.linear_shapes()
    rates = [PrefillRate(name, 4, *shapes[name], torch_gflops=1.0, engine_gflops=2.0,
                         torch_of_gemm=0.25, engine_of_gemm=0.5, not_prepacked_reason=None)
             for name in PREFILL_LAYERS]
    (total,) = prefill_totals(TINY, rates, gemm_gflops=4.0)
    flops_per_token = 2 * TINY.layer_params  # the LM head is not a prefill matmul
    assert total["rows"] == 4
    assert total["torch_ms_per_token"] == pytest.approx(flops_per_token / 1e9 * 1e3)
    assert total["engine_ms_per_token"] == pytest.approx(flops_per_token / 2e9 * 1e3)
    assert total["gemm_ms_per_token"] == pytest.approx(flops_per_token / 4e9 * 1e3)


def test_row_counts_parse_a_comma_list() -> None:
    assert _row_counts("512,2048") == (512, 2048)
    with pytest.raises(Exception, match="row counts"):
        _row_counts("0,16")

"""bench/decode_profile.py on a tiny Llama: the matmuls it times are every weight a decode step
reads (bench/roofline.py's count of them), each kind was timed, and the engine is left as it
was found (native decode back on, no hooks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.decode_profile import KINDS, paired_fractions, profile, table
from bench.roofline import ModelShape, decode_weight_bytes
from engine import LLM, SamplingParams


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: packed weights where
def test_profile_times_every_weight_a_step_reads(tiny_llama_dir: Path, dtype: str) -> None:
    """(the LM head's one-row calls are float_forward's, not forward's, where it is packed)"""
    llm = LLM(str(tiny_llama_dir), dtype=dtype, kv_cache_memory_gb=0.05)
    model = llm.llm_engine.core.runner.model
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    result = profile(llm, prompt_tokens=20, output_tokens=24, rounds=1,
                     bandwidth_bytes=32 << 20, probe_bytes=32 << 20)
    kinds = result["kinds"]
    assert set(kinds) == set(KINDS)  # an untied head: five kinds
    assert all(seconds > 0 for seconds, _ in kinds.values())
    step_bytes = sum(num_bytes for _, num_bytes in kinds.values())
    assert step_bytes == decode_weight_bytes(ModelShape.from_config(tiny_llama_dir),
                                             getattr(torch, dtype))
    matmul_seconds = sum(seconds for seconds, _ in kinds.values())
    assert 0 < matmul_seconds < result["modules_step_s"]
    assert result["engine_step_s"] > 0 and result["read_gb_s"] > 0
    paired = result["paired"]
    assert paired["steps"] == 23  # every step after the first token's, of the one round
    assert 0 <= paired["steady"] <= 23
    assert ("fraction" in paired) == (paired["steady"] > 0)
    assert paired.get("fraction", 1.0) > 0
    rows = table(result).splitlines()
    assert rows[0].startswith("matmul | ms/step") and rows[2].startswith("qkv_proj | ")
    # hooks removed and the native stack's switch back where it was
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
               for m in model.modules()) == hooks_before
    assert not any("float_forward" in vars(m) for m in model.modules())
    assert all(m.native_decode_enabled for m in model.modules()
               if hasattr(m, "native_decode_enabled"))
    answer = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert len(answer.outputs[0].token_ids) == 3


def test_paired_fractions_set_each_step_against_its_own_bandwidth() -> None:
    """1 GB a step: 25 ms at 50 GB/s is 0.80 of its roofline, 20 ms at 80 GB/s 0.625; a step
    whose probes disagree (the level moved during it) is left out."""
    steps = [(0.025, 50.0, 50.0), (0.025, 49.0, 51.0), (0.020, 80.0, 80.0),
             (0.020, 79.0, 81.0), (0.030, 50.0, 80.0)]
    result = paired_fractions(steps, weight_bytes=10**9)
    assert result["steps"] == 5 and result["steady"] == 4
    assert result["fraction"] == pytest.approx((0.8 + 0.625) / 2)
    assert result["low"] == pytest.approx((50.0, 0.8))
    assert result["high"] == pytest.approx((80.0, 0.625))
    assert paired_fractions([(0.03, 50.0, 80.0)], 10**9) == {"steps": 1, "steady": 0}

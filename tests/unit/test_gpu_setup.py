"""GPU setup logic that runs anywhere: the CUDA-graph batch-size ladder and padding, the KV
budget arithmetic behind --gpu-memory-utilization, and the profiling step (the largest step
the scheduler can plan) on the tiny model, which must touch no real KV block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, EngineConfig
from engine.cuda_graphs import MAX_CAPTURED_BATCH, capture_sizes, padded_size
from engine.model_runner import kv_budget_bytes


@pytest.mark.parametrize(("max_num_seqs", "expected"), [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (16, [1, 2, 4, 8, 16]),
    (40, [1, 2, 4, 8, 16, 32, 40]), (64, [1, 2, 4, 8, 16, 32, 48, 64]),
])
def test_capture_sizes_ladder(max_num_seqs: int, expected: list[int]) -> None:
    assert capture_sizes(max_num_seqs) == expected


def test_capture_sizes_are_capped_and_padding_picks_the_next_size() -> None:
    sizes = capture_sizes(10_000)
    assert sizes[-1] == MAX_CAPTURED_BATCH and sizes == sorted(set(sizes))
    assert [padded_size(n, sizes) for n in (1, 3, 5, 9, 16, 17, 512)] == [1, 4, 8, 16, 16, 32,
                                                                          512]
    assert padded_size(513, sizes) is None  # larger batches run eagerly


def test_kv_budget_subtracts_what_is_used_and_the_activation_peak() -> None:
    gib = 1024**3
    # 80 GiB device, 0.9 of it ours; 10 GiB in use (weights, context, others), 2 GiB peak
    assert kv_budget_bytes(80 * gib, 70 * gib, 0.9, 2 * gib) == int(72 * gib) - 12 * gib
    # another process holding most of the device leaves nothing: negative, caller errors
    assert kv_budget_bytes(80 * gib, 5 * gib, 0.9, gib) < 0


def test_gpu_options_are_validated() -> None:
    config = EngineConfig.from_kwargs("m", enforce_eager=True, attention_backend="triton")
    assert config.model.enforce_eager and config.model.attention_backend == "triton"
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        EngineConfig.from_kwargs("m", attention_backend="flash")


def test_profiling_step_runs_the_largest_step_on_scratch_blocks(tiny_llama_dir: Path) -> None:
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", num_blocks=16,
              max_num_batched_tokens=96, max_num_seqs=5)
    runner = llm.llm_engine.core.runner
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    tokens = runner.dummy_step(96, 5)
    assert tokens.shape == (5,) and bool(((tokens >= 0) & (tokens < runner.vocab_size)).all())
    assert all(torch.equal(k, k0) and torch.equal(v, v0)
               for (k, v), (k0, v0) in zip(runner.kv_caches, before, strict=True))
    # the engine still generates normally afterwards
    from engine import SamplingParams

    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3,
                                                   ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3

"""A failed forward pass fails only the requests that cause it: the core retries the batch in
smaller groups, the culprit fails alone, every other request gets the tokens it gets alone
(seeded ones too), a same-step prefix hit on the culprit's unwritten blocks is recomputed, and
a fault that needs no request at all ends the engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import InvalidRequestError, SamplingParams
from engine.config import EngineConfig
from engine.kv_cache.hashing import get_hash_fn
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sequence import Sequence

POISON = [7, 7, 7, 7]
SHARED_PREFIX = list(range(100, 140))  # 40 tokens: two full 16-token blocks


def _engine(model_dir: Path, **engine_args: object) -> LLMEngine:
    return LLMEngine(EngineConfig.from_kwargs(str(model_dir), dtype="float32", device="cpu",
                                              num_blocks=128, **engine_args))


def _params(index: int) -> SamplingParams:
    # greedy and seeded random rows: both must come out as they do alone
    if index % 2 == 0:
        return SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return SamplingParams(temperature=1.0, top_k=20, seed=100 + index, max_tokens=12,
                          ignore_eos=True)


def _run(engine: LLMEngine, prompts: dict[str, list[int]],
         params: dict[str, SamplingParams]) -> dict[str, RequestOutput]:
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params[request_id])
    finals: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


def _is_poisoned(request: Sequence) -> bool:
    return request.prompt_token_ids[:len(POISON)] == POISON


def _assert_all_blocks_free(engine: LLMEngine) -> None:
    manager = engine.core.kv_cache_manager
    assert manager.num_free_blocks == manager.num_total_blocks


@pytest.fixture(scope="module")
def solo_tokens(tiny_llama_dir: Path) -> dict[str, list[int]]:
    """Each normal request's tokens when it runs alone."""
    engine = _engine(tiny_llama_dir)
    tokens = {}
    for request_id, prompt in NORMAL_PROMPTS.items():
        index = int(request_id.removeprefix("r"))
        final = _run(engine, {request_id: prompt}, {request_id: _params(index)})[request_id]
        tokens[request_id] = final.outputs[0].token_ids
    return tokens


NORMAL_PROMPTS = {f"r{i}": [30 + i, 41, 52 + 2 * i, 63, 74, 85 + i] for i in range(6)}


@pytest.mark.parametrize("culprits", [["r2"], ["r0", "r5"]])
def test_a_culprit_fails_alone_and_the_others_keep_their_tokens(
        tiny_llama_dir: Path, solo_tokens: dict[str, list[int]], culprits: list[str]) -> None:
    engine = _engine(tiny_llama_dir)
    prompts = {rid: (POISON + prompt if rid in culprits else prompt)
               for rid, prompt in NORMAL_PROMPTS.items()}
    calls: list[int] = []

    def fail_poisoned(requests: list[Sequence]) -> None:
        calls.append(len(requests))
        if any(_is_poisoned(r) and r.num_output_tokens >= 3 for r in requests):
            raise RuntimeError("injected forward-pass fault")  # from the 4th token on

    engine.fault_hooks.on_execute = fail_poisoned
    finals = _run(engine, prompts, {rid: _params(int(rid[1:])) for rid in prompts})
    for request_id, final in finals.items():
        if request_id in culprits:
            assert final.outputs[0].finish_reason == "error"
            assert "injected forward-pass fault" in (final.error or "")
            assert len(final.outputs[0].token_ids) == 3
        else:
            assert final.error is None
            assert final.outputs[0].token_ids == solo_tokens[request_id], request_id
    assert max(calls) == len(prompts) and min(calls) == 1  # it did retry in smaller groups
    _assert_all_blocks_free(engine)


def test_a_transient_fault_fails_nobody(tiny_llama_dir: Path,
                                        solo_tokens: dict[str, list[int]]) -> None:
    engine = _engine(tiny_llama_dir)
    armed = [True]

    def fail_once(requests: list[Sequence]) -> None:
        if armed[0] and any(r.num_output_tokens == 5 for r in requests):
            armed[0] = False
            raise RuntimeError("injected one-off fault")

    engine.fault_hooks.on_execute = fail_once
    finals = _run(engine, dict(NORMAL_PROMPTS),
                  {rid: _params(int(rid[1:])) for rid in NORMAL_PROMPTS})
    assert not armed[0]
    for request_id, final in finals.items():
        assert final.error is None
        assert final.outputs[0].token_ids == solo_tokens[request_id], request_id
    _assert_all_blocks_free(engine)


def test_a_same_step_prefix_hit_on_a_culprits_blocks_is_recomputed(tiny_llama_dir: Path) -> None:
    """B arrives with A and hits A's prompt blocks, allocated (and hashed) in the same step
    but never written because A's pass fails: B must not read them."""
    reference = _engine(tiny_llama_dir, enable_prefix_caching=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    b_prompt = POISON + SHARED_PREFIX + [1, 2, 3]
    expected = _run(reference, {"b": b_prompt}, {"b": greedy})["b"].outputs[0].token_ids

    engine = _engine(tiny_llama_dir)

    def fail_a(requests: list[Sequence]) -> None:
        if any(r.sequence_id == "a" and r.num_output_tokens == 0 for r in requests):
            raise RuntimeError("injected prefill fault")

    engine.fault_hooks.on_execute = fail_a
    finals = _run(engine, {"a": POISON + SHARED_PREFIX + [9], "b": b_prompt},
                  {"a": greedy, "b": greedy})
    assert finals["a"].outputs[0].finish_reason == "error"
    assert finals["b"].error is None
    assert finals["b"].outputs[0].token_ids == expected
    assert engine.core.scheduler.num_preemptions >= 1  # B went back to be recomputed
    engine.fault_hooks.on_execute = None
    # nothing garbage stayed in the prefix cache: a later request with the prefix is right
    again = _run(engine, {"c": b_prompt}, {"c": greedy})["c"]
    assert again.outputs[0].token_ids == expected
    _assert_all_blocks_free(engine)


def test_a_fault_that_needs_no_request_ends_the_engine(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir)

    def always_fail(requests: list[Sequence]) -> None:
        raise RuntimeError("injected persistent fault")

    engine.fault_hooks.on_execute = always_fail
    engine.add_request("x", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4))
    with pytest.raises(RuntimeError, match="persistent fault"):
        engine.step()


def test_out_of_memory_ends_the_engine_at_once(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir)
    calls: list[int] = []

    def out_of_memory(requests: list[Sequence]) -> None:
        calls.append(len(requests))
        raise MemoryError("injected")

    engine.fault_hooks.on_execute = out_of_memory
    for i in range(3):
        engine.add_request(f"m{i}", [5, 6, 7 + i], SamplingParams(temperature=0.0, max_tokens=4))
    with pytest.raises(MemoryError):
        engine.step()
    assert calls == [3]  # no retries: a lack of memory is the engine's, not a request's


def test_the_cache_config_chooses_the_block_hash(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir)
    assert engine.core.kv_cache_manager._hash_fn is get_hash_fn("sha256")
    config = EngineConfig.from_kwargs(str(tiny_llama_dir), dtype="float32", device="cpu",
                                      num_blocks=16, prefix_caching_hash_algo="xxhash")
    try:
        import xxhash  # noqa: F401
    except ImportError:
        with pytest.raises(InvalidRequestError, match="xxhash"):
            LLMEngine(config)
    else:
        assert LLMEngine(config).core.kv_cache_manager._hash_fn is not get_hash_fn("sha256")

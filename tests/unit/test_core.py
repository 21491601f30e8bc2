"""EngineCore over the fake runner: the values its outputs carry, chunked prefill rows, and a
failing pass that fails its culprit alone while every other sequence keeps its tokens."""

from __future__ import annotations

import time
from collections import abc
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from engine.core import EngineCore
from engine.outputs import EngineCoreOutput
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence, SequenceStatus
from tests.fake_runner import fake_core, greedy_tokens

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # 10 tokens: two full blocks of 4


def _request(request_id: str, prompt: abc.Sequence[int], max_tokens: int = 4,
             **params: object) -> Sequence:
    sampling: dict[str, object] = {"temperature": 0.0, "ignore_eos": True, **params}
    return Sequence(sequence_id=request_id, prompt_token_ids=list(prompt),
                   sampling_params=SamplingParams(max_tokens=max_tokens, **sampling),  # type: ignore[arg-type]
                   arrival_time=time.monotonic(), max_tokens=max_tokens)


@dataclass(slots=True)
class Run:
    steps: list[list[EngineCoreOutput]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def tokens(self, sequence_id: str) -> list[int]:
        return [t for step in self.steps for o in step if o.sequence_id == sequence_id
                for t in o.new_token_ids]

    def outputs(self, sequence_id: str) -> list[EngineCoreOutput]:
        return [o for step in self.steps for o in step if o.sequence_id == sequence_id]


def _run(core: EngineCore, requests: abc.Sequence[Sequence], max_steps: int = 200) -> Run:
    """Step until done, failing the sequences a step names as LLMEngine does."""
    for request in requests:
        core.add_sequence(request)
    run = Run()
    while core.has_unfinished_sequences():
        assert len(run.steps) < max_steps, "the core never finished"
        step = core.step()
        run.steps.append(step.outputs)
        run.failed.update(step.failed)
        core.finish_sequences(list(step.failed), SequenceStatus.FINISHED_ERROR)
    return run


def _assert_all_blocks_free(core: EngineCore) -> None:
    manager = core.kv_cache_manager
    assert manager.num_free_blocks == manager.num_total_blocks


# ---- what the outputs carry ---------------------------------------------------------------


def test_outputs_carry_tokens_finish_reason_and_times() -> None:
    core, runner = fake_core()
    run = _run(core, [_request("a", PROMPT, max_tokens=3)])
    outputs = run.outputs("a")
    assert [o.new_token_ids for o in outputs] == [[t] for t in greedy_tokens(PROMPT, 3)]
    assert [o.finish_reason for o in outputs] == [None, None, "length"]
    assert all(o.stop_reason is None and o.new_logprobs is None for o in outputs)
    assert [o.num_cached_tokens for o in outputs] == [0, 0, 0]
    first_scheduled = outputs[0].first_scheduled_time
    assert first_scheduled is not None
    assert all(o.first_scheduled_time == first_scheduled for o in outputs)
    times = [o.time for o in outputs]
    assert first_scheduled <= times[0] and times == sorted(times)
    _assert_all_blocks_free(core)


def test_stop_token_eos_and_prefix_hits_are_reported() -> None:
    core, _ = fake_core()
    expected = greedy_tokens(PROMPT, 4)
    _run(core, [_request("warm", PROMPT, max_tokens=1)])  # caches the prompt's full blocks
    run = _run(core, [
        _request("stop", PROMPT, stop_token_ids=(expected[1],)),
        _request("eos", PROMPT, ignore_eos=False, eos_token_ids=(expected[2],)),
        _request("logprobs", PROMPT, max_tokens=1, logprobs=2)])
    stop, eos, logprobs = (run.outputs(sid) for sid in ("stop", "eos", "logprobs"))
    assert [o.new_token_ids[0] for o in stop] == expected[:2]
    assert (stop[-1].finish_reason, stop[-1].stop_reason) == ("stop", expected[1])
    assert [o.new_token_ids[0] for o in eos] == expected[:3]
    assert (eos[-1].finish_reason, eos[-1].stop_reason) == ("stop", None)  # EOS: a plain stop
    # two full blocks of 4 are hits; the cap leaves the last prompt token to compute
    assert {o.num_cached_tokens for o in stop + eos + logprobs} == {8}
    [position] = logprobs[0].new_logprobs or []
    assert position[0] == (expected[0], -0.25, 1) and len(position) == 3


# ---- chunked prefill ----------------------------------------------------------------------


def test_chunked_prefill_rows_and_sampling_only_when_caught_up() -> None:
    core, runner = fake_core(max_num_batched_tokens=8)
    long_prompt = list(range(30, 50))  # 20 tokens: three chunks under an 8-token budget
    short_prompt = [60, 61, 62, 63, 64]
    run = _run(core, [_request("a", long_prompt, max_tokens=2),
                      _request("b", short_prompt, max_tokens=2)])
    assert runner.passes == [
        [("a", 0, 8)],
        [("a", 8, 16)],
        [("a", 16, 20), ("b", 0, 4)],  # b's prompt takes what the budget has left
        [("a", 20, 21), ("b", 4, 5)],
        [("b", 5, 6)],
    ]
    assert [[o.sequence_id for o in step] for step in run.steps] == [
        [], [], ["a"], ["a", "b"], ["b"]]
    assert run.tokens("a") == greedy_tokens(long_prompt, 2)
    assert run.tokens("b") == greedy_tokens(short_prompt, 2)
    _assert_all_blocks_free(core)


# ---- a failing pass -----------------------------------------------------------------------


NORMAL_PROMPTS = {f"r{i}": [30 + i, 41, 52 + 2 * i, 63, 74, 85 + i] for i in range(6)}


def _mixed_requests(prompts: dict[str, list[int]]) -> list[Sequence]:
    """Greedy (even ids) and seeded (odd ids) rows: both must come out as they do without a
    failure. Each row's parameters depend on its id only, not on who else runs."""
    requests = []
    for rid, prompt in prompts.items():
        index = int(rid.removeprefix("r"))
        if index % 2 == 0:
            requests.append(_request(rid, prompt, max_tokens=6))
        else:
            requests.append(_request(rid, prompt, max_tokens=6, temperature=1.0,
                                     seed=100 + index))
    return requests


def _after_tokens(culprits: abc.Sequence[str], num_tokens: int) -> Callable[[Sequence], bool]:
    """Fail any pass holding a culprit once it has generated `num_tokens` tokens."""
    return lambda r: r.sequence_id in culprits and r.num_output_tokens >= num_tokens


@pytest.mark.parametrize("culprits", [["r2"], ["r0", "r5"]])
def test_a_failing_pass_fails_its_culprit_alone(culprits: list[str]) -> None:
    baseline = _run(fake_core()[0], _mixed_requests(
        {rid: p for rid, p in NORMAL_PROMPTS.items() if rid not in culprits}))
    core, runner = fake_core()
    runner.fail_when = _after_tokens(culprits, 2)
    run = _run(core, _mixed_requests(NORMAL_PROMPTS))
    assert sorted(run.failed) == culprits
    assert all("fake pass failed on" in message for message in run.failed.values())
    for rid in NORMAL_PROMPTS:
        if rid in culprits:
            assert len(run.tokens(rid)) == 2  # what it had before its failing pass
        else:
            assert run.tokens(rid) == baseline.tokens(rid), f"{rid} was disturbed"
            assert run.outputs(rid)[-1].finish_reason == "length"
    assert runner.num_probes == 0  # some of the step passed: no need to ask the engine
    _assert_all_blocks_free(core)


def test_the_retries_bisect_the_batch_in_order() -> None:
    core, runner = fake_core()
    runner.fail_when = _after_tokens(["r2"], 0)
    _run(core, _mixed_requests(NORMAL_PROMPTS))
    first_step = [[rid for rid, _, _ in rows] for rows in runner.passes[:8]]
    everyone = ["r0", "r1", "r2", "r3", "r4", "r5"]
    # the whole batch once more (a transient fault passes then), then halves, order kept
    assert first_step == [everyone, everyone, ["r0", "r1", "r2"], ["r0"], ["r1", "r2"],
                          ["r1"], ["r2"], ["r3", "r4", "r5"]]
    assert [rid for rid, _, _ in runner.passes[8]] == ["r0", "r1", "r3", "r4", "r5"]


def test_a_same_step_hit_on_a_culprits_blocks_is_recomputed() -> None:
    shared = list(range(100, 116))  # four full blocks of 4
    culprit_prompt, neighbour_prompt = shared + [1, 2], shared + [3, 4]
    core, runner = fake_core()
    runner.fail_when = _after_tokens(["culprit"], 0)
    run = _run(core, [_request("culprit", culprit_prompt),
                      _request("neighbour", neighbour_prompt)])
    assert list(run.failed) == ["culprit"]
    # the neighbour first read the culprit's (never written) blocks, then ran again from 0
    neighbour_rows = [row for rows in runner.passes for row in rows if row[0] == "neighbour"]
    assert neighbour_rows[0] == ("neighbour", 16, 18)
    assert ("neighbour", 0, 18) in neighbour_rows
    assert run.tokens("neighbour") == greedy_tokens(neighbour_prompt, 4)
    assert run.outputs("neighbour")[0].num_cached_tokens == 16  # as first scheduled
    _assert_all_blocks_free(core)


def test_when_nothing_passes_the_probe_decides() -> None:
    core, runner = fake_core()
    runner.fail_when = lambda request: True
    run = _run(core, _mixed_requests(NORMAL_PROMPTS))
    assert sorted(run.failed) == sorted(NORMAL_PROMPTS)  # the engine is fine: requests fail
    assert runner.num_probes == 1

    broken, broken_runner = fake_core()
    broken_runner.fail_when = lambda request: True
    broken_runner.probe_error = RuntimeError("the device is gone")
    with pytest.raises(RuntimeError, match="the device is gone"):
        _run(broken, _mixed_requests(NORMAL_PROMPTS))


def test_out_of_memory_ends_the_step_without_retries() -> None:
    core, runner = fake_core()

    def out_of_memory(request: Sequence) -> bool:
        raise MemoryError("fake out of memory")

    runner.fail_when = out_of_memory
    with pytest.raises(MemoryError):
        _run(core, _mixed_requests(NORMAL_PROMPTS))
    assert len(runner.passes) == 1 and runner.num_probes == 0

"""AsyncEngine over an LLMEngine running the fake runner: generate() yields until finished, a
failure reaches the consumer only as the exception generate raises, leaving early aborts and
frees blocks, check_capacity refuses with 400 or 429 errors, deadlines time requests out, and a
dead loop fails its clients. Waits are on events and engine state, never on fixed sleeps."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from engine import (
    AsyncEngine,
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    RequestTimeoutError,
)
from engine.outputs import RequestOutput, RequestOutputKind
from engine.sampling_params import SamplingParams
from tests.fake_runner import (
    GUARD_S,
    all_blocks_free,
    fake_async_engine,
    greedy_tokens,
    running,
    tokenizer,
    until,
)

PROMPT = [30, 41, 52, 63, 74, 85]
POISON = [7, 7, 7, 7]


def _params(max_tokens: int = 5, **params: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA, **params)  # type: ignore[arg-type]


def _failures(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("pagedserve_request_failure_total",
                                      {"model_name": "fake", "reason": reason})
    assert value is not None
    return value


async def _collect(engine: AsyncEngine, request_id: str, prompt: list[int],
                   params: SamplingParams, seen: list[RequestOutput] | None = None,
                   **kwargs: float) -> list[RequestOutput]:
    outputs = [] if seen is None else seen
    async for output in engine.generate(request_id, prompt, params, **kwargs):
        outputs.append(output)
    return outputs


# ---- generation -----------------------------------------------------------------------------


def test_generate_yields_deltas_until_finished() -> None:
    engine, runner = fake_async_engine()

    async def run() -> tuple[list[RequestOutput], list[RequestOutput]]:
        async with running(engine, runner):
            return await asyncio.gather(_collect(engine, "one", PROMPT, _params(5)),
                                        _collect(engine, "two", PROMPT[:4], _params(3, n=2)))

    one, two = asyncio.run(run())
    assert [t for o in one for t in o.outputs[0].token_ids] == greedy_tokens(PROMPT, 5)
    assert [o.finished for o in one] == [False] * 4 + [True]
    assert one[-1].outputs[0].finish_reason == "length"
    assert [o.outputs[0].num_tokens for o in one] == [1, 2, 3, 4, 5]  # one token a delta
    assert "".join(o.outputs[0].text for o in one) == tokenizer().decode(
        greedy_tokens(PROMPT, 5), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for index in range(2):  # greedy: both choices generate the same tokens
        tokens = [t for o in two for t in o.outputs[index].token_ids]
        assert tokens == greedy_tokens(PROMPT[:4], 3)
    assert two[-1].finished and all(c.finish_reason == "length" for c in two[-1].outputs)
    assert all_blocks_free(engine)  # finished in the step, before the output was delivered


@pytest.mark.parametrize("fault", ["forward pass", "output processing"])
def test_an_engine_side_failure_is_raised_by_generate(fault: str) -> None:
    registry = CollectorRegistry()
    engine, runner = fake_async_engine(registry)

    def is_poisoned(prompt: list[int], num_tokens: int) -> bool:
        return prompt[:len(POISON)] == POISON and num_tokens >= 2

    if fault == "forward pass":
        runner.fail_when = lambda r: is_poisoned(r.prompt_token_ids, r.num_output_tokens)
    else:
        def break_output(request_id: str, prompt: list[int], num_tokens: int) -> None:
            if is_poisoned(prompt, num_tokens):
                raise RuntimeError("injected processing fault")

        engine.fault_hooks.on_request_output = break_output
    seen: list[RequestOutput] = []

    async def run() -> tuple[BaseException | None, list[RequestOutput]]:
        async with running(engine, runner):
            poisoned, neighbour = await asyncio.gather(
                _collect(engine, "poisoned", POISON + PROMPT, _params(8), seen),
                _collect(engine, "neighbour", PROMPT, _params(8)), return_exceptions=True)
            assert isinstance(neighbour, list)
            await until(lambda: all_blocks_free(engine), "the failed request's blocks free")
            return (poisoned if isinstance(poisoned, BaseException) else None), neighbour

    error, neighbour = asyncio.run(run())
    assert isinstance(error, RequestFailedError) and not isinstance(error, RequestTimeoutError)
    assert ("fake pass failed on poisoned" if fault == "forward pass"
            else "injected processing fault") in str(error)
    # one error path: the outputs before the exception are ordinary, unfinished deltas
    assert seen and all(not o.finished and o.error is None for o in seen)
    assert [t for o in neighbour for t in o.outputs[0].token_ids] == greedy_tokens(PROMPT, 8)
    assert _failures(registry, "error") == 1


def test_leaving_early_aborts_the_request_and_frees_its_blocks() -> None:
    registry = CollectorRegistry()
    engine, runner = fake_async_engine(registry)
    runner.hold(after_passes=1)  # the request cannot finish while the consumer decides

    async def run() -> None:
        async with running(engine, runner):
            stream = engine.generate("left", PROMPT, _params(100))
            first = await anext(stream)
            assert not first.finished and engine.num_free_blocks < engine.num_total_blocks
            await stream.aclose()  # type: ignore[attr-defined]  # a consumer that leaves
            runner.release_hold()
            await until(lambda: all_blocks_free(engine), "the aborted request's blocks free")
            await until(lambda: _failures(registry, "abort") == 1, "the abort counted")

    asyncio.run(run())
    assert engine.llm_engine.stats().num_unfinished_requests == 0


# ---- admission ------------------------------------------------------------------------------


def test_check_capacity_refuses_never_with_400_and_not_now_with_429() -> None:
    registry = CollectorRegistry()
    engine, runner = fake_async_engine(registry, max_queue_len=2, max_num_seqs=1)

    async def run() -> list[list[RequestOutput]]:
        with pytest.raises(InvalidRequestError) as never:
            engine.check_capacity(3, "prompt")  # more than may ever wait at once
        assert never.value.param == "prompt"
        async with running(engine, runner):
            runner.hold()
            busy = asyncio.create_task(_collect(engine, "running", PROMPT, _params(2)))
            await asyncio.to_thread(runner.held.wait, GUARD_S)  # "running" is in its pass
            waiting = [asyncio.create_task(_collect(engine, f"w{i}", PROMPT, _params(2)))
                       for i in range(2)]
            await until(lambda: engine.num_waiting == 2, "two sequences waiting")
            with pytest.raises(QueueFullError):
                engine.check_capacity(1)
            with pytest.raises(QueueFullError):
                await _collect(engine, "refused", PROMPT, _params(2))
            with pytest.raises(InvalidRequestError, match="more than the 2") as fan_out:
                await _collect(engine, "fan-out", PROMPT, _params(2, n=3))
            assert fan_out.value.param == "n"
            runner.release_hold()
            return await asyncio.gather(busy, *waiting)

    finals = asyncio.run(run())
    assert all(outputs[-1].finished for outputs in finals)  # the admitted ones all ran
    assert _failures(registry, "queue_full") == 2
    assert _failures(registry, "validation") == 2


# ---- time and death -------------------------------------------------------------------------


def test_a_passed_deadline_raises_request_timeout_and_frees_blocks() -> None:
    registry = CollectorRegistry()
    engine, runner = fake_async_engine(registry)
    runner.hold()  # no pass completes: only the deadline can end the request

    async def run() -> None:
        async with running(engine, runner):
            with pytest.raises(RequestTimeoutError, match="passed its deadline"):
                await _collect(engine, "slow", PROMPT, _params(5),
                               deadline=time.monotonic() + 0.05)
            runner.release_hold()
            await until(lambda: all_blocks_free(engine), "the timed-out request's blocks")
            await until(lambda: _failures(registry, "error") == 1, "the timeout counted")
            again = await _collect(engine, "after", PROMPT, _params(2))  # the engine goes on
            assert again[-1].finished

    asyncio.run(run())


def test_a_dead_loop_fails_its_clients_and_refuses_new_ones() -> None:
    engine, runner = fake_async_engine()
    runner.hold()

    def kill_the_loop() -> None:
        raise RuntimeError("injected loop fault")

    async def run() -> None:
        async with running(engine, runner):
            client = asyncio.create_task(_collect(engine, "client", PROMPT, _params(50)))
            await asyncio.to_thread(runner.held.wait, GUARD_S)
            engine.fault_hooks.on_step = kill_the_loop  # the next step dies
            runner.release_hold()
            with pytest.raises(EngineDeadError, match="injected loop fault"):
                await client
            assert not engine.is_alive
            with pytest.raises(EngineDeadError):
                await _collect(engine, "late", PROMPT, _params(2))

    asyncio.run(run())

"""Acceptance (fault injection): a fault in one request's processing fails that request alone;
a forward pass that fails because of one request fails that request only and spares the
prefix cache; a fault that needs no request ends the loop; a dead engine loop fails
every waiting client within 1 s and turns /health 503; a hung step turns /health 503 until it
ends; a request past --request-timeout gets 504 (or an error event) and its blocks are freed.

Faults come in through LLMEngine.fault_hooks, which production never sets."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from engine import LLM, SamplingParams
from engine.sequence import Sequence
from tests.integration.conftest import MODEL_NAME, RunningServer, poison_tokenizer, serve

POISON = [7, 7, 7, 7]  # a prompt starting with these token ids is the one a hook breaks
MAX_TOKENS = 24
# how long a wait for the engine or a client may last before the test fails: a guard against
# a hang, never the thing tested (a busy machine may take any part of it)
GUARD_S = 30.0


def _failures(reason: str) -> float:
    value = REGISTRY.get_sample_value("pagedserve_request_failure_total",
                                      {"model_name": MODEL_NAME, "reason": reason})
    return value or 0.0


def _completion(prompt: list[int], stream: bool = False, max_tokens: int = MAX_TOKENS
                ) -> dict[str, object]:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": stream}


def _normal_prompt(i: int) -> list[int]:
    return [30 + i, 41, 52 + 2 * i, 63, 74, 85 + i]


def _is_poisoned(request: Sequence) -> bool:
    return request.prompt_token_ids[:len(POISON)] == POISON


@dataclass(slots=True)
class Reply:
    """What one client saw: status, JSON body or SSE events, and when it ended."""

    status: int
    body: dict[str, object] | None
    events: list[str]
    ended_at: float


async def _request(client: httpx.AsyncClient, body: dict[str, object],
                   events: list[str]) -> Reply:
    """One client's request; SSE events are appended to `events` as they arrive."""
    if not body.get("stream"):
        response = await client.post("/v1/completions", json=body)
        return Reply(response.status_code, response.json(), [], time.monotonic())
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return Reply(response.status_code, response.json(), [], time.monotonic())
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    return Reply(200, None, events, time.monotonic())


def _run_clients(server: RunningServer, bodies: list[dict[str, object]],
                 on_started: Callable[[list[list[str]]], None] | None = None) -> list[Reply]:
    """Send every body at once; `on_started` runs in a thread meanwhile, seeing each client's
    SSE events so far."""
    received: list[list[str]] = [[] for _ in bodies]

    async def run() -> list[Reply]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers,
                                     timeout=60) as client:
            tasks = [asyncio.create_task(_request(client, body, events))
                     for body, events in zip(bodies, received, strict=True)]
            if on_started is not None:
                await asyncio.to_thread(on_started, received)
            return await asyncio.gather(*tasks)

    return asyncio.run(run())


def _assert_error_event_then_done(reply: Reply, code: str) -> dict[str, str]:
    assert reply.status == 200 and reply.events[-1] == "[DONE]", reply
    error = json.loads(reply.events[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert all("choices" in json.loads(event) for event in reply.events[:-2])
    return error


def _assert_envelope(reply: Reply, status: int, code: str) -> dict[str, str]:
    assert reply.status == status and reply.body is not None, reply
    error = reply.body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    return error


# ---------------------------------------------------------------- one request's processing


@pytest.fixture(scope="module")
def fault_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    with serve(tiny_llama_dir, num_blocks=256, max_num_seqs=16) as running:
        yield running


def test_processing_fault_fails_only_that_request(fault_server: RunningServer) -> None:
    http = fault_server.http()
    expected = [http.post("/v1/completions", json=_completion(_normal_prompt(i))).json()
                ["choices"][0]["text"] for i in range(5)]
    failures_before = _failures("error")

    def break_poisoned(request_id: str, prompt: list[int], num_tokens: int) -> None:
        # mid-stream, like a detokenizer that chokes on the third token
        if prompt[:len(POISON)] == POISON and num_tokens >= 3:
            raise RuntimeError("injected output-processing fault")

    fault_server.engine.fault_hooks.on_request_output = break_poisoned
    try:
        bodies = [_completion(_normal_prompt(i), stream=i % 2 == 0) for i in range(5)]
        bodies += [_completion(POISON + [1, 2], stream=False),
                   _completion(POISON + [3, 4], stream=True)]
        replies = _run_clients(fault_server, bodies)
    finally:
        fault_server.engine.fault_hooks.on_request_output = None

    for i, reply in enumerate(replies[:5]):
        assert reply.status == 200
        if reply.body is not None:
            text = reply.body["choices"][0]["text"]  # type: ignore[index]
        else:
            assert reply.events[-1] == "[DONE]"
            text = "".join(json.loads(e)["choices"][0]["text"] for e in reply.events[:-1]
                           if json.loads(e)["choices"])
        assert text == expected[i], f"client {i} was disturbed by the fault"
    error = _assert_envelope(replies[5], 500, "request_failed")
    assert "injected output-processing fault" in error["message"]
    assert error["type"] == "server_error"
    error = _assert_error_event_then_done(replies[6], "request_failed")
    assert "injected output-processing fault" in error["message"]
    assert len(replies[6].events) >= 3  # it failed mid-stream, after its first tokens
    fault_server.wait_idle(timeout_s=GUARD_S)
    assert _failures("error") - failures_before == 2
    assert http.get("/health").status_code == 200


def test_failed_pass_fails_its_culprit_only_and_spares_the_prefix_cache(
        fault_server: RunningServer, tiny_llama_dir: Path) -> None:
    """A forward pass that fails whenever one request is in it: that request gets a 500, a
    neighbour in the same batch finishes with its own tokens, and the blocks the failed pass
    hashed but never wrote are no prefix-cache hits afterwards."""
    prompt = POISON + list(range(100, 136))  # 40 tokens: two full 16-token blocks get hashed
    armed = threading.Event()
    armed.set()

    def fail_poisoned_batch(requests: list[Sequence]) -> None:
        if armed.is_set() and any(_is_poisoned(r) for r in requests):
            raise RuntimeError("injected forward-pass fault")

    http = fault_server.http()
    expected_neighbour = http.post("/v1/completions",
                                   json=_completion(_normal_prompt(3))).json()
    fault_server.engine.fault_hooks.on_execute = fail_poisoned_batch
    try:
        replies = _run_clients(fault_server, [_completion(prompt),
                                              _completion(_normal_prompt(3))])
        armed.clear()
        assert fault_server.engine.is_alive
        again = http.post("/v1/completions", json=_completion(prompt))
    finally:
        fault_server.engine.fault_hooks.on_execute = None
    error = _assert_envelope(replies[0], 500, "request_failed")
    assert "injected forward-pass fault" in error["message"]
    assert replies[1].status == 200 and replies[1].body is not None
    assert replies[1].body["choices"] == expected_neighbour["choices"]
    assert http.get("/health").status_code == 200
    # the failed pass hashed blocks it never wrote: a hit on them would hand out garbage KV
    assert again.status_code == 200
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    reference = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", num_blocks=64,
                    enable_prefix_caching=False).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert again.json()["choices"][0]["text"] == reference[0].outputs[0].text
    fault_server.wait_idle(timeout_s=GUARD_S)


def test_tokenizer_fault_fails_only_that_request(fault_server: RunningServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A tokenizer that raises on one prompt (before the engine sees it): a 500 envelope for
    that request, the others served."""
    poison_tokenizer(fault_server.engine, monkeypatch)
    bodies = [{**_completion([0]), "prompt": f"hello {i}", "stream": i % 2 == 0}
              for i in range(5)] + [{**_completion([0]), "prompt": "POISON"}]
    replies = _run_clients(fault_server, bodies)
    for reply in replies[:5]:
        assert reply.status == 200 and (reply.body is not None or reply.events[-1] == "[DONE]")
    _assert_envelope(replies[5], 500, "internal_error")
    fault_server.wait_idle(timeout_s=GUARD_S)


# ---------------------------------------------------------------- the engine loop itself


@pytest.fixture()
def doomed_server(long_context_llama_dir: Path) -> Iterator[RunningServer]:
    # decode steps of ~10 ms and max_num_seqs=2: two clients run, the others wait in the queue
    with serve(long_context_llama_dir, num_blocks=600, max_num_seqs=2) as running:
        yield running


def test_dead_engine_loop_fails_every_client_within_1s(
        doomed_server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    engine = doomed_server.engine
    bodies = [_completion(_normal_prompt(i), stream=i < 4, max_tokens=2000) for i in range(6)]
    died_at: list[float] = []

    def kill_the_loop() -> None:
        died_at.append(time.monotonic())
        raise RuntimeError("injected engine-loop fault")

    def when_all_admitted(received: list[list[str]]) -> None:
        deadline = time.monotonic() + GUARD_S
        while engine.num_running + engine.num_waiting < len(bodies):
            assert time.monotonic() < deadline, "the clients never reached the engine"
            time.sleep(0.01)
        # let a streaming client receive a few chunks: counted as they arrive, not guessed
        # from a fixed wait (a slow machine may still be prefilling after any fixed wait)
        while max(len(events) for events in received) < 3:
            assert time.monotonic() < deadline, "no streaming client received its chunks"
            time.sleep(0.01)
        engine.fault_hooks.on_step = kill_the_loop

    with caplog.at_level(logging.ERROR, logger="engine.async_engine"):
        replies = _run_clients(doomed_server, bodies, on_started=when_all_admitted)
    assert died_at, "the hook never ran"
    for reply in replies:
        if reply.body is not None or reply.status != 200:  # failed before any byte was sent
            _assert_envelope(reply, 500, "engine_dead")  # in flight: the server failed it
        else:
            _assert_error_event_then_done(reply, "engine_dead")
        assert reply.ended_at - died_at[0] < 1.0, "a client waited on a dead engine"
    assert sum(reply.status == 200 and len(reply.events) > 2 for reply in replies) >= 1
    health = doomed_server.http().get("/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    late = doomed_server.http().post("/v1/completions", json=_completion([1, 2, 3]))
    assert late.status_code == 503
    assert any("engine loop died" in r.getMessage() and r.exc_info is not None
               and "injected engine-loop fault" in str(r.exc_info[1]) for r in caplog.records)


def test_a_fault_without_a_culprit_ends_the_loop(tiny_llama_dir: Path) -> None:
    """Requests cannot end the loop, but a fault that reproduces with no request at all (the
    health probe after a failed pass) means a broken engine: it stops, loudly."""
    with serve(tiny_llama_dir, num_blocks=64) as running:
        def always_fail(requests: list[Sequence]) -> None:
            raise RuntimeError("injected persistent fault")

        running.engine.fault_hooks.on_execute = always_fail
        http = running.http()
        response = http.post("/v1/completions", json=_completion([5, 6, 7]))
        assert response.status_code == 500, response.text  # in flight when the loop died
        assert response.json()["error"]["code"] == "engine_dead"
        assert "injected persistent fault" in response.json()["error"]["message"]
        assert not running.engine.is_alive
        assert http.get("/health").status_code == 503


def test_hung_step_turns_health_503_until_it_ends(tiny_llama_dir: Path) -> None:
    with serve(tiny_llama_dir, num_blocks=64,
               server_settings={"engine_stall_timeout": 0.5}) as running:
        http = running.http()
        time.sleep(1.2)  # idle for longer than the limit: idle is not a stall
        assert http.get("/health").status_code == 200
        hanging, unhang = threading.Event(), threading.Event()

        def hang_once() -> None:  # the step hangs until the test has seen the 503
            if not hanging.is_set():
                hanging.set()
                unhang.wait(GUARD_S)

        running.engine.fault_hooks.on_step = hang_once
        result: list[httpx.Response] = []
        client = threading.Thread(target=lambda: result.append(
            running.http().post("/v1/completions", json=_completion([5, 6, 7]))))
        client.start()
        try:
            assert hanging.wait(GUARD_S), "the request never reached a step"
            deadline = time.monotonic() + GUARD_S
            while (health := http.get("/health")).status_code == 200:
                assert time.monotonic() < deadline, "/health never noticed the hung step"
                time.sleep(0.05)
        finally:
            unhang.set()
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_stalled"
        client.join(timeout=GUARD_S)
        running.engine.fault_hooks.on_step = None
        assert result and result[0].status_code == 200
        assert http.get("/health").status_code == 200


# ---------------------------------------------------------------- --request-timeout


@pytest.fixture(scope="module")
def timeout_server(long_context_llama_dir: Path) -> Iterator[RunningServer]:
    with serve(long_context_llama_dir, num_blocks=600, max_num_seqs=4,
               server_settings={"request_timeout": 1.0}) as running:
        yield running


def test_request_timeout_504_and_error_event_free_blocks(timeout_server: RunningServer) -> None:
    failures_before = _failures("error")
    replies = _run_clients(timeout_server, [_completion([9, 8, 7], max_tokens=2000),
                                            _completion([9, 8, 6], max_tokens=2000, stream=True)])
    error = _assert_envelope(replies[0], 504, "request_timeout")
    assert "1 s request timeout" in error["message"]
    _assert_error_event_then_done(replies[1], "request_timeout")
    chunks = [json.loads(event) for event in replies[1].events[:-2]]
    assert len(chunks) >= 2  # it streamed until the deadline ...
    assert all(choice["finish_reason"] is None  # ... and was cut short, not finished
               for chunk in chunks for choice in chunk["choices"])
    timeout_server.wait_idle(timeout_s=GUARD_S)
    assert _failures("error") - failures_before == 2
    quick = timeout_server.http().post("/v1/completions", json=_completion([9, 8], max_tokens=4))
    assert quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] == 4

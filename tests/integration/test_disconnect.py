"""Acceptance 4: clients that go away (streaming or not) have their requests aborted in the
engine, and every KV block is free again within 2 s."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.integration.conftest import MODEL_NAME, RunningServer, serve

NUM_CLIENTS = 10
MAX_TOKENS = 2000


@pytest.fixture(scope="module")
def long_server(long_context_llama_dir: Path) -> Iterator[RunningServer]:
    # room for 10 x ~2000 tokens, so only an abort (not KV pressure) can end these requests
    with serve(long_context_llama_dir, num_blocks=1600, max_num_seqs=16) as running:
        yield running


def _body(i: int, stream: bool) -> dict[str, object]:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"story {i}"}],
            "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, "stream": stream}


async def _drop_after_first_chunks(client: httpx.AsyncClient, i: int, num_chunks: int) -> int:
    seen = 0
    async with client.stream("POST", "/v1/chat/completions", json=_body(i, True)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen >= num_chunks:
                    break  # leaving the block closes the connection mid-stream
    return seen


def _num_aborted() -> float:
    """Requests the engine finished as aborted: proof that an abort, not a natural finish,
    ended them (a fast machine could otherwise finish 2000 tokens within the deadline)."""
    value = REGISTRY.get_sample_value("pagedserve_request_failure_total",
                                      {"model_name": MODEL_NAME, "reason": "abort"})
    return value or 0.0


def test_streaming_clients_dropped_mid_stream(long_server: RunningServer) -> None:
    aborted_before = _num_aborted()

    async def run() -> float:
        async with httpx.AsyncClient(base_url=long_server.base_url, headers=long_server.headers,
                                     timeout=60) as client:
            seen = await asyncio.gather(*(_drop_after_first_chunks(client, i, 3 + i % 3)
                                          for i in range(NUM_CLIENTS)))
            assert all(n >= 3 for n in seen)
            return time.monotonic()  # every client is gone

    dropped_at = asyncio.run(run())
    long_server.wait_idle(timeout_s=2.0)
    assert time.monotonic() - dropped_at < 2.0
    assert _num_aborted() - aborted_before == NUM_CLIENTS


def test_non_streaming_client_timing_out(long_server: RunningServer) -> None:
    aborted_before = _num_aborted()
    with httpx.Client(base_url=long_server.base_url, headers=long_server.headers,
                      timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=_body(0, False))
    long_server.wait_idle(timeout_s=2.0)
    assert _num_aborted() - aborted_before == 1


def test_server_still_serves_after_disconnects(long_server: RunningServer) -> None:
    response = long_server.http().post("/v1/chat/completions", json={
        **_body(1, False), "max_tokens": 4})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 4
    long_server.wait_idle()


def test_error_after_stream_start_is_one_error_event_then_done(
        long_server: RunningServer) -> None:
    """A request the engine ends under a streaming client (here aborted server-side, as on an
    admin abort or shutdown) becomes one error event followed by [DONE]."""
    with long_server.http().stream("POST", "/v1/chat/completions",
                                   json=_body(3, True)) as response:
        lines = response.iter_lines()
        events: list[str] = []
        for line in lines:
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if len(events) == 3:
                    long_server.engine.abort(json.loads(events[0])["id"])
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "server_error"
    assert all("choices" in json.loads(event) for event in events[:-2])
    long_server.wait_idle()


def test_sdk_raises_on_error_event(long_server: RunningServer) -> None:
    import openai

    stream = long_server.client().chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], max_tokens=MAX_TOKENS,
        stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    long_server.engine.abort(first.id)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    long_server.wait_idle()

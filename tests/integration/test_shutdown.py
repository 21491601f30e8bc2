"""Acceptance (graceful shutdown): SIGTERM during 10 in-flight streams lets them finish while
new requests get 503, then the process exits 0; streams still running when --shutdown-timeout
passes end with a clear error event instead, and the exit is still 0 (SIGINT alike)."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MODEL_NAME, ServerProcess, serve_process

NUM_STREAMS = 10


@dataclass(slots=True)
class StreamLog:
    events: list[str] = field(default_factory=list)
    status: int = 0


async def _stream(client: httpx.AsyncClient, i: int, max_tokens: int, log: StreamLog,
                  started: threading.Semaphore) -> None:
    body = {"model": MODEL_NAME, "prompt": [20 + i, 30, 40], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        log.status = response.status_code
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                log.events.append(line.removeprefix("data: "))
                if len(log.events) == 2:
                    started.release()


def _start_streams(server: ServerProcess, max_tokens: int
                   ) -> tuple[threading.Thread, list[StreamLog]]:
    """Run NUM_STREAMS streaming clients in a thread; return once each has its first chunks."""
    logs = [StreamLog() for _ in range(NUM_STREAMS)]
    started = threading.Semaphore(0)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, headers={
                "Authorization": "Bearer sk-test-key"}) as client:
            await asyncio.gather(*(_stream(client, i, max_tokens, logs[i], started)
                                   for i in range(NUM_STREAMS)))

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    for _ in range(NUM_STREAMS):
        assert started.acquire(timeout=60), "a stream never started"
    return thread, logs


def _assert_refused_while_draining(server: ServerProcess) -> None:
    response = httpx.post(f"{server.base_url}/v1/completions", timeout=10, headers={
        "Authorization": "Bearer sk-test-key"}, json={"prompt": [1, 2], "max_tokens": 2})
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "server_shutting_down" and set(error) == {
        "message", "type", "param", "code"}
    assert int(response.headers["retry-after"]) >= 1
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 503


def test_sigterm_lets_in_flight_streams_finish(long_context_llama_dir: Path,
                                               tmp_path: Path) -> None:
    max_tokens = 300  # a few seconds of decoding for ten streams on the slow tiny model
    with serve_process(long_context_llama_dir, tmp_path / "serve.log",
                       "--shutdown-timeout", "60", "--num-blocks", "600") as server:
        thread, logs = _start_streams(server, max_tokens)
        server.process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        _assert_refused_while_draining(server)
        still_streaming = sum(log.events[-1:] != ["[DONE]"] for log in logs)
        thread.join(timeout=120)
        returncode = server.process.wait(timeout=60)
        exited_after = time.monotonic() - signalled_at
    text = server.log_text()
    assert returncode == 0, text[-3000:]
    assert still_streaming > 0, "the streams ended before the refusal could be checked"
    for log in logs:
        assert log.status == 200 and log.events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in log.events[:-1]]
        assert all("error" not in chunk for chunk in chunks), chunks[-1]
        assert sum(len(c["choices"]) for c in chunks if c["choices"]) >= 2
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert exited_after < 60
    assert "shutting down" in text and "drained" in text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_streams_past_the_shutdown_timeout_end_with_an_error(
        long_context_llama_dir: Path, tmp_path: Path, signum: signal.Signals) -> None:
    with serve_process(long_context_llama_dir, tmp_path / "serve.log",
                       "--shutdown-timeout", "1", "--num-blocks", "1200") as server:
        thread, logs = _start_streams(server, max_tokens=2000)  # ~20 s each: far too long
        server.process.send_signal(signum)
        signalled_at = time.monotonic()
        _assert_refused_while_draining(server)
        thread.join(timeout=60)
        returncode = server.process.wait(timeout=60)
        exited_after = time.monotonic() - signalled_at
    text = server.log_text()
    assert returncode == 0, text[-3000:]
    assert exited_after < 15, text[-3000:]
    for log in logs:
        assert log.events[-1] == "[DONE]"
        error = json.loads(log.events[-2])["error"]
        assert error["code"] == "server_shutting_down"
        assert "1 s shutdown timeout" in error["message"]
    assert "failed 10 unfinished requests" in text

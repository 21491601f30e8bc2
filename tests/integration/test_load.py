"""Acceptance (load): 200 concurrent streaming clients for a minute against the tiny model served
by `python -m server serve`: no request fails, every stream ends with [DONE], the server's RSS
grows less than 10% between the first and the last 20 s, and afterwards nothing runs or waits
and every KV block is free."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import API_KEY, MODEL_NAME, ServerProcess, serve_process

NUM_CLIENTS = 200
DURATION_S = 60.0
WINDOW_S = 20.0  # RSS is compared between the first and the last window of this length
MAX_RSS_GROWTH = 0.10


@dataclass(slots=True)
class LoadResult:
    num_requests: int = 0
    failures: list[str] = field(default_factory=list)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds in, bytes)


def _request_body(rng: random.Random) -> tuple[str, dict[str, object]]:
    common: dict[str, object] = {"model": MODEL_NAME, "max_tokens": rng.randint(4, 48),
                                 "temperature": rng.choice([0.0, 0.7, 1.0]), "stream": True,
                                 "stream_options": {"include_usage": rng.random() < 0.5}}
    if rng.random() < 0.5:
        content = " ".join(rng.choice(["fox", "dog", "block", "cache", "quick", "paged"])
                           for _ in range(rng.randint(1, 30)))
        return "/v1/chat/completions", {**common, "messages": [
            {"role": "user", "content": content}]}
    prompt = [rng.randrange(5, 500) for _ in range(rng.randint(1, 60))]
    return "/v1/completions", {**common, "prompt": prompt}


async def _one_request(client: httpx.AsyncClient, rng: random.Random) -> str | None:
    """Run one streaming request to its end; None when it went right, else what went wrong."""
    path, body = _request_body(rng)
    events: list[str] = []
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            return f"{path}: HTTP {response.status_code} {(await response.aread())[:200]!r}"
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    if not events or events[-1] != "[DONE]":
        return f"{path}: stream did not end with [DONE] ({events[-1:]})"
    chunks = [json.loads(event) for event in events[:-1]]
    if any("error" in chunk for chunk in chunks):
        return f"{path}: error event {chunks[-1]}"
    if not any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks):
        return f"{path}: no finish_reason"
    return None


async def _client(client: httpx.AsyncClient, seed: int, stop_at: float,
                  result: LoadResult) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        try:
            problem = await _one_request(client, rng)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        result.num_requests += 1
        if problem is not None:
            result.failures.append(problem)


async def _sample_rss(server: ServerProcess, started: float, stop_at: float,
                      result: LoadResult) -> None:
    while time.monotonic() < stop_at:
        result.rss_samples.append((time.monotonic() - started, server.rss_bytes()))
        await asyncio.sleep(1.0)


def _run_load(server: ServerProcess) -> LoadResult:
    result = LoadResult()

    async def run() -> None:
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 10,
                              max_keepalive_connections=NUM_CLIENTS + 10)
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            started = time.monotonic()
            stop_at = started + DURATION_S
            await asyncio.gather(_sample_rss(server, started, stop_at, result),
                                 *(_client(client, seed, stop_at, result)
                                   for seed in range(NUM_CLIENTS)))

    asyncio.run(run())
    return result


def _gauges(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    wanted = {"pagedserve_num_requests_running", "pagedserve_num_requests_waiting",
              "pagedserve_kv_cache_usage_ratio"}
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name in wanted and sample.labels.get("model_name") == MODEL_NAME}


@pytest.mark.slow
def test_200_streaming_clients_for_a_minute(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with serve_process(tiny_llama_dir, tmp_path / "serve.log", "--num-blocks", "512",
                       "--max-num-seqs", "64", "--log-level", "warning") as server:
        result = _run_load(server)
        deadline = time.monotonic() + 5.0
        while any((gauges := _gauges(server)).values()) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not result.failures, f"{len(result.failures)} failed: {result.failures[:5]}"
    assert result.num_requests >= NUM_CLIENTS
    assert gauges == {"pagedserve_num_requests_running": 0.0,
                      "pagedserve_num_requests_waiting": 0.0,
                      "pagedserve_kv_cache_usage_ratio": 0.0}, gauges
    first = [rss for at, rss in result.rss_samples if at < WINDOW_S]
    last = [rss for at, rss in result.rss_samples if at >= DURATION_S - WINDOW_S]
    growth = statistics.mean(last) / statistics.mean(first) - 1
    print(f"\nload: {result.num_requests} requests in {DURATION_S:.0f} s, RSS "
          f"{statistics.mean(first) / 2**20:.0f} -> {statistics.mean(last) / 2**20:.0f} MiB "
          f"({growth:+.1%})")
    assert growth < MAX_RSS_GROWTH

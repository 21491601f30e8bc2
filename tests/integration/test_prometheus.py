"""pagedserve as a real server process (--metrics-names both), scraped every second by a real
Prometheus (Debian's `prometheus` package) on loopback: the TTFT quantile Prometheus computes
from our histogram lies within what 20 clients measured themselves, the ITL count equals
generated tokens minus requests, our dashboard's queries and every query of vLLM's published
Grafana dashboard evaluate to data, and /metrics parses in both exposition formats."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import LATENCY_BUCKETS
from tests.unit.test_docker_files import dashboard_expressions

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = Path("/usr/bin/prometheus")
NUM_REQUESTS = 20
STARTUP_TIMEOUT_S = 90.0
SCRAPE_TIMEOUT_S = 30.0
TTFT_P50 = ("histogram_quantile(0.5, "
            "rate(pagedserve_time_to_first_token_seconds_bucket[1m]))")

# Every PromQL expression of vLLM's example Grafana dashboard, as published in vLLM's docs
# (docs.vllm.ai/en/latest/examples/observability/prometheus_grafana/, the file
# examples/observability/prometheus_grafana/grafana.json of github.com/vllm-project/vllm;
# formerly examples/online_serving/prometheus_grafana/grafana.json), panel by panel. Its
# template variable model_name is `label_values(model_name)`; $model_name and
# $__rate_interval are substituted before the query.
_VLLM_QUANTILES = ("0.99", "0.95", "0.9", "0.5")
VLLM_DASHBOARD = [
    # E2E Request Latency
    *(f"histogram_quantile({q}, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket"
      '{model_name="$model_name"}[$__rate_interval])))' for q in _VLLM_QUANTILES),
    'rate(vllm:e2e_request_latency_seconds_sum{model_name="$model_name"}[$__rate_interval])\n'
    '/\nrate(vllm:e2e_request_latency_seconds_count{model_name="$model_name"}'
    "[$__rate_interval])",
    # Token Throughput
    'rate(vllm:prompt_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:generation_tokens_total{model_name="$model_name"}[$__rate_interval])',
    # Inter Token Latency
    *(f"histogram_quantile({q}, sum by(le) (rate(vllm:inter_token_latency_seconds_bucket"
      '{model_name="$model_name"}[$__rate_interval])))' for q in _VLLM_QUANTILES),
    'rate(vllm:inter_token_latency_seconds_sum{model_name="$model_name"}[$__rate_interval])'
    '\n/\nrate(vllm:inter_token_latency_seconds_count{model_name="$model_name"}'
    "[$__rate_interval])",
    # Time Per Output Token (TPOT)
    *(f"histogram_quantile({q}, sum by(le) (rate("
      'vllm:request_time_per_output_token_seconds_bucket{model_name="$model_name"}'
      "[$__rate_interval])))" for q in _VLLM_QUANTILES),
    'rate(vllm:request_time_per_output_token_seconds_sum{model_name="$model_name"}'
    '[$__rate_interval])\n/\nrate(vllm:request_time_per_output_token_seconds_count'
    '{model_name="$model_name"}[$__rate_interval])',
    # Scheduler State
    'vllm:num_requests_running{model_name="$model_name"}',
    'vllm:num_requests_waiting{model_name="$model_name"}',
    # Time To First Token Latency
    *(f"histogram_quantile({q}, sum by(le) (rate(vllm:time_to_first_token_seconds_bucket"
      '{model_name="$model_name"}[$__rate_interval])))' for q in _VLLM_QUANTILES),
    'rate(vllm:time_to_first_token_seconds_sum{model_name="$model_name"}[$__rate_interval])'
    '\n/\nrate(vllm:time_to_first_token_seconds_count{model_name="$model_name"}'
    "[$__rate_interval])",
    # Cache Utilization
    'vllm:kv_cache_usage_perc{model_name="$model_name"}',
    # Request Prompt Length, Request Generation Length (heatmaps)
    'sum by(le) (increase(vllm:request_prompt_tokens_bucket{model_name="$model_name"}'
    "[$__rate_interval]))",
    'sum by(le) (increase(vllm:request_generation_tokens_bucket{model_name="$model_name"}'
    "[$__rate_interval]))",
    # Finish Reason
    'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$model_name"}'
    "[$__rate_interval]))",
    # Queue Time
    'rate(vllm:request_queue_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    # Requests Prefill and Decode Time
    'rate(vllm:request_prefill_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_decode_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    # Max Generation Token in Sequence Group
    'rate(vllm:request_max_num_generation_tokens_sum{model_name="$model_name"}'
    "[$__rate_interval])",
]
# The panels of the dashboard's earlier version (before vLLM renamed these two metrics) that
# differ: Time Per Output Token Latency on vllm:time_per_output_token_seconds, and Cache
# Utilization on vllm:gpu_cache_usage_perc; its template variable was
# label_values({__name__=~"vllm:.*"}, model_name).
VLLM_OLDER_DASHBOARD = [
    *(f"histogram_quantile({q}, sum by(le) (rate(vllm:time_per_output_token_seconds_bucket"
      '{model_name="$model_name"}[$__rate_interval])))' for q in _VLLM_QUANTILES),
    'rate(vllm:time_per_output_token_seconds_sum{model_name="$model_name"}[$__rate_interval])'
    '\n/\nrate(vllm:time_per_output_token_seconds_count{model_name="$model_name"}'
    "[$__rate_interval])",
    'vllm:gpu_cache_usage_perc{model_name="$model_name"}',
]


def prometheus_binary() -> str:
    """Debian's Prometheus; skipped where it is not installed, except in CI (env CI set)."""
    found = shutil.which("prometheus") or (str(PROMETHEUS) if PROMETHEUS.exists() else None)
    if found is not None:
        return found
    message = ("Prometheus is not installed: `apt-get install -y prometheus` (Debian package) "
               "puts it at /usr/bin/prometheus")
    if os.environ.get("CI"):
        pytest.fail(f"{message}; .ci/run must install it")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(condition: object, what: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout_s}s; log:\n{log.read_text()[-4000:]}")


# ---- the two processes --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pagedserve(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m server serve` on an OS-chosen loopback port. Two sequences at a time and a
    64-token step budget make the 20 requests queue, so their TTFTs spread widely."""
    log = tmp_path_factory.mktemp("pagedserve") / "server.log"
    command = [sys.executable, "-m", "server", "serve", str(tiny_llama_dir), "--host",
               "127.0.0.1", "--port", "0", "--dtype", "float32", "--device", "cpu",
               "--num-blocks", "256", "--block-size", "16", "--max-num-seqs", "2",
               "--max-num-batched-tokens", "64", "--log-level", "info",
               "--metrics-names", "both"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
    try:
        urls: list[str] = []

        def listening() -> bool:
            assert process.poll() is None, f"pagedserve exited:\n{log.read_text()}"
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
            if match:
                urls.append(match.group(1))
            return bool(match)

        wait_for(listening, "pagedserve did not listen", log, STARTUP_TIMEOUT_S)
        base_url = urls[0]
        wait_for(lambda: _status(f"{base_url}/health") == 200, "/health did not turn 200",
                 log, STARTUP_TIMEOUT_S)
        yield base_url
    finally:
        stop(process)


@dataclass(slots=True)
class Prometheus:
    url: str

    def query(self, promql: str) -> list[dict[str, object]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (promql, body)
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        """The single series' value, or None when the query returns nothing."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, (promql, result)
        return float(result[0]["value"][1])  # type: ignore[index]


@pytest.fixture(scope="module")
def prometheus(pagedserve: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus scraping only pagedserve, every second; it listens on loopback and has no
    other target, alertmanager or remote endpoint."""
    binary = prometheus_binary()
    root = tmp_path_factory.mktemp("prometheus")
    target = pagedserve.removeprefix("http://")
    config = root / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "pagedserve", "metrics_path": "/metrics",
                            "static_configs": [{"targets": [target]}]}]}))
    port = free_port()
    log = root / "prometheus.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            cwd=root, stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: process.poll() is None and _status(f"{url}/-/ready") == 200,
                 "Prometheus did not get ready", log, STARTUP_TIMEOUT_S)
        server = Prometheus(url)
        # a first scrape with every series at 0, so rate() sees the whole run as increase
        wait_for(lambda: server.scalar("pagedserve_time_to_first_token_seconds_count") == 0,
                 "Prometheus did not scrape pagedserve", log, SCRAPE_TIMEOUT_S)
        yield server
    finally:
        stop(process)


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


# ---- 20 streaming clients -----------------------------------------------------------------------

@dataclass(slots=True)
class ClientRun:
    ttfts: list[float]  # seconds from sending to the first streamed token, per request
    num_generated: int  # completion tokens, per the usage chunks
    num_prompt_tokens: int  # the prompts' lengths, summed
    model: str


async def _stream_one(client: httpx.AsyncClient, model: str, prompt: list[int],
                      max_tokens: int) -> tuple[float, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    ttft, usage = None, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if chunk["choices"] and ttft is None:
                ttft = time.monotonic() - start
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    assert ttft is not None and usage is not None
    return ttft, usage


@pytest.fixture(scope="module")
def client_run(pagedserve: str, prometheus: Prometheus) -> ClientRun:
    rng = random.Random(0)
    model = httpx.get(f"{pagedserve}/v1/models", timeout=10).json()["data"][0]["id"]
    shared = [rng.randrange(3, 500) for _ in range(32)]  # a shared prefix: some cache hits
    jobs = [(shared + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 24))],
             rng.randrange(8, 17)) for _ in range(NUM_REQUESTS)]

    async def run() -> list[tuple[float, int]]:
        async with httpx.AsyncClient(base_url=pagedserve, timeout=120) as client:
            # open the 20 connections first, so the TTFTs measured below do not include
            # connection set-up, which the server cannot see
            await asyncio.gather(*(client.get("/health") for _ in range(NUM_REQUESTS)))
            return await asyncio.gather(*(_stream_one(client, model, prompt, max_tokens)
                                          for prompt, max_tokens in jobs))

    results = asyncio.run(run())
    assert [usage for _, usage in results] == [max_tokens for _, max_tokens in jobs]
    return ClientRun([ttft for ttft, _ in results], sum(u for _, u in results),
                     sum(len(prompt) for prompt, _ in jobs), model)


@pytest.fixture(scope="module")
def scraped(prometheus: Prometheus, client_run: ClientRun) -> Prometheus:
    """Prometheus once it has scraped the state after the last request."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while prometheus.scalar("pagedserve_e2e_request_latency_seconds_count") != NUM_REQUESTS:
        assert time.monotonic() < deadline, "Prometheus never saw all 20 requests finish"
        time.sleep(0.2)
    return prometheus


def bucket_bounds(value: float) -> tuple[float, float]:
    """The (lower, upper] bounds of the latency bucket holding `value`."""
    lower = 0.0
    for upper in LATENCY_BUCKETS:
        if value <= upper:
            return lower, upper
        lower = upper
    return lower, float("inf")


# ---- the checks ---------------------------------------------------------------------------------

def test_ttft_p50_lies_within_the_clients_measurements(scraped: Prometheus,
                                                        client_run: ClientRun) -> None:
    p50 = scraped.scalar(TTFT_P50)
    assert p50 is not None, "no TTFT quantile"
    # histogram_quantile interpolates inside a bucket, so compare against the bounds of the
    # buckets holding the fastest and the slowest client-side TTFT
    low, _ = bucket_bounds(min(client_run.ttfts))
    _, high = bucket_bounds(max(client_run.ttfts))
    assert low <= p50 <= high, (p50, sorted(client_run.ttfts))
    assert scraped.scalar("pagedserve_time_to_first_token_seconds_count") == NUM_REQUESTS


def test_itl_count_is_generated_tokens_minus_requests(scraped: Prometheus,
                                                      client_run: ClientRun) -> None:
    itl_count = scraped.scalar("pagedserve_inter_token_latency_seconds_count")
    assert itl_count == client_run.num_generated - NUM_REQUESTS
    assert scraped.scalar("pagedserve_generation_tokens_total") == client_run.num_generated
    assert scraped.scalar('pagedserve_request_success_total{finish_reason="length"}') == \
        NUM_REQUESTS
    assert scraped.scalar("pagedserve_prefix_cache_hits_total") > 0  # type: ignore[operator]
    assert scraped.scalar("pagedserve_num_requests_running") == 0
    assert scraped.scalar("pagedserve_num_requests_waiting") == 0


def test_series_carry_the_served_model_name(scraped: Prometheus, client_run: ClientRun) -> None:
    response = httpx.get(f"{scraped.url}/api/v1/label/model_name/values", timeout=10)
    assert response.json()["data"] == [client_run.model]


def test_dashboard_queries_evaluate_to_data(scraped: Prometheus) -> None:
    for expr in dashboard_expressions():
        if expr.startswith("label_values("):  # a Grafana function, checked above
            continue
        promql = expr.replace("$model_name", ".*").replace("$__rate_interval", "1m")
        assert scraped.query(promql), f"no data for the dashboard query {promql!r}"


def test_vllm_dashboard_queries_evaluate_to_data(scraped: Prometheus,
                                                client_run: ClientRun) -> None:
    """Every query of vLLM's dashboard (and of its earlier version) returns series with finite
    values: the requests all finished within the rate window, so no rate is 0/0."""
    for expr in VLLM_DASHBOARD + VLLM_OLDER_DASHBOARD:
        promql = expr.replace("$model_name", client_run.model).replace("$__rate_interval",
                                                                        "1m")
        result = scraped.query(promql)
        assert result, f"no data for vLLM's dashboard query {promql!r}"
        for series in result:
            value = float(series["value"][1])  # type: ignore[index]
            assert math.isfinite(value), (promql, series)
    for template_query in ("model_name", '{__name__=~"vllm:.*"}'):  # new and old variable
        response = httpx.get(f"{scraped.url}/api/v1/label/model_name/values",
                             params={"match[]": template_query}
                             if template_query.startswith("{") else {}, timeout=10)
        assert response.json()["data"] == [client_run.model], template_query


def test_vllm_names_count_as_vllm_does(scraped: Prometheus, client_run: ClientRun) -> None:
    """The same run through both namings, as Prometheus stored them: vLLM counts each prompt
    whole (its cache hits too), pagedserve the prompt tokens it computed."""
    assert scraped.scalar("vllm:generation_tokens_total") == client_run.num_generated
    assert scraped.scalar("vllm:prompt_tokens_total") == client_run.num_prompt_tokens
    cached = scraped.scalar("vllm:prompt_tokens_cached_total")
    assert cached is not None and cached > 0  # the shared 32-token prefix
    assert scraped.scalar("pagedserve_prompt_tokens_total") == (
        client_run.num_prompt_tokens - cached)
    assert scraped.scalar('vllm:request_success_total{finished_reason="length"}') == (
        NUM_REQUESTS)
    assert scraped.scalar("vllm:time_to_first_token_seconds_count") == NUM_REQUESTS
    assert scraped.scalar("vllm:inter_token_latency_seconds_count") == (
        client_run.num_generated - NUM_REQUESTS)
    engines = scraped.query('count by (engine) ({__name__=~"vllm:.*"})')
    assert [series["metric"] for series in engines] == [{"engine": "0"}]


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0"])
def test_metrics_endpoint_parses_with_help_everywhere(pagedserve: str, client_run: ClientRun,
                                                      accept: str) -> None:
    response = httpx.get(f"{pagedserve}/metrics", headers={"Accept": accept}, timeout=10)
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    if accept:
        assert content_type.startswith("application/openmetrics-text")
        families = list(parse_om(response.text))
    else:
        assert content_type.startswith("text/plain")
        families = list(text_string_to_metric_families(response.text))
    ours = [f for f in families if f.name.startswith("pagedserve_")]
    assert len(ours) >= 20
    vllms = {s.name for f in families if f.name.startswith("vllm:") for s in f.samples}
    assert {"vllm:prompt_tokens_total", "vllm:e2e_request_latency_seconds_bucket"} <= vllms
    for family in families:
        assert family.documentation.strip(), f"{family.name} has no HELP"
        assert not [s for s in family.samples if s.name.endswith("_created")], family.name

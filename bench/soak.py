"""Soak test: minutes of random request mixes and client disconnects against one server, then a
summary of requests, errors, the server's RSS over time and any KV blocks left held.

    python bench/soak.py --minutes 10 --tiny                  # starts a server on a tiny model
    python bench/soak.py --minutes 10 --model DIR [--server-arg=--num-blocks=512 ...]
    python bench/soak.py --minutes 10 --url http://127.0.0.1:8000 --api-key KEY [--pid PID]

Each client loops: chat or legacy completion, streamed or not, random lengths, sampling
settings, n, logprobs and stop strings; some requests are invalid on purpose (a 4xx is then
the right answer) and some clients vanish before the first byte or mid-stream. An error is a
5xx, an unexpected status, a broken connection the client did not cause, a stream without
[DONE] or with an error event. At the end the load stops and the server must go idle: no
request running or waiting and KV cache usage 0 (from /metrics). Exit status 1 on any error
or leak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger("bench.soak")

REPO = Path(__file__).resolve().parents[1]
WORDS = ("cache", "block", "paged", "attention", "token", "stream", "batch", "queue", "model",
         "fox", "quick", "lazy", "dog", "server", "client", "request", "python", "function")
GAUGES = ("pagedserve_num_requests_running", "pagedserve_num_requests_waiting",
          "pagedserve_kv_cache_usage_ratio")
COUNTERS = ("pagedserve_request_success_total", "pagedserve_request_failure_total",
            "pagedserve_num_preemptions_total")
IDLE_TIMEOUT_S = 10.0


@dataclass(slots=True)
class SoakConfig:
    url: str
    api_key: str | None
    model_name: str | None
    minutes: float
    concurrency: int
    disconnect_rate: float
    invalid_rate: float
    max_tokens: int
    sample_interval_s: float
    seed: int
    max_prompt_words: int = 200  # lowered to fit the served context (see fit_to_context)


@dataclass(slots=True)
class Tally:
    """What the clients saw, and the server's state over time."""

    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    num_tokens: int = 0  # streamed content chunks
    samples: list[dict[str, float]] = field(default_factory=list)  # t, rss, gauges


# ---------------------------------------------------------------- one request


def _request(rng: random.Random, config: SoakConfig) -> tuple[str, dict[str, object], bool]:
    """(path, body, invalid): a random request; invalid ones must get a 4xx."""
    body: dict[str, object] = {"max_tokens": rng.randint(1, config.max_tokens),
                               "stream": rng.random() < 0.7,
                               "temperature": rng.choice([0.0, 0.0, 0.5, 1.0])}
    if config.model_name:
        body["model"] = config.model_name
    if rng.random() < 0.1:
        body["n"] = 2
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS)]
    if body["stream"] and rng.random() < 0.3:  # without stream=true it is a 400, as OpenAI's
        body["stream_options"] = {"include_usage": True}
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, config.max_prompt_words)))
    if rng.random() < 0.6:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.2:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
    else:
        path = "/v1/completions"
        body["prompt"] = text
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 5)
    invalid = rng.random() < config.invalid_rate
    if invalid:
        body.update(rng.choice([{"temperature": -1}, {"top_p": 2}, {"n": 0},
                                {"max_tokens": 10**7}, {"logprobs": 99}]))
    return path, body, invalid


async def _consume(response: httpx.Response, streamed: bool, tally: Tally,
                   sent_at: float) -> str | None:
    """Read a 200 response to its end; None when it is well formed, else the problem."""
    if not streamed:
        payload = json.loads(await response.aread())
        return None if payload.get("choices") else f"no choices: {str(payload)[:200]}"
    events: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            if not events:
                tally.ttfts.append(time.monotonic() - sent_at)
            events.append(line.removeprefix("data: "))
    if not events or events[-1] != "[DONE]":
        return f"stream without [DONE] ({events[-1:]})"
    errors = [e for e in events[:-1] if '"error"' in e and "error" in json.loads(e)]
    tally.num_tokens += len(events) - 1
    return f"error event {errors[0][:300]}" if errors else None


async def _send(client: httpx.AsyncClient, path: str, body: dict[str, object], invalid: bool,
                tally: Tally, drop_after_events: int | None = None) -> str:
    """One request to its end (or, streamed, until `drop_after_events` events, then hang up);
    returns the outcome name (errors also go to tally.errors)."""
    sent_at = time.monotonic()
    async with client.stream("POST", path, json=body) as response:
        status = response.status_code
        if invalid or status != 200:
            await response.aread()
            if invalid and 400 <= status < 500 and "error" in response.json():
                return "rejected as expected"
            tally.errors.append(f"{path}: HTTP {status} {response.text[:300]}")
            return "error"
        if drop_after_events is not None:
            return await _hang_up_mid_stream(response, drop_after_events)
        problem = await _consume(response, bool(body["stream"]), tally, sent_at)
    if problem is not None:
        tally.errors.append(f"{path}: {problem}")
        return "error"
    return "completed"


async def _hang_up_mid_stream(response: httpx.Response, num_events: int) -> str:
    seen = 0
    async for line in response.aiter_lines():
        if line == "data: [DONE]":
            return "completed before the planned disconnect"
        seen += line.startswith("data: ")
        if seen >= num_events:
            return "disconnected mid-stream"  # leaving the block closes the connection
    return "completed before the planned disconnect"


async def _one(client: httpx.AsyncClient, rng: random.Random, config: SoakConfig,
               tally: Tally) -> str:
    path, body, invalid = _request(rng, config)
    if invalid or rng.random() >= config.disconnect_rate:
        return await _send(client, path, body, invalid, tally)
    if body["stream"] and rng.random() < 0.5:
        num_events = rng.randint(1, int(body["max_tokens"]))  # type: ignore[call-overload]
        return await _send(client, path, body, False, tally, drop_after_events=num_events)
    # vanish after a short random delay: while queued, in prefill, or waiting for the body
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_send(client, path, body, False, tally), rng.uniform(0, 0.1))
        return "completed before the planned disconnect"
    return "disconnected early"


async def _client(client: httpx.AsyncClient, seed: int, config: SoakConfig, stop_at: float,
                  tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        try:
            outcome = await _one(client, rng, config, tally)
        except httpx.HTTPError as exc:
            tally.errors.append(f"transport: {type(exc).__name__}: {exc}")
            outcome = "error"
        tally.outcomes[outcome] += 1


# ---------------------------------------------------------------- the server's side


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """Gauges and counters from /metrics, summed over labels other than model_name."""
    text = (await client.get("/metrics")).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name in GAUGES or name in COUNTERS:
                label = sample.labels.get("reason") or sample.labels.get("finish_reason")
                key = f"{name}{{{label}}}" if label else name
                values[key] = values.get(key, 0.0) + sample.value
    return values


async def _sampler(client: httpx.AsyncClient, pid: int | None, started: float, stop_at: float,
                   interval_s: float, tally: Tally) -> None:
    next_report = started + 60.0
    while time.monotonic() < stop_at:
        sample = {"t": time.monotonic() - started, **await scrape(client)}
        rss = rss_bytes(pid)
        if rss is not None:
            sample["rss_mib"] = rss / 2**20
        tally.samples.append(sample)
        if time.monotonic() >= next_report:
            next_report += 60.0
            logger.info("%4.0f s: %d requests, %d errors, running %.0f, waiting %.0f, "
                        "KV %.0f%%, RSS %s MiB", sample["t"], sum(tally.outcomes.values()),
                        len(tally.errors), sample.get(GAUGES[0], 0), sample.get(GAUGES[1], 0),
                        100 * sample.get(GAUGES[2], 0), f"{sample.get('rss_mib', 0):.0f}")
        await asyncio.sleep(interval_s)


async def _wait_idle(client: httpx.AsyncClient) -> tuple[dict[str, float], float]:
    """The gauges once idle (or at the timeout), and how long that took."""
    started = time.monotonic()
    while True:
        values = await scrape(client)
        gauges = {name: values.get(name, float("nan")) for name in GAUGES}
        if not any(gauges.values()) or time.monotonic() - started > IDLE_TIMEOUT_S:
            return gauges, time.monotonic() - started
        await asyncio.sleep(0.1)


async def fit_to_context(client: httpx.AsyncClient, config: SoakConfig) -> None:
    """Keep valid requests valid: prompt words and max_tokens within the served context."""
    card = (await client.get("/v1/models")).json()["data"][0]
    max_model_len = int(card["max_model_len"])
    config.model_name = config.model_name or card["id"]
    config.max_tokens = min(config.max_tokens, max_model_len // 4)
    # a word can take a few tokens (tiny tokenizers), plus the chat template's own
    config.max_prompt_words = max(1, min(config.max_prompt_words, max_model_len // 8))


async def soak(config: SoakConfig, pid: int | None) -> tuple[Tally, dict[str, float], float,
                                                              int]:
    tally = Tally()
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency + 8)
    async with httpx.AsyncClient(base_url=config.url, headers=headers, timeout=600,
                                 limits=limits) as client:
        await fit_to_context(client, config)
        started = time.monotonic()
        stop_at = started + config.minutes * 60
        await asyncio.gather(
            _sampler(client, pid, started, stop_at, config.sample_interval_s, tally),
            *(_client(client, config.seed * 100_003 + i, config, stop_at, tally)
              for i in range(config.concurrency)))
        gauges, idle_after = await _wait_idle(client)
        tally.samples.append({"t": time.monotonic() - started, **await scrape(client),
                              **({"rss_mib": r / 2**20} if (r := rss_bytes(pid)) else {})})
        health = (await client.get("/health")).status_code
    return tally, gauges, idle_after, health


# ---------------------------------------------------------------- report


def summary(config: SoakConfig, tally: Tally, gauges: dict[str, float], idle_after: float,
            health: int) -> tuple[str, bool]:
    """The printed report, and whether the run was clean."""
    first, last = tally.samples[0], tally.samples[-1]
    lines = [f"soak: {config.minutes:g} min, {config.concurrency} clients, disconnect rate "
             f"{config.disconnect_rate:.0%}, invalid rate {config.invalid_rate:.0%}, "
             f"seed {config.seed}",
             f"requests: {sum(tally.outcomes.values())} "
             f"({', '.join(f'{k} {v}' for k, v in tally.outcomes.most_common())})",
             f"errors: {len(tally.errors)}"]
    lines += [f"  {error}" for error in tally.errors[:10]]
    if tally.ttfts:
        ttfts = sorted(tally.ttfts)
        lines.append(f"client TTFT: p50 {statistics.median(ttfts) * 1000:.0f} ms, p99 "
                     f"{ttfts[int(0.99 * (len(ttfts) - 1))] * 1000:.0f} ms; "
                     f"{tally.num_tokens} streamed chunks")
    lines.append("server counters over the run: " + ", ".join(
        f"{key.removeprefix('pagedserve_')} +{last[key] - first.get(key, 0):.0f}"
        for key in sorted(last) if key.startswith(COUNTERS) and last[key] != first.get(key)))
    lines.append("RSS (MiB) over time: " + (", ".join(
        f"{s['t'] / 60:.0f}m {s['rss_mib']:.0f}" for s in _per_minute(tally.samples))
        if "rss_mib" in first else "n/a (no --pid)"))
    leaked = any(value != 0 for value in gauges.values())
    lines.append(f"after the load: idle after {idle_after:.1f} s, " + ", ".join(
        f"{name.removeprefix('pagedserve_')} {value:g}" for name, value in gauges.items())
        + f", /health {health} -> " + ("LEAK" if leaked else "no block leaked"))
    clean = not tally.errors and not leaked and health == 200
    lines.append("result: " + ("clean" if clean else "PROBLEMS"))
    return "\n".join(lines), clean


def _per_minute(samples: list[dict[str, float]]) -> list[dict[str, float]]:
    """One sample per started minute, plus the last one."""
    picked, minute = [], -1
    for sample in samples:
        if "rss_mib" in sample and int(sample["t"] // 60) > minute:
            minute = int(sample["t"] // 60)
            picked.append(sample)
    if samples and "rss_mib" in samples[-1] and samples[-1] is not picked[-1]:
        picked.append(samples[-1])
    return picked


# ---------------------------------------------------------------- a server of our own


@contextlib.contextmanager
def started_server(model_dir: str, extra_args: list[str], log_path: Path
                   ) -> Iterator[tuple[str, int]]:
    """`python -m server serve MODEL` on a free port; yields (url, pid); SIGTERM at the end."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "server", "serve", model_dir, "--port", str(port),
               "--served-model-name", "soak", *extra_args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, log_path)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            logger.info("server exited with %d", process.wait(timeout=60))
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_healthy(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 30 * 60  # the embedded default converts once on first use
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit("the server never became healthy")


def _tiny_model_dir() -> str:
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import save_tiny_model

    return str(save_tiny_model("llama", Path(tempfile.mkdtemp(prefix="soak-")) / "llama"))


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="soak a running server at this base URL")
    target.add_argument("--model", help="start `python -m server serve MODEL` and soak it")
    target.add_argument("--tiny", action="store_true",
                        help="start a server on the test suite's tiny random llama")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for the started server (repeatable, e.g. "
                        "--server-arg=--num-blocks=512)")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"))
    parser.add_argument("--pid", type=int, help="server process id, for RSS (with --url)")
    parser.add_argument("--served-model-name", help="`model` to send (with --url)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnect-rate", type=float, default=0.2)
    parser.add_argument("--invalid-rate", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--sample-interval", type=float, default=5.0, help="seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", default=str(Path(tempfile.gettempdir()) / "soak-server.log"),
                        help="started server's log file (default: in the temp directory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        url, pid, name = args.url, args.pid, args.served_model_name
        if url is None:
            model = args.model or (_tiny_model_dir() if args.tiny else "")
            extra = ["--dtype", "float32", "--num-blocks", "1024"] if args.tiny else []
            url, pid = stack.enter_context(started_server(
                model, extra + args.server_arg, Path(args.log)))
            name = "soak"
        config = SoakConfig(url, args.api_key, name, args.minutes, args.concurrency,
                            args.disconnect_rate, args.invalid_rate, args.max_tokens,
                            args.sample_interval, args.seed)
        logger.info("soaking %s for %g min", url, args.minutes)
        tally, gauges, idle_after, health = asyncio.run(soak(config, pid))
    text, clean = summary(config, tally, gauges, idle_after, health)
    print(text)
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())

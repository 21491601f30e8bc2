"""A running stream's inter-token latency while another client's long prompt is prefilled, for
several scheduler settings (token budget and prefill cap), one server each, in one run.

    python bench/interference.py [--long-tokens 8000] [--runs 2048:none,512:none,512:128]
                                 [--serve-cmd ".venv/bin/python -m server serve --dtype float32"]

Each run is BUDGET:CAP, --max-num-batched-tokens and --prefill-tokens-while-decoding ("none":
no cap). Client A streams a 400-token answer; once it has 20 tokens, client B sends a
--long-tokens prompt for one token, and 3 s later client C a short prompt for one token.
Prints, per run, B's and C's time to first token and A's token gaps before and during B's
prefill (p50, p99, max; p50 in the first and second half of the prefill too: a cap weighted by
context keeps them alike).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import time

import httpx

PORT = 8031
ANSWER_TOKENS = 400
STARTED_AFTER = 20  # A's tokens before B is sent
SHORT_AFTER_S = 3.0  # C's short prompt comes this long after B's long one


async def measure(base_url: str, long_tokens: int) -> dict[str, float | int | None]:
    stamps: list[float] = []
    started = asyncio.Event()
    window: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=3600) as client:
        async def stream() -> None:
            body = {"model": "m", "prompt": "def fibonacci(n):", "max_tokens": ANSWER_TOKENS,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        stamps.append(time.perf_counter())
                        if len(stamps) == STARTED_AFTER:
                            started.set()

        async def long_prompt() -> None:
            await started.wait()
            prompt = [(i * 7919) % 30000 + 100 for i in range(long_tokens)]  # seeded, varied
            window["start"] = time.perf_counter()
            await client.post("/v1/completions", json={"model": "m", "prompt": prompt,
                                                       "max_tokens": 1, "temperature": 0})
            window["end"] = time.perf_counter()

        async def short_prompt() -> None:
            await started.wait()
            await asyncio.sleep(SHORT_AFTER_S)
            sent = time.perf_counter()
            await client.post("/v1/completions", json={"model": "m", "prompt": "import os\n",
                                                       "max_tokens": 1, "temperature": 0})
            window["short_ttft"] = time.perf_counter() - sent

        await asyncio.gather(stream(), long_prompt(), short_prompt())
    gaps = [(later - earlier, later) for earlier, later in zip(stamps, stamps[1:], strict=False)]
    before = sorted(gap for gap, _ in gaps[:STARTED_AFTER - 2])
    start, end = window["start"], window["end"]
    middle = (start + end) / 2
    during = sorted(gap for gap, at in gaps if start <= at <= end + 0.5)
    first_half = sorted(gap for gap, at in gaps if start <= at <= middle)
    second_half = sorted(gap for gap, at in gaps if middle < at <= end + 0.5)
    return {"long_prompt_ttft_s": round(end - start, 2),
            "short_prompt_ttft_s": round(window["short_ttft"], 2),
            "gap_before_p50_ms": _ms(before, 0.5), "gap_during_p50_ms": _ms(during, 0.5),
            "gap_during_p99_ms": _ms(during, 0.99),
            "gap_during_max_ms": round(1000 * during[-1], 1) if during else None,
            "gap_first_half_p50_ms": _ms(first_half, 0.5),
            "gap_second_half_p50_ms": _ms(second_half, 0.5),
            "tokens_during": len(during)}


def _ms(values: list[float], quantile: float) -> float | None:
    if not values:
        return None
    return round(1000 * values[min(len(values) - 1, int(quantile * len(values)))], 1)


def serve_and_measure(serve_cmd: str, budget: int, cap: int | None,
                      long_tokens: int) -> dict[str, object]:
    command = [*shlex.split(serve_cmd), "--port", str(PORT), "--served-model-name", "m",
               "--max-num-batched-tokens", str(budget),
               "--max-model-len", str(max(long_tokens + 1024, 4096))]
    if cap is not None:
        command += ["--prefill-tokens-while-decoding", str(cap)]
    with open(f"/tmp/pagedserve-interference-{budget}-{cap}.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(f"http://127.0.0.1:{PORT}")
        return {"budget": budget, "prefill_cap": cap,
                **asyncio.run(measure(f"http://127.0.0.1:{PORT}", long_tokens))}
    finally:
        process.terminate()
        process.wait(timeout=60)


def _wait_ready(base_url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} not ready after {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-tokens", type=int, default=8000)
    parser.add_argument("--runs", default="2048:none,512:none,512:128",
                        help="comma-separated BUDGET:CAP pairs (--max-num-batched-tokens and "
                        "--prefill-tokens-while-decoding; CAP none: no cap)")
    parser.add_argument("--serve-cmd", default=".venv/bin/python -m server serve --dtype float32")
    args = parser.parse_args()
    for run in args.runs.split(","):
        budget, _, cap = run.partition(":")
        result = serve_and_measure(args.serve_cmd, int(budget),
                                   None if cap in ("", "none") else int(cap), args.long_tokens)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

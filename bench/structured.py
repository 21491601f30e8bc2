"""Structured outputs benchmark: what a JSON-schema constraint costs a served model.

    python bench/structured.py [--base-url http://127.0.0.1:8000/v1 --api-key KEY]
    python bench/structured.py --model DIR [--server-arg=--num-blocks=512 ...]
    python bench/structured.py --tiny          # starts a server on the tests' tiny llama

1. Throughput: --concurrency (16) streams of the same prompt and --max-tokens (256), once
   unconstrained (`ignore_eos`, so each writes exactly max_tokens) and once under a
   json_schema response_format whose shortest document is longer than max_tokens (an array
   of --min-items objects), so the constrained rows are cut by max_tokens at the same length
   (`ignore_eos` means nothing to a grammar: it ends the document when the schema does).
   Each kind runs --rounds times, alternating; reported: output tokens/s over the wall time
   of each round (median), and the ratio constrained / unconstrained.
2. Grammar compile time: the time to first token of one request with a schema the server has
   never seen (a fresh property name each trial) against the same request again, when the
   compiled grammar is cached, and against an unconstrained request. The difference of the
   cold and cached medians estimates compilation; the server's own log line ("compiled a json
   constraint (N chars) in X ms") is quoted too when the log is at hand (a server started
   here, or --server-log).

Every figure comes from one run on one machine: compare the ratios, not absolute numbers
across machines or runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.soak import started_server  # noqa: E402

logger = logging.getLogger("bench.structured")

PROMPT = ("List the open orders of the warehouse as JSON: for each order its id, the customer, "
          "the number of items, whether it has shipped and its priority.")
COMPILE_LOG_LINE = re.compile(r"compiled a (\w+) constraint \((\d+) chars\) in ([\d.]+) ms")


def orders_schema(min_items: int) -> dict[str, object]:
    """An array of exactly `min_items` small objects: every document is long, so max_tokens
    (not the grammar) ends the constrained rows."""
    order = {
        "type": "object", "additionalProperties": False,
        "required": ["id", "customer", "items", "shipped", "priority"],
        "properties": {
            "id": {"type": "integer", "minimum": 1000, "maximum": 9999},
            "customer": {"type": "string", "pattern": "^[A-Z][a-z]{2,11}$"},
            "items": {"type": "integer", "minimum": 1, "maximum": 99},
            "shipped": {"type": "boolean"},
            "priority": {"enum": ["low", "normal", "high"]},
        }}
    return {"type": "array", "items": order, "minItems": min_items, "maxItems": min_items}


def typical_schema(nonce: str) -> dict[str, object]:
    """A schema of the size users send (a dozen fields, nesting, enums, bounds); `nonce` names
    one property, so each value is a schema no cache has seen."""
    address = {"type": "object", "additionalProperties": False,
               "required": ["street", "city", "country"],
               "properties": {"street": {"type": "string", "maxLength": 40},
                              "city": {"type": "string", "maxLength": 30},
                              "country": {"type": "string", "pattern": "^[A-Z]{2}$"}}}
    return {
        "type": "object", "additionalProperties": False,
        "required": ["name", "age", "email", "address", "tags", "role", nonce],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 40},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z]{1,12}\\.[a-z]{2,3}$"},
            "address": address,
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                     "maxItems": 5},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "score": {"type": "number", "minimum": 0, "maximum": 100},
            nonce: {"type": "boolean"},
        }}


@dataclass(slots=True)
class BenchConfig:
    base_url: str  # ends in /v1
    api_key: str | None
    model: str | None
    concurrency: int
    max_tokens: int
    min_items: int
    rounds: int
    compile_trials: int
    timeout_s: float = 1800.0


@dataclass(slots=True)
class StreamResult:
    ok: bool
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


@dataclass(slots=True)
class Report:
    throughput: dict[str, list[float]] = field(default_factory=dict)  # kind -> tok/s per round
    ttft_s: dict[str, list[float]] = field(default_factory=dict)  # unconstrained, cold, cached
    compile_log_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- one streamed request


async def stream_one(client: httpx.AsyncClient, body: dict[str, object]) -> StreamResult:
    """POST a streamed chat completion; time to the first content and to the end, and the
    output tokens from the final usage chunk."""
    result = StreamResult(ok=False)
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                _take_chunk(json.loads(line[5:]), result, start)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e_s = time.perf_counter() - start
    result.ok = result.error is None and result.ttft_s > 0
    return result


def _take_chunk(chunk: dict[str, object], result: StreamResult, start: float) -> None:
    if "error" in chunk:
        result.error = str(chunk["error"])
        return
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        result.output_tokens = int(usage.get("completion_tokens", 0))
    for choice in chunk.get("choices") or []:  # type: ignore[union-attr]
        if choice.get("delta", {}).get("content") and not result.ttft_s:
            result.ttft_s = time.perf_counter() - start
        result.finish_reason = choice.get("finish_reason") or result.finish_reason


def chat_body(config: BenchConfig, max_tokens: int,
              schema: dict[str, object] | None) -> dict[str, object]:
    body: dict[str, object] = {
        "model": config.model, "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
        "stream_options": {"include_usage": True}}
    if schema is None:
        body["ignore_eos"] = True  # exactly max_tokens, as the constrained rows
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "orders", "schema": schema, "strict": True}}
    return body


# ---------------------------------------------------------------- the two measurements


async def throughput_round(client: httpx.AsyncClient, config: BenchConfig,
                           schema: dict[str, object] | None, report: Report) -> float:
    """Output tokens/s of `concurrency` identical streams started together."""
    body = chat_body(config, config.max_tokens, schema)
    start = time.perf_counter()
    results = await asyncio.gather(*(stream_one(client, body)
                                     for _ in range(config.concurrency)))
    duration = time.perf_counter() - start
    report.errors += [r.error for r in results if r.error]
    cut_early = [r.finish_reason for r in results if r.ok and r.finish_reason != "length"]
    if cut_early:  # a document shorter than max_tokens: the rows are not the same length
        logger.warning("%d rows ended before max_tokens (%s): raise --min-items",
                       len(cut_early), cut_early[0])
    return sum(r.output_tokens for r in results if r.ok) / duration


async def measure_throughput(client: httpx.AsyncClient, config: BenchConfig,
                             report: Report) -> None:
    schema = orders_schema(config.min_items)
    for round_index in range(config.rounds):
        kinds = [("unconstrained", None), ("json_schema", schema)]
        if round_index % 2:  # alternate, so a drift in machine load hits both kinds alike
            kinds.reverse()
        for kind, kind_schema in kinds:
            tok_s = await throughput_round(client, config, kind_schema, report)
            report.throughput.setdefault(kind, []).append(tok_s)
            logger.info("round %d %s: %.1f output tok/s", round_index, kind, tok_s)


async def measure_compile(client: httpx.AsyncClient, config: BenchConfig,
                          report: Report) -> None:
    """TTFT of a never-seen schema, the same schema again, and no schema, one at a time."""
    for _ in range(config.compile_trials):
        schema = typical_schema(f"flag_{uuid.uuid4().hex[:12]}")
        for kind, kind_schema in (("cold", schema), ("cached", schema),
                                  ("unconstrained", None)):
            result = await stream_one(client, chat_body(config, 4, kind_schema))
            if result.ok:
                report.ttft_s.setdefault(kind, []).append(result.ttft_s)
            elif result.error:
                report.errors.append(result.error)


async def run(config: BenchConfig, log_path: Path | None) -> Report:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    report = Report()
    log_offset = log_path.stat().st_size if log_path is not None and log_path.exists() else 0
    async with httpx.AsyncClient(base_url=config.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(config.timeout_s)) as client:
        if config.model is None:
            listed = (await client.get("/models")).raise_for_status().json()
            config.model = str(listed["data"][0]["id"])
        # warm-up: weights paged in, the orders grammar compiled, prompt prefix cached
        await stream_one(client, chat_body(config, 8, None))
        await stream_one(client, chat_body(config, 8, orders_schema(config.min_items)))
        await measure_compile(client, config, report)
        await measure_throughput(client, config, report)
    if log_path is not None and log_path.exists():
        report.compile_log_ms = compile_times_from_log(log_path, log_offset)
    return report


def compile_times_from_log(log_path: Path, offset: int) -> list[float]:
    """Milliseconds of each "compiled a json constraint" line written after `offset`."""
    with log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    return [float(match[3]) for match in COMPILE_LOG_LINE.finditer(text)
            if match[1] == "json"]


# ---------------------------------------------------------------- report


def summarize(config: BenchConfig, report: Report) -> dict[str, object]:
    tok_s = {kind: statistics.median(values) for kind, values in report.throughput.items()}
    ttft = {kind: statistics.median(values) for kind, values in report.ttft_s.items()}
    summary: dict[str, object] = {
        "config": {k: v for k, v in asdict(config).items() if k != "api_key"},
        "output_tok_s": tok_s, "output_tok_s_rounds": report.throughput,
        "ttft_s": ttft, "ttft_s_trials": report.ttft_s,
        "compile_log_ms": report.compile_log_ms, "num_errors": len(report.errors),
        "errors": report.errors[:5]}
    if tok_s.get("unconstrained"):
        summary["throughput_ratio"] = tok_s.get("json_schema", 0.0) / tok_s["unconstrained"]
    if ttft.get("cached") and ttft.get("unconstrained"):
        summary["ttft_ratio_cold_to_cached"] = ttft.get("cold", 0.0) / ttft["cached"]
        summary["ttft_ratio_cached_to_unconstrained"] = ttft["cached"] / ttft["unconstrained"]
        summary["compile_estimate_ms"] = 1e3 * (ttft.get("cold", 0.0) - ttft["cached"])
    return summary


def format_summary(summary: dict[str, object]) -> str:
    config = summary["config"]
    tok_s: dict[str, float] = summary["output_tok_s"]  # type: ignore[assignment]
    ttft: dict[str, float] = summary["ttft_s"]  # type: ignore[assignment]
    lines = [f"{config['concurrency']} streams x {config['max_tokens']} tokens, "  # type: ignore[index]
             f"{config['rounds']} rounds; model {config['model']}"]  # type: ignore[index]
    for kind in ("unconstrained", "json_schema"):
        if kind in tok_s:
            lines.append(f"  {kind:14s} {tok_s[kind]:8.1f} output tok/s (median)")
    if "throughput_ratio" in summary:
        lines.append(f"  constrained / unconstrained throughput: "
                     f"{summary['throughput_ratio']:.3f}")
    for kind in ("unconstrained", "cached", "cold"):
        if kind in ttft:
            lines.append(f"  TTFT {kind:14s} {ttft[kind] * 1e3:8.1f} ms (median)")
    if "ttft_ratio_cold_to_cached" in summary:
        lines.append(f"  TTFT cold / cached: {summary['ttft_ratio_cold_to_cached']:.3f}; "
                     f"cached / unconstrained: "
                     f"{summary['ttft_ratio_cached_to_unconstrained']:.3f}; compile estimate "
                     f"(cold - cached): {summary['compile_estimate_ms']:.1f} ms")
    logged: list[float] = summary["compile_log_ms"]  # type: ignore[assignment]
    if logged:
        lines.append(f"  server log: {len(logged)} json compiles, median "
                     f"{statistics.median(logged):.1f} ms, max {max(logged):.1f} ms")
    if summary["num_errors"]:
        lines.append(f"  errors ({summary['num_errors']}): {summary['errors']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                        help="a running server's OpenAI base URL (default: %(default)s)")
    target.add_argument("--model-dir", "--model", dest="model_dir",
                        help="start `python -m server serve MODEL_DIR` and benchmark it")
    target.add_argument("--tiny", action="store_true",
                        help="start a server on the test suite's tiny random llama")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for the started server (repeatable)")
    parser.add_argument("--server-log", type=Path, default=None,
                        help="the running server's log file, for its compile-time lines")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"))
    parser.add_argument("--served-model-name", default=None,
                        help="`model` to send (default: the first listed)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--min-items", type=int, default=64,
                        help="objects in each constrained document (make it outlast "
                             "--max-tokens)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile-trials", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    return parser.parse_args(argv)


def _tiny_model_dir() -> str:
    from tests.tiny_models import save_tiny_model

    return str(save_tiny_model("llama", Path(tempfile.mkdtemp(prefix="structured-")) / "llama"))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        base_url, log_path, model = args.base_url, args.server_log, args.served_model_name
        if args.model_dir or args.tiny:
            model_dir = args.model_dir or _tiny_model_dir()
            extra = ["--dtype", "float32", "--num-blocks", "2048"] if args.tiny else []
            log_path = Path(tempfile.mkdtemp(prefix="structured-")) / "server.log"
            url, _ = stack.enter_context(started_server(model_dir, extra + args.server_arg,
                                                        log_path))
            base_url, model = f"{url}/v1", None
        config = BenchConfig(base_url.rstrip("/"), args.api_key, model, args.concurrency,
                             args.max_tokens, args.min_items, args.rounds, args.compile_trials)
        report = asyncio.run(run(config, log_path))
    summary = summarize(config, report)
    print(format_summary(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving load generator: streams requests at any OpenAI-compatible server and reports
latency percentiles, throughput and the server's memory.

    python bench/serve.py --url http://127.0.0.1:8000 [--concurrency 16 | --request-rate 4]
        [--workload chat|edit] [--num-requests 64] [--prompt-tokens 230] [--file-tokens 300]
        [--output-tokens N] [--endpoint chat] [--pid PID] [--seed 0] [--json OUT]

Two seeded workloads, built with the model's tokenizer; every prompt is different, so no
prefix cache can skip the prefill (chat texts open with "INDEX-SEED:", so any two part within
their first few tokens, the warm-up's, of another seed, included; only the chat template's own
opening is shared). All requests are greedy and streamed with usage.
  chat (default): synthetic text of about --prompt-tokens tokens (after the chat template, for
      chat), each answered with exactly --output-tokens tokens (default 128; `ignore_eos` and
      `min_tokens`, the vLLM extensions pagedserve also takes).
  edit: generated Python files of about --file-tokens tokens (bench/edit_workload.py), each with
      a small change to make, answered with the whole file: the output mostly copies the prompt,
      which is what n-gram speculation speeds up. Here the model stops on its own, with
      max_tokens 1.3x the file: forcing a length would time junk after the file (EOS banned,
      the model rambles, and whatever it makes up no longer copies the prompt). Tokens/s counts
      the tokens actually generated; `hit max_tokens` tells how many answers ran out of room.
      Giving --output-tokens forces exactly that many instead, as in chat.
Reported: TTFT (request sent -> first content), ITL (gaps between content chunks: with
speculation a chunk can hold several tokens, see tokens per chunk), TPOT ((e2e - TTFT) /
(tokens - 1)), e2e latency, each as mean, p50, p90, p99; the prefill rate (prompt tokens /
TTFT per request, median; queueing counts, so it is the prefill rate at 1 stream); output and
total tokens/s over the wall time of the run; the server's speculative-decoding acceptance
over the run, from its /metrics counters before and after (none when it exposes no such
counters); and, for --pid and its child processes, the peak RSS (sampled every 50 ms) and the
CPU time they used: CPU ms per output token measures work done, which stays comparable when
other load on the machine changes the wall-clock figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.edit_workload import edit_tasks  # noqa: E402

logger = logging.getLogger("bench.serve")

# words the synthetic prompts are drawn from: code-ish English, one or two tokens each
_WORD_TEXT = (
    "the function returns a list of values from each row in the table when the index is valid "
    "and otherwise raises an error that names the missing key so callers can retry with another "
    "request using cached data stored on disk server client thread queue buffer string integer "
    "parse format write read open close file path loop batch token model layer cache block "
    "memory speed test check value result output input config option default number count sort "
    "merge split join filter map reduce class method object field type python rust java sql "
    "query database network socket timeout retry limit window frame packet header body stream "
    "event handler callback")
_WORDS = tuple(_WORD_TEXT.split())
WORKLOADS = ("chat", "edit")
CHAT_OUTPUT_TOKENS = 128
EDIT_MAX_TOKENS_RATIO = 1.3  # the file again, its code fence and the change, little more
# the server's spec-decode counters (vLLM's are the same names under "vllm:")
_SPEC_COUNTERS = {"num_drafts": "spec_decode_num_drafts",
                  "num_draft_tokens": "spec_decode_num_draft_tokens",
                  "num_accepted_tokens": "spec_decode_num_accepted_tokens"}


@dataclass(slots=True)
class LoadConfig:
    """One load run: what to send and how fast."""

    url: str
    model: str | None = None
    endpoint: str = "chat"  # "chat" or "completions"
    workload: str = "chat"  # one of WORKLOADS
    num_requests: int = 64
    concurrency: int | None = 16  # closed loop: this many requests in flight
    request_rate: float | None = None  # open loop: Poisson arrivals per second
    prompt_tokens: int = 230  # chat workload
    file_tokens: int = 300  # edit workload
    output_tokens: int | None = CHAT_OUTPUT_TOKENS  # None: edit answers stop on their own
    seed: int = 0
    api_key: str | None = None
    pid: int | None = None
    timeout_s: float = 1800.0


@dataclass(slots=True)
class RequestResult:
    """One request's timeline, in seconds from its send."""

    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    chunk_gaps: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    num_chunks: int = 0
    finish_reason: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request's text and length limit; forced: exactly max_tokens (EOS ignored)."""

    text: str
    max_tokens: int
    is_forced: bool = True


# ---- prompts ------------------------------------------------------------------------------


def build_prompts(tokenizer, config: LoadConfig) -> list[Prompt]:  # noqa: ANN001
    """The run's prompts for its workload; the same seed gives the same prompts."""
    if config.workload == "edit":
        tasks = edit_tasks(tokenizer, config.num_requests, config.file_tokens, config.seed)
        if config.output_tokens is not None:
            return [Prompt(task.prompt(), config.output_tokens) for task in tasks]
        return [Prompt(task.prompt(), task.max_tokens(EDIT_MAX_TOKENS_RATIO), is_forced=False)
                for task in tasks]
    texts = synthetic_prompts(tokenizer, config.num_requests, config.prompt_tokens,
                              config.seed, config.endpoint == "chat")
    return [Prompt(text, config.output_tokens or CHAT_OUTPUT_TOKENS) for text in texts]


def load_tokenizer(source: str | None):  # noqa: ANN201 - transformers type, imported lazily
    import transformers

    if source is None:
        from engine.default_model import ensure_default_model

        source = str(ensure_default_model())
    return transformers.AutoTokenizer.from_pretrained(source)


def synthetic_prompts(tokenizer, num: int, num_tokens: int, seed: int,  # noqa: ANN001
                      chat: bool) -> list[str]:
    """`num` different texts of about `num_tokens` tokens each (template included for chat);
    the same seed gives the same texts."""
    overhead = _template_overhead(tokenizer) if chat else 0
    target = max(1, num_tokens - overhead)
    rng = random.Random(seed)
    prompts = []
    for index in range(num):
        # opens with its index, then the seed: texts of this seed part at their first token or
        # two, those of other seeds (the warm-up's, another scenario's) within the seed's
        # digits, so beyond the chat template's opening a prefix cache finds no block to reuse
        words = [f"{index}-{seed}:"] + [rng.choice(_WORDS) for _ in range(target + 8)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:target]
        prompts.append(tokenizer.decode(ids))
    return prompts


def _template_overhead(tokenizer) -> int:  # noqa: ANN001
    """Tokens the chat template adds around one user message."""
    if getattr(tokenizer, "chat_template", None) is None:
        return 0
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "x"}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return len(ids) - 1


# ---- one request ---------------------------------------------------------------------------


def request_body(config: LoadConfig, prompt: Prompt) -> dict[str, object]:
    body: dict[str, object] = {
        "model": config.model, "max_tokens": prompt.max_tokens, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True}}
    if prompt.is_forced:
        body |= {"ignore_eos": True, "min_tokens": prompt.max_tokens}
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    return body


def _content_of(chunk: dict[str, object]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]  # type: ignore[index]
    delta = choice.get("delta") or {}
    return delta.get("content") or choice.get("text") or ""


def _finish_reason_of(chunk: dict[str, object]) -> str | None:
    choices = chunk.get("choices") or []
    return choices[0].get("finish_reason") if choices else None  # type: ignore[index]


async def send_request(client: httpx.AsyncClient, config: LoadConfig,
                       prompt: Prompt) -> RequestResult:
    path = "/v1/chat/completions" if config.endpoint == "chat" else "/v1/completions"
    result = RequestResult(ok=False)
    start = time.perf_counter()
    last: float | None = None
    num_chunks = 0
    try:
        async with client.stream("POST", path, json=request_body(config, prompt)) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                result.finish_reason = _finish_reason_of(chunk) or result.finish_reason
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.output_tokens = usage.get("completion_tokens", 0)
                if not _content_of(chunk):
                    continue
                now = time.perf_counter()
                num_chunks += 1
                if last is None:
                    result.ttft = now - start
                else:
                    result.chunk_gaps.append(now - last)
                last = now
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or num_chunks
    result.num_chunks = num_chunks
    result.ok = last is not None
    return result


# ---- the run -------------------------------------------------------------------------------


class RssSampler:
    """Peak resident memory of a process and its descendants, sampled from /proc: each known
    process's RSS every `interval_s`, the tree itself found again every `rescan_s` (finding it
    reads every process's stat file, ~1.7 ms here: every 50 ms, that would take ~3% of a core
    from the server being measured)."""

    def __init__(self, pid: int | None, interval_s: float = 0.05, rescan_s: float = 1.0) -> None:
        self.pid, self.interval_s, self.peak_bytes = pid, interval_s, 0
        self.rescan_s = rescan_s
        self._tree: list[int] = []
        self._scanned_at = -math.inf
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> int:
        if self.pid is None:
            return 0
        now = time.monotonic()
        if now - self._scanned_at >= self.rescan_s:
            self._tree, self._scanned_at = _process_tree(self.pid), now
        total = sum(_rss_bytes(pid) for pid in self._tree)
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self.pid is not None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sample()


def _process_tree(root: int) -> list[int]:
    """root and every descendant, from the ppid field of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds used so far by a process and its live descendants: work done,
    which unlike wall time does not depend on how busy the rest of the machine is."""
    if pid is None:
        return 0.0
    ticks = 0
    for member in _process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---- the server's spec-decode counters ---------------------------------------------------


def parse_spec_counters(text: str) -> dict[str, float] | None:
    """Prometheus text -> the spec-decode counters summed over their labels, from our names or
    else vLLM's (a server exporting both counts each event under each); None when the server
    exposes neither (an older build, or another server)."""
    for prefix in ("pagedserve_", "vllm:"):
        names = {f"{prefix}{counter}_total": key for key, counter in _SPEC_COUNTERS.items()}
        totals: dict[str, float] = {}
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if line.startswith("#") or name not in names:
                continue
            rest = line[line.rfind("}") + 1:] if "{" in line else line[len(name):]
            totals[names[name]] = totals.get(names[name], 0.0) + float(rest.split()[0])
        if totals:
            return {key: totals.get(key, 0.0) for key in _SPEC_COUNTERS}
    return None


async def scrape_spec_counters(client: httpx.AsyncClient) -> dict[str, float] | None:
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    return parse_spec_counters(response.text) if response.status_code == 200 else None


def spec_decode_delta(before: dict[str, float] | None,
                      after: dict[str, float] | None) -> dict[str, float | None] | None:
    """What the run added to the counters, with acceptance = accepted / proposed tokens and
    the mean tokens a verification step yields = 1 + accepted / drafts (None: no drafts)."""
    if before is None or after is None:
        return None
    return _with_spec_rates({key: after[key] - before[key] for key in _SPEC_COUNTERS})


def _with_spec_rates(counts: dict[str, float]) -> dict[str, float | None]:
    drafts, proposed, accepted = (counts[key] for key in _SPEC_COUNTERS)
    delta: dict[str, float | None] = dict(counts)
    delta["acceptance_rate"] = accepted / proposed if proposed else None
    delta["mean_accepted_length"] = 1 + accepted / drafts if drafts else None
    return delta


async def resolve_model(client: httpx.AsyncClient) -> str:
    """The first model the server lists: what to put in `model`."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


@dataclass(slots=True)
class LoadPass:
    """What one pass of load measured, before it is summarised: bench/compare.py's --rounds
    pool several passes of a scenario, each server's taken in turn, into one summary."""

    results: list[RequestResult]
    duration: float
    peak_rss_bytes: int = 0
    cpu_seconds: float | None = None  # the --pid tree's CPU time over the pass
    spec_decode: dict[str, float | None] | None = None  # spec_decode_delta over the pass


async def run_load(config: LoadConfig, prompts: Sequence[Prompt]) -> dict[str, object]:
    """Send every prompt with the configured concurrency or arrival rate; summarise."""
    return summarize_passes(config, [await measure_load(config, prompts)])


async def measure_load(config: LoadConfig, prompts: Sequence[Prompt]) -> LoadPass:
    """One pass: every prompt sent with the configured concurrency or arrival rate."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=config.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(config.timeout_s)) as client:
        if config.model is None:
            config.model = await resolve_model(client)
        spec_before = await scrape_spec_counters(client)
        sampler = RssSampler(config.pid)
        sampler.start()
        cpu_start, start = tree_cpu_seconds(config.pid), time.perf_counter()
        results = await _dispatch(client, config, prompts)
        duration = time.perf_counter() - start
        cpu_seconds = tree_cpu_seconds(config.pid) - cpu_start
        await sampler.stop()
        spec_after = await scrape_spec_counters(client)
    return LoadPass(results, duration, sampler.peak_bytes,
                    cpu_seconds if config.pid is not None else None,
                    spec_decode_delta(spec_before, spec_after))


def summarize_passes(config: LoadConfig, passes: Sequence[LoadPass]) -> dict[str, object]:
    """One summary of passes of the same load: their requests pooled (percentiles over all of
    them), their durations, CPU times and spec-decode counts added, the highest RSS."""
    results = [result for one in passes for result in one.results]
    duration = sum(one.duration for one in passes)
    summary = summarize(config, results, duration, max(one.peak_rss_bytes for one in passes))
    summary["spec_decode"] = _pooled_spec_decode([one.spec_decode for one in passes])
    if config.pid is not None:
        cpu_seconds = sum(one.cpu_seconds or 0.0 for one in passes)
        tokens = summary["mean_output_tokens"] * summary["num_ok"]  # type: ignore[operator]
        summary["server_cpu_s"] = cpu_seconds
        summary["server_cores_busy"] = cpu_seconds / duration
        summary["server_cpu_ms_per_output_token"] = 1e3 * cpu_seconds / max(tokens, 1)
    if len(passes) > 1:
        summary["num_passes"] = len(passes)
    return summary


def _pooled_spec_decode(
        deltas: Sequence[dict[str, float | None] | None]) -> dict[str, float | None] | None:
    if not deltas or any(delta is None for delta in deltas):
        return None
    return _with_spec_rates({key: sum(float(delta[key] or 0.0)  # type: ignore[index]
                                      for delta in deltas) for key in _SPEC_COUNTERS})


async def _dispatch(client: httpx.AsyncClient, config: LoadConfig,
                    prompts: Sequence[Prompt]) -> list[RequestResult]:
    if config.request_rate is not None:  # open loop: Poisson arrivals, no cap in flight
        rng = random.Random(config.seed + 1)
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(send_request(client, config, prompt)))
            await asyncio.sleep(rng.expovariate(config.request_rate))
        return list(await asyncio.gather(*tasks))
    semaphore = asyncio.Semaphore(config.concurrency or len(prompts))

    async def bounded(prompt: Prompt) -> RequestResult:
        async with semaphore:
            return await send_request(client, config, prompt)

    return list(await asyncio.gather(*(bounded(p) for p in prompts)))


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"mean": statistics.fmean(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarize(config: LoadConfig, results: Sequence[RequestResult], duration: float,
              peak_rss_bytes: int) -> dict[str, object]:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    errors = [r.error for r in results if not r.ok]
    num_chunks = sum(r.num_chunks for r in done)
    prefill = [r.prompt_tokens / r.ttft for r in done if r.prompt_tokens and r.ttft > 0]
    return {
        "config": {k: v for k, v in asdict(config).items() if k not in ("api_key",)},
        "num_ok": len(done), "num_failed": len(errors), "errors": errors[:5],
        "duration_s": duration,
        "mean_prompt_tokens": prompt_tokens / len(done) if done else 0.0,
        "mean_output_tokens": output_tokens / len(done) if done else 0.0,
        "num_hit_max_tokens": sum(r.finish_reason == "length" for r in done),
        "tokens_per_chunk": output_tokens / num_chunks if num_chunks else 0.0,
        "output_tok_s": output_tokens / duration,
        "total_tok_s": (output_tokens + prompt_tokens) / duration,
        "request_s": len(done) / duration,
        # prompt tokens / TTFT per request, median: the prefill rate, queueing included
        "prefill_tok_s": statistics.median(prefill) if prefill else None,
        "ttft_s": _percentiles([r.ttft for r in done]),
        "itl_s": _percentiles([gap for r in done for gap in r.chunk_gaps]),
        "tpot_s": _percentiles(tpot),
        "e2e_s": _percentiles([r.e2e for r in done]),
        "peak_rss_gb": peak_rss_bytes / 1e9 if config.pid is not None else None,
    }


def format_summary(summary: dict[str, object]) -> str:
    ms = {name: summary[name] for name in ("ttft_s", "itl_s", "tpot_s", "e2e_s")}
    config = summary["config"]
    lines = [f"{config['workload']} workload: ok {summary['num_ok']}, "  # type: ignore[index]
             f"failed {summary['num_failed']} in {summary['duration_s']:.1f} s; prompt "
             f"{summary['mean_prompt_tokens']:.0f} tok, output "
             f"{summary['mean_output_tokens']:.0f} tok per request "
             f"({summary['num_hit_max_tokens']} hit max_tokens), "
             f"{summary['tokens_per_chunk']:.2f} tok per chunk",
             f"output {summary['output_tok_s']:.1f} tok/s, total {summary['total_tok_s']:.1f} "
             f"tok/s, {summary['request_s']:.2f} req/s, prefill "
             f"{_fmt_rate(summary.get('prefill_tok_s'))} tok/s (prompt tokens / TTFT, median)",
             format_spec_decode(summary.get("spec_decode"))]
    for name, stats in ms.items():
        values = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in stats.items())  # type: ignore[union-attr]
        lines.append(f"{name[:-2]:5s} ms: {values}")
    if summary["peak_rss_gb"] is not None:
        lines.append(f"peak RSS {summary['peak_rss_gb']:.2f} GB; server CPU "
                     f"{summary['server_cpu_s']:.1f} s ({summary['server_cores_busy']:.2f} cores "
                     f"busy, {summary['server_cpu_ms_per_output_token']:.1f} ms per output token)")
    if summary["errors"]:
        lines.append(f"errors: {summary['errors']}")
    return "\n".join(lines)


def _fmt_rate(value: object) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_spec_decode(spec: object) -> str:
    if not isinstance(spec, dict):
        return "spec decode: none (the server exposes no spec-decode counters)"
    if spec["acceptance_rate"] is None:
        return "spec decode: no drafts in this run"
    return (f"spec decode: acceptance {spec['acceptance_rate']:.1%} "
            f"({spec['num_accepted_tokens']:.0f} of {spec['num_draft_tokens']:.0f} proposed), "
            f"mean accepted length {spec['mean_accepted_length']:.2f} per draft "
            f"({spec['num_drafts']:.0f} drafts)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", default=None, help="model name (default: the first listed)")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--workload", choices=WORKLOADS, default="chat",
                        help="chat: synthetic text, exactly --output-tokens out; edit: Python "
                        "files to return with a small change, answers stop on their own")
    parser.add_argument("--num-requests", type=int, default=64)
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None,
                      help="requests in flight at once (default 16)")
    load.add_argument("--request-rate", type=float, default=None,
                      help="Poisson arrivals per second instead of a fixed concurrency")
    parser.add_argument("--prompt-tokens", type=int, default=230,
                        help="chat workload: tokens per prompt, template included")
    parser.add_argument("--file-tokens", type=int, default=300,
                        help="edit workload: tokens per generated Python file")
    parser.add_argument("--output-tokens", type=int, default=None,
                        help=f"exactly this many tokens per answer (EOS ignored); default: "
                        f"{CHAT_OUTPUT_TOKENS} for chat, for edit none: answers stop on their "
                        f"own, at most {EDIT_MAX_TOKENS_RATIO}x their file")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory for the prompts (default: the default model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--pid", type=int, default=None,
                        help="server process whose RSS (with its children) to sample")
    parser.add_argument("--warmup", type=int, default=1,
                        help="requests sent one by one before the timed run")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    concurrency = None if args.request_rate is not None else (args.concurrency or 16)
    return LoadConfig(url=args.url, model=args.model, endpoint=args.endpoint,
                      workload=args.workload, num_requests=args.num_requests,
                      concurrency=concurrency, request_rate=args.request_rate,
                      prompt_tokens=args.prompt_tokens, file_tokens=args.file_tokens,
                      output_tokens=default_output_tokens(args.workload, args.output_tokens),
                      seed=args.seed, api_key=args.api_key, pid=args.pid)


def default_output_tokens(workload: str, output_tokens: int | None) -> int | None:
    """What was asked for, else chat's fixed length, else (edit) None: answers stop on their
    own."""
    if output_tokens is not None or workload == "edit":
        return output_tokens
    return CHAT_OUTPUT_TOKENS


async def warm_up(config: LoadConfig, tokenizer, num: int) -> None:  # noqa: ANN001
    """A few short requests of the same workload first (other seed, 8 tokens each), so that
    one-time costs, speculation's included, stay out of the figures."""
    if num <= 0:
        return
    short = warm_up_config(config, num)
    await run_load(short, build_prompts(tokenizer, short))
    config.model = short.model


def warm_up_config(config: LoadConfig, num: int) -> LoadConfig:
    """The warm-up's load: `num` prompts like the run's, one at a time, 8 tokens out; seed +
    10_000, so its prompts are not the run's (a prefix cache would serve those)."""
    return LoadConfig(**{**asdict(config), "num_requests": num, "concurrency": 1,
                         "request_rate": None, "output_tokens": 8, "pid": None,
                         "seed": config.seed + 10_000})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = config_from_args(args)
    tokenizer = load_tokenizer(args.tokenizer)
    prompts = build_prompts(tokenizer, config)
    asyncio.run(warm_up(config, tokenizer, args.warmup))
    summary = asyncio.run(run_load(config, prompts))
    print(format_summary(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

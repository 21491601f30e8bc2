"""Side-by-side serving benchmark: pagedserve and a peer server under the same load, one run.

    python bench/compare.py [--peer-cmd "CMD" --peer-port 8100 | --peer-url URL]
        [--ours-variant int8='--quantization int8'] [--scenarios 1:4,16:32]
        [--prompt-tokens 230] [--output-tokens 128] [--offline] [--json OUT]

Starts pagedserve (--ours-cmd, default `python -m server serve --dtype bfloat16`), waits until
it serves, runs every scenario (CONCURRENCY:NUM_REQUESTS) with bench/serve.py's load generator,
stops it; then the same for the peer: a command it starts (--peer-cmd, listening on
--peer-port) or a server already running (--peer-url, RSS from --peer-pid if given). Both get
identical seeded prompts. Prints one table (time to ready, tokens/s, TTFT and ITL p50, CPU ms
per output token, peak RSS of the server's process tree over its whole life) and the ratios.
CPU per token counts work rather than waiting, so it stays comparable under other load.
--offline also runs the same prompts through LLM.generate in this process (max_num_seqs =
the scenario's concurrency): the ratio of served to offline tokens/s is the server overhead.
Machines shared with other work are noisy: compare ratios from one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.serve import (  # noqa: E402
    LoadConfig,
    RssSampler,
    load_tokenizer,
    run_load,
    synthetic_prompts,
    warm_up,
)

logger = logging.getLogger("bench.compare")


@dataclass(slots=True)
class ServerRun:
    """One server's figures: time to ready, peak RSS and a summary per scenario."""

    name: str
    ready_s: float | None = None
    peak_rss_gb: float | None = None
    scenarios: dict[str, dict[str, object]] = field(default_factory=dict)


class StartedServer:
    """A server command started in its own process group, stopped with SIGINT then SIGKILL;
    a thread samples the RSS of its process tree for its whole life."""

    def __init__(self, command: str, log_path: Path) -> None:
        self.log = log_path.open("w")
        self.process = subprocess.Popen(shlex.split(command), stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.sampler = RssSampler(self.process.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.sampler.sample()

    def stop(self) -> float:
        """Stop the server; returns its peak RSS in GB."""
        self._stop.set()
        self._thread.join()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        return self.sampler.peak_bytes / 1e9


def wait_ready(url: str, process: subprocess.Popen[bytes] | None, timeout_s: float) -> float:
    """Seconds until /health and /v1/models both answer 200."""
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=5.0) as client:
        while time.perf_counter() - start < timeout_s:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode} before ready")
            try:
                if (client.get("/health").status_code == 200
                        and client.get("/v1/models").status_code == 200):
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")


def parse_scenarios(text: str) -> list[tuple[int, int]]:
    """"1:4,16:32" -> [(1, 4), (16, 32)]: (concurrency, number of requests)."""
    pairs = []
    for item in text.split(","):
        concurrency, _, num = item.partition(":")
        pairs.append((int(concurrency), int(num or 4 * int(concurrency))))
    return pairs


def run_scenarios(name: str, url: str, pid: int | None, args: argparse.Namespace,
                  tokenizer) -> ServerRun:  # noqa: ANN001
    run = ServerRun(name)
    for concurrency, num in parse_scenarios(args.scenarios):
        config = LoadConfig(url=url, num_requests=num, concurrency=concurrency,
                            prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                            seed=args.seed, pid=pid, endpoint=args.endpoint)
        prompts = synthetic_prompts(tokenizer, num, args.prompt_tokens, args.seed,
                                    args.endpoint == "chat")
        asyncio.run(warm_up(config, tokenizer, args.warmup))
        summary = asyncio.run(run_load(config, prompts))
        run.scenarios[f"c{concurrency}"] = summary
        logger.warning("%s, %d streams: %.1f output tok/s, TTFT p50 %.2f s, ITL p50 %.1f ms, "
                       "%d failed", name, concurrency, summary["output_tok_s"],
                       summary["ttft_s"]["p50"], summary["itl_s"]["p50"] * 1e3,  # type: ignore[index]
                       summary["num_failed"])
    return run


def bench_started(name: str, command: str, url: str, args: argparse.Namespace,
                  tokenizer) -> ServerRun:  # noqa: ANN001
    log_path = Path(args.log_dir) / f"{name}.log"
    logger.warning("starting %s: %s (log: %s)", name, command, log_path)
    server = StartedServer(command, log_path)
    try:
        ready_s = wait_ready(url, server.process, args.ready_timeout)
        logger.warning("%s ready in %.1f s", name, ready_s)
        run = run_scenarios(name, url, server.process.pid, args, tokenizer)
        run.ready_s = ready_s
    finally:
        peak = server.stop()
    run.peak_rss_gb = peak
    return run


def bench_offline(args: argparse.Namespace, tokenizer) -> ServerRun:  # noqa: ANN001
    """The same prompts through LLM.generate, no HTTP: what the engine alone does."""
    from engine import LLM, SamplingParams

    run = ServerRun("offline LLM.generate")
    params = SamplingParams(temperature=0.0, max_tokens=args.output_tokens,
                            min_tokens=args.output_tokens, ignore_eos=True)
    for concurrency, num in parse_scenarios(args.scenarios):
        llm = LLM(args.model, dtype="bfloat16", max_num_seqs=concurrency)
        texts = synthetic_prompts(tokenizer, num, args.prompt_tokens, args.seed, True)
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                 add_generation_prompt=True, tokenize=True,
                                                 return_dict=False) for t in texts]
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
        cpu_start, start = time.process_time(), time.perf_counter()
        outputs = llm.generate(prompts, params)
        duration = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        run.scenarios[f"c{concurrency}"] = {
            "output_tok_s": num_tokens / duration, "duration_s": duration,
            "server_cpu_ms_per_output_token": 1e3 * cpu_seconds / num_tokens}
        del llm
    return run


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(runs: list[ServerRun], scenario_keys: list[str]) -> str:
    header = ["server", "ready s"]
    for key in scenario_keys:
        header += [f"{key} tok/s", f"{key} TTFT p50 s", f"{key} ITL p50 ms",
                   f"{key} CPU ms/tok"]
    header.append("peak RSS GB")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for run in runs:
        cells = [run.name, _fmt(run.ready_s, ".1f")]
        for key in scenario_keys:
            summary = run.scenarios.get(key, {})
            ttft, itl = summary.get("ttft_s"), summary.get("itl_s")
            cells += [_fmt(summary.get("output_tok_s"), ".1f"),
                      _fmt(ttft["p50"] if ttft else None, ".2f"),  # type: ignore[index]
                      _fmt(itl["p50"] * 1e3 if itl else None, ".1f"),  # type: ignore[index]
                      _fmt(summary.get("server_cpu_ms_per_output_token"), ".1f")]
        cells.append(_fmt(run.peak_rss_gb, ".2f"))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def ratios(ours: ServerRun, other: ServerRun, scenario_keys: list[str]) -> dict[str, float]:
    """ours / other for throughput; other / ours for latencies (so > 1 means ours is better)."""
    result: dict[str, float] = {}
    for key in scenario_keys:
        a, b = ours.scenarios.get(key), other.scenarios.get(key)
        if not a or not b:
            continue
        result[f"{key} tok/s"] = a["output_tok_s"] / b["output_tok_s"]  # type: ignore[operator]
        cpu = "server_cpu_ms_per_output_token"
        if a.get(cpu) and b.get(cpu):
            result[f"{key} CPU per token (other/ours)"] = b[cpu] / a[cpu]  # type: ignore[operator]
        for metric in ("ttft_s", "itl_s"):
            if metric in a and metric in b:
                result[f"{key} {metric[:-2]} p50 (other/ours)"] = (
                    b[metric]["p50"] / max(a[metric]["p50"], 1e-9))  # type: ignore[index]
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8011, help="pagedserve's port")
    parser.add_argument("--ours-cmd", default=None,
                        help="command starting pagedserve (default: this Python, "
                        "-m server serve --dtype bfloat16 --port PORT)")
    parser.add_argument("--ours-variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="also bench pagedserve started with these extra serve flags, "
                        "e.g. int8='--quantization int8' (repeatable; same port, in turn)")
    parser.add_argument("--skip-ours", action="store_true", help="bench only the peer")
    parser.add_argument("--peer-cmd", default=None, help="command starting the peer server")
    parser.add_argument("--peer-port", type=int, default=8100, help="the peer command's port")
    parser.add_argument("--peer-url", default=None, help="an already running peer's base URL")
    parser.add_argument("--peer-pid", type=int, default=None, help="that peer's PID, for RSS")
    parser.add_argument("--peer-name", default="peer")
    parser.add_argument("--model", default=None,
                        help="model directory for the tokenizer and --offline (default: the "
                        "embedded default model)")
    parser.add_argument("--scenarios", default="1:4,16:32",
                        help="CONCURRENCY:NUM_REQUESTS pairs, comma-separated")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--prompt-tokens", type=int, default=230)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2, help="short requests before each run")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--offline", action="store_true",
                        help="also run the prompts through LLM.generate (server overhead)")
    parser.add_argument("--log-dir", default="/tmp", help="where the servers' logs go")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if args.model is None:
        from engine.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    tokenizer = load_tokenizer(args.model)
    runs: list[ServerRun] = []
    if not args.skip_ours:
        command = args.ours_cmd or (f"{sys.executable} -m server serve --dtype bfloat16 "
                                    f"--port {args.port}")
        runs.append(bench_started("pagedserve", command, f"http://127.0.0.1:{args.port}",
                                  args, tokenizer))
        for variant in args.ours_variant:
            name, _, flags = variant.partition("=")
            runs.append(bench_started(f"pagedserve {name}", f"{command} {flags}",
                                      f"http://127.0.0.1:{args.port}", args, tokenizer))
    if args.peer_cmd:
        runs.append(bench_started(args.peer_name, args.peer_cmd,
                                  f"http://127.0.0.1:{args.peer_port}", args, tokenizer))
    elif args.peer_url:
        run = run_scenarios(args.peer_name, args.peer_url, args.peer_pid, args, tokenizer)
        peaks = [s["peak_rss_gb"] for s in run.scenarios.values() if s.get("peak_rss_gb")]
        run.peak_rss_gb = max(peaks) if peaks else None  # type: ignore[type-var]
        runs.append(run)
    if args.offline:
        runs.append(bench_offline(args, tokenizer))
    report(args, runs)


def report(args: argparse.Namespace, runs: list[ServerRun]) -> None:
    keys = [f"c{c}" for c, _ in parse_scenarios(args.scenarios)]
    print(f"\n{args.prompt_tokens} prompt tokens, {args.output_tokens} output tokens, "
          f"scenarios {args.scenarios} (streams:requests)\n")
    print(table(runs, keys))
    all_ratios: dict[str, dict[str, float]] = {}
    ours = [run for run in runs if run.name.startswith("pagedserve")]
    for mine in ours:
        for other in runs:
            if other in ours and other is not ours[0] or other is mine:
                continue  # every pagedserve run against the peers; variants against the first
            label = f"{mine.name} vs {other.name}"
            all_ratios[label] = ratios(mine, other, keys)
            print(f"\n{label} (> 1: {mine.name} better):")
            for name, value in all_ratios[label].items():
                print(f"  {name:32s} {value:6.2f}")
    if args.json is not None:
        payload = {"runs": [{"name": r.name, "ready_s": r.ready_s, "peak_rss_gb": r.peak_rss_gb,
                             "scenarios": r.scenarios} for r in runs], "ratios": all_ratios}
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()

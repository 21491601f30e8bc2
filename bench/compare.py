"""Side-by-side serving benchmark: pagedserve (in variants) and a peer server under the same
load, one run.

    python bench/compare.py [--peer-cmd "CMD" --peer-port 8100 | --peer-url URL]
        [--ours-variant base= --ours-variant "ngram=--speculative-config '{...}'"]
        [--scenarios edit:1:8,1:4,16:32] [--prompt-tokens 230] [--file-tokens 300]
        [--output-tokens N] [--offline] [--json OUT]
    python bench/compare.py --scenarios 1:2@1024,1:2@4096,1:2@8192,1:1@16384 --output-tokens 8 \\
        --ours-cmd "python -m server serve --dtype bfloat16 --port 8011 --max-model-len 17000" \\
        --peer-cmd "vllm serve MODEL --port 8100 --max-model-len 17000"

Starts pagedserve (--ours-cmd, default `python -m server serve --dtype bfloat16`), waits until
it serves, runs every scenario with bench/serve.py's load generator, stops it; then the same
for each --ours-variant NAME=FLAGS (the command plus FLAGS, split like a shell would: put a JSON
value in single quotes), and for the peer: a command it starts (--peer-cmd, listening on
--peer-port) or a server already running (--peer-url, RSS from --peer-pid if given). Without a
variant of empty flags (`base=`) the plain command runs first as "pagedserve"; with one, that
variant is the plain run. Every server gets identical seeded prompts; each scenario has its own
seed (--seed + its position), so no scenario repeats another's prompts and a server's prefix
cache serves none of them (chat texts open with their request index and seed: past the chat
template's own opening, any two part within a few tokens, warm-ups' and other scenarios'
included, short of a 16-token block with the default model).

A scenario is [WORKLOAD:]CONCURRENCY[:NUM_REQUESTS][@PROMPT_TOKENS]: WORKLOAD chat or edit as
in bench/serve.py (default --workload), NUM_REQUESTS 4x the concurrency by default, and
@PROMPT_TOKENS (chat only) that scenario's prompt length instead of --prompt-tokens; its key
(`chat c1`, `chat c1 @4096`) names it in the tables and lines up the ratios, so one run can
sweep prompt lengths, as in the second usage line: TTFT and the prefill rate at each length
(the servers must allow that long a context: pagedserve's default config stops at 8192 tokens,
hence --max-model-len in its command there).

Before any server starts it measures the read bandwidth (a sum over --bandwidth-gib of fp32
on the server's thread count, best of 5) and the batch-1 decode roofline: bandwidth / bf16
weight bytes read per token (from --model's config.json, or --weights-bytes). It prints a table
per server and scenario (tokens/s, which counts the prefill too; tokens per request; TTFT;
"prefill tok/s", prompt tokens / TTFT per request, median, which counts queueing, so a prefill
rate at 1 stream; ITL and TPOT; tokens per chunk; CPU ms per output token; the spec-decode
acceptance and mean accepted length from the server's /metrics; at 1 stream, the read
bandwidth measured just before and after the scenario (mean; the servers idle) and the decode
rate 1 / TPOT over the roofline that bandwidth puts: above 1 only speculation can get), the
servers' time to ready and peak RSS, and the ratios, each arranged so that > 1 means the first
named is better (tokens/s ours / other; TTFT, ITL, TPOT and CPU per token other / ours): each
pagedserve run against the peers, each variant against the first pagedserve run.
CPU per token counts work rather than waiting, so it stays comparable under other load.
--offline also runs the same prompts through LLM.generate in this process (max_num_seqs = the
scenario's concurrency): the ratio of served to offline tokens/s is the server overhead.
Machines shared with other work are noisy: compare ratios from one run, not across runs.
--interleave goes further: every server is up at once (each started after the last is ready;
pagedserve's variants on --port + 1, + 2, ...) and each scenario runs on every server in turn
before the next scenario, so the two figures a ratio compares are minutes apart at most, not a
whole run apart. --rounds N narrows that to seconds at 1 stream: each such scenario's requests
go in up to N rounds, every server taking each round in turn, A B B A ..., and a server's passes
pool into its figures (percentiles over all its requests); N equal to the requests alternates
single requests. Scenarios of more streams run whole: rounds would add bursts of arrivals.
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.roofline import ModelShape, decode_weight_bytes, read_bandwidth  # noqa: E402
from bench.serve import (  # noqa: E402
    WORKLOADS,
    LoadConfig,
    LoadPass,
    Prompt,
    RssSampler,
    build_prompts,
    default_output_tokens,
    format_spec_decode,
    load_tokenizer,
    measure_load,
    summarize_passes,
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


@dataclass(frozen=True, slots=True)
class Scenario:
    """One load: which workload, how many streams, how many requests, and (chat) a prompt
    length of its own, None for --prompt-tokens."""

    workload: str
    concurrency: int
    num_requests: int
    prompt_tokens: int | None = None

    @property
    def key(self) -> str:
        # the length in the key only when given: keys without it stay those of older runs
        length = "" if self.prompt_tokens is None else f" @{self.prompt_tokens}"
        return f"{self.workload} c{self.concurrency}{length}"


class StartedServer:
    """A server command started in its own process group, stopped with SIGINT then SIGKILL;
    a thread samples the RSS of its process tree for its whole life."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log = log_path.open("w")
        self.process = subprocess.Popen(argv, stdout=self.log,
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


def parse_scenarios(text: str, default_workload: str = "chat") -> list[Scenario]:
    """"edit:1:8,1:4,16,1:2@4096" -> edit at 1 stream 8 requests, chat at 1 stream 4 requests,
    chat at 16 streams 64 requests, chat at 1 stream 2 requests of 4096 prompt tokens:
    [WORKLOAD:]CONCURRENCY[:NUM_REQUESTS][@PROMPT_TOKENS], NUM_REQUESTS defaulting to 4x the
    concurrency, PROMPT_TOKENS (chat only) to --prompt-tokens."""
    scenarios: list[Scenario] = []
    for item in text.split(","):
        scenario = _parse_scenario(item.strip(), default_workload)
        if any(other.key == scenario.key for other in scenarios):
            raise ValueError(f"scenario {item!r}: {scenario.key} given twice")
        scenarios.append(scenario)
    return scenarios


def _parse_scenario(item: str, default_workload: str) -> Scenario:
    load, sep, length = item.partition("@")
    parts = load.split(":")
    workload = parts.pop(0) if parts[0] in WORKLOADS else default_workload
    if (not 1 <= len(parts) <= 2 or not all(part.isdigit() for part in parts)
            or sep and not length.isdigit()):
        raise ValueError(f"scenario {item!r}: expected [WORKLOAD:]CONCURRENCY[:NUM_REQUESTS]"
                         f"[@PROMPT_TOKENS] with WORKLOAD one of {WORKLOADS}")
    if sep and workload != "chat":
        raise ValueError(f"scenario {item!r}: @PROMPT_TOKENS is for the chat workload only "
                         f"(edit prompts are sized by --file-tokens)")
    if sep and int(length) < 1:
        raise ValueError(f"scenario {item!r}: @PROMPT_TOKENS must be at least 1")
    concurrency = int(parts[0])
    return Scenario(workload, concurrency, int(parts[1]) if len(parts) == 2 else 4 * concurrency,
                    int(length) if sep else None)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """"NAME=FLAGS" -> (NAME, FLAGS split like a shell would): a JSON value goes in single
    quotes, "ngram=--speculative-config '{\"method\": \"ngram\"}'"."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--ours-variant {text!r}: expected NAME=FLAGS (FLAGS may be empty)")
    return name.strip(), shlex.split(flags)


def our_servers(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, argv) of each pagedserve run, in order: the plain command unless a variant
    with no flags stands for it, then the variants."""
    base = shlex.split(args.ours_cmd) if args.ours_cmd else [
        sys.executable, "-m", "server", "serve", "--dtype", "bfloat16", "--port", str(args.port)]
    variants = [parse_variant(text) for text in args.ours_variant]
    if all(flags for _, flags in variants):
        variants.insert(0, ("", []))
    return [(f"pagedserve {name}".rstrip(), base + flags) for name, flags in variants]


def load_config(scenario: Scenario, position: int, url: str, pid: int | None,
                args: argparse.Namespace) -> LoadConfig:
    """The load of the scenario at `position` in --scenarios. Its own seed, --seed + position:
    scenarios share a server, whose prefix cache would serve part of any prompt an earlier
    scenario sent (or a longer one opening like it); warm-ups take seed + 10_000, clear of
    these below 10_000 scenarios."""
    prompt_tokens = scenario.prompt_tokens or args.prompt_tokens
    return LoadConfig(url=url, num_requests=scenario.num_requests,
                      concurrency=scenario.concurrency, workload=scenario.workload,
                      prompt_tokens=prompt_tokens, file_tokens=args.file_tokens,
                      output_tokens=default_output_tokens(scenario.workload, args.output_tokens),
                      seed=args.seed + position, pid=pid, endpoint=args.endpoint)


@dataclass(slots=True)
class _Target:
    """One server's side of a scenario under way: its load, prompts and passes so far."""

    run: ServerRun
    config: LoadConfig
    prompts: list[Prompt]
    passes: list[LoadPass] = field(default_factory=list)
    bandwidths: list[float] = field(default_factory=list)  # around each of its passes


def rounds_of(scenario: Scenario, rounds: int) -> int:
    """How many rounds the scenario's requests split into: up to `rounds` at one stream; a
    scenario of more streams runs whole, as each round would begin and end with a burst of
    arrivals that its closed loop otherwise spreads out (16 streams of 230-token prompts, two
    runs: in two rounds of 16, pagedserve's median TTFT 2.90 s and vLLM's 2.25; in one loop of
    32, 1.64 and 2.50)."""
    return max(1, min(rounds, scenario.num_requests)) if scenario.concurrency == 1 else 1


def pass_schedule(num_servers: int, scenario: Scenario, rounds: int) -> list[tuple[int, slice]]:
    """The passes of a scenario in order, each (server index, its requests): the requests in
    `rounds_of` contiguous rounds (sizes one apart at most), every server taking each round
    in turn, the order reversed every other round (A B B A ...) so none goes first more."""
    count = rounds_of(scenario, rounds)
    bounds = [scenario.num_requests * i // count for i in range(count + 1)]
    passes = []
    for index in range(count):
        order = range(num_servers) if index % 2 == 0 else reversed(range(num_servers))
        passes += [(server, slice(bounds[index], bounds[index + 1])) for server in order]
    return passes


def run_scenario(servers: list[tuple[ServerRun, str, int | None]], position: int,
                 scenario: Scenario, rounds: int, args: argparse.Namespace,
                 tokenizer) -> None:  # noqa: ANN001
    """The scenario at `position` in --scenarios against each (run, url, pid), into its run, in
    the passes of `pass_schedule`: with rounds, the figures a ratio compares are seconds
    apart, not a scenario apart. Each server gets the same prompts, and its warm-up just
    before its first pass; at 1 stream the read bandwidth is taken around every pass."""
    targets = []
    for run, url, pid in servers:
        config = load_config(scenario, position, url, pid, args)
        targets.append(_Target(run, config, build_prompts(tokenizer, config)))
    paired = scenario.concurrency == 1 and args.bandwidth_gib > 0
    for server, requests in pass_schedule(len(targets), scenario, rounds):
        target = targets[server]
        if not target.passes:
            asyncio.run(warm_up(target.config, tokenizer, args.warmup))
        before = scenario_bandwidth(args) if paired else None
        target.passes.append(asyncio.run(measure_load(target.config, target.prompts[requests])))
        if before is not None:
            target.bandwidths.append((before + scenario_bandwidth(args)) / 2)
    for target in targets:
        summary = summarize_passes(target.config, target.passes)
        if target.bandwidths:
            summary["read_gb_s"] = sum(target.bandwidths) / len(target.bandwidths)
        target.run.scenarios[scenario.key] = summary
        logger.warning("%s, %s: %.1f output tok/s, %.0f tok per request, TTFT p50 %.2f s, "
                       "prefill %s tok/s, TPOT mean %.1f ms, %s, %d failed", target.run.name,
                       scenario.key, summary["output_tok_s"], summary["mean_output_tokens"],
                       summary["ttft_s"]["p50"], _fmt(summary["prefill_tok_s"], ".0f"),  # type: ignore[index]
                       summary["tpot_s"]["mean"] * 1e3,  # type: ignore[index]
                       format_spec_decode(summary["spec_decode"]), summary["num_failed"])


def run_scenarios(name: str, url: str, pid: int | None, args: argparse.Namespace,
                  tokenizer) -> ServerRun:  # noqa: ANN001
    run = ServerRun(name)
    for position, scenario in enumerate(parse_scenarios(args.scenarios, args.workload)):
        run_scenario([(run, url, pid)], position, scenario, 1, args, tokenizer)
    return run


def start_server(name: str, argv: list[str], url: str,
                 args: argparse.Namespace) -> tuple[StartedServer, float]:
    """Start a server and wait until it serves; (the server, seconds to ready)."""
    log_path = Path(args.log_dir) / f"{name.replace(' ', '-')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("starting %s: %s (log: %s)", name, shlex.join(argv), log_path)
    server = StartedServer(argv, log_path)
    try:
        ready_s = wait_ready(url, server.process, args.ready_timeout)
    except BaseException:
        server.stop()
        raise
    logger.warning("%s ready in %.1f s", name, ready_s)
    return server, ready_s


def bench_started(name: str, argv: list[str], url: str, args: argparse.Namespace,
                  tokenizer) -> ServerRun:  # noqa: ANN001
    server, ready_s = start_server(name, argv, url, args)
    try:
        run = run_scenarios(name, url, server.process.pid, args, tokenizer)
        run.ready_s = ready_s
    finally:
        peak = server.stop()
    run.peak_rss_gb = peak
    return run


def bench_in_turn(args: argparse.Namespace, tokenizer) -> list[ServerRun]:  # noqa: ANN001
    """One server at a time: each started, run through every scenario and stopped before the
    next starts."""
    runs: list[ServerRun] = []
    if not args.skip_ours:
        url = f"http://127.0.0.1:{args.port}"
        runs += [bench_started(name, argv, url, args, tokenizer)
                 for name, argv in our_servers(args)]
    if args.peer_cmd:
        runs.append(bench_started(args.peer_name, shlex.split(args.peer_cmd),
                                  f"http://127.0.0.1:{args.peer_port}", args, tokenizer))
    elif args.peer_url:
        run = run_scenarios(args.peer_name, args.peer_url, args.peer_pid, args, tokenizer)
        run.peak_rss_gb = peak_rss_of_scenarios(run)
        runs.append(run)
    return runs


def bench_interleaved(args: argparse.Namespace, tokenizer) -> list[ServerRun]:  # noqa: ANN001
    """--interleave: every server up at once (each started after the last is ready), and each
    scenario run on one server after the other before the next scenario, so the figures a
    ratio compares are taken minutes apart at most, not a whole run apart: on a shared
    machine whose speed drifts by several % from one minute to the next, that is what keeps
    the ratios honest. An idle server must not compete for the cores (pagedserve and vLLM's
    CPU build stay below 1% of a core while idle)."""
    targets: list[tuple[ServerRun, str, StartedServer | None]] = []
    try:
        for name, argv, url in servers_to_start(args):
            server, ready_s = start_server(name, argv, url, args)
            targets.append((ServerRun(name, ready_s=ready_s), url, server))
        if args.peer_url:
            targets.append((ServerRun(args.peer_name), args.peer_url, None))
        servers = [(run, url, server.process.pid if server else args.peer_pid)
                   for run, url, server in targets]
        for position, scenario in enumerate(parse_scenarios(args.scenarios, args.workload)):
            run_scenario(servers, position, scenario, args.rounds, args, tokenizer)
    finally:
        for run, _, server in targets:
            if server is not None:
                run.peak_rss_gb = server.stop()
    for run, _, server in targets:
        if server is None:
            run.peak_rss_gb = peak_rss_of_scenarios(run)
    return [run for run, _, _ in targets]


def peak_rss_of_scenarios(run: ServerRun) -> float | None:
    """A server this run did not start: the peak of its scenarios' RSS samples (--peer-pid)."""
    peaks = [s["peak_rss_gb"] for s in run.scenarios.values() if s.get("peak_rss_gb")]
    return max(peaks) if peaks else None  # type: ignore[type-var]


def servers_to_start(args: argparse.Namespace) -> list[tuple[str, list[str], str]]:
    """(name, argv, url) of every server this run starts: pagedserve's runs (each on its own
    port under --interleave, where they are all up at once), then the peer's command."""
    servers = []
    if not args.skip_ours:
        for index, (name, argv) in enumerate(our_servers(args)):
            port = args.port + index
            servers.append((name, _with_port(argv, args.port, port), f"http://127.0.0.1:{port}"))
    if args.peer_cmd:
        servers.append((args.peer_name, shlex.split(args.peer_cmd),
                        f"http://127.0.0.1:{args.peer_port}"))
    return servers


def _with_port(argv: list[str], old: int, new: int) -> list[str]:
    """argv with its --port `old` changed to `new` (a variant under --interleave)."""
    if old == new:
        return argv
    if "--port" not in argv or argv[argv.index("--port") + 1] != str(old):
        raise ValueError(f"--interleave with variants needs --port {old} in --ours-cmd")
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(new)
    return argv


def bench_offline(args: argparse.Namespace, tokenizer) -> ServerRun:  # noqa: ANN001
    """The same prompts through LLM.generate, no HTTP: what the engine alone does."""
    from engine import LLM, SamplingParams

    run = ServerRun("offline LLM.generate")
    for position, scenario in enumerate(parse_scenarios(args.scenarios, args.workload)):
        llm = LLM(args.model, dtype="bfloat16", max_num_seqs=scenario.concurrency)
        requests = build_prompts(tokenizer, load_config(scenario, position, "", None, args))
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r.text}],
                                                 add_generation_prompt=True, tokenize=True,
                                                 return_dict=False) for r in requests]
        params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens,
                                 min_tokens=r.max_tokens if r.is_forced else 0,
                                 ignore_eos=r.is_forced) for r in requests]
        # warm-up on a prompt of its own: one of the timed prompts would be a prefix-cache hit
        warm_up = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Warm-up: say hello."}], add_generation_prompt=True,
            tokenize=True, return_dict=False)
        llm.generate([warm_up], SamplingParams(temperature=0.0, max_tokens=8))
        cpu_start, start = time.process_time(), time.perf_counter()
        outputs = llm.generate(prompts, params)
        duration = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        run.scenarios[scenario.key] = {
            "output_tok_s": num_tokens / duration, "duration_s": duration,
            "mean_output_tokens": num_tokens / len(outputs),
            "server_cpu_ms_per_output_token": 1e3 * cpu_seconds / num_tokens}
        del llm
    return run


def measure_roofline(args: argparse.Namespace) -> dict[str, float | None] | None:
    """Read bandwidth now, with no server running, and the batch-1 decode bound it puts on a
    model whose bf16 weights are read once per token."""
    if args.bandwidth_gib <= 0:
        return None
    threads = args.bandwidth_threads
    bandwidth = read_bandwidth(int(args.bandwidth_gib * (1 << 30)), threads)
    weight_bytes = args.weights_bytes
    if weight_bytes is None:
        try:
            weight_bytes = decode_weight_bytes(ModelShape.from_config(Path(args.model)),
                                               torch.bfloat16)
        except (OSError, KeyError, ValueError) as exc:
            logger.warning("no weight bytes from %s (%s): pass --weights-bytes", args.model, exc)
    bound = bandwidth * 1e9 / weight_bytes if weight_bytes else None
    logger.warning("read bandwidth %.1f GB/s on %d threads; decode roofline %s tok/s",
                   bandwidth, threads, _fmt(bound, ".1f"))
    return {"read_gb_s": bandwidth, "threads": threads, "weight_bytes": weight_bytes,
            "decode_roofline_tok_s": bound}


def scenario_bandwidth(args: argparse.Namespace) -> float:
    """Read bandwidth now (the servers idle), for the 1-stream scenarios' roofline: taken just
    before and after each, as this machine's bandwidth swings (37-73 GB/s within minutes,
    sometimes seconds) and a bound measured once at the start misstates most rows."""
    return read_bandwidth(int(args.bandwidth_gib * (1 << 30)), args.bandwidth_threads,
                          repeats=3)


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _roofline_ratio(summary: dict[str, object], concurrency: int,
                    roofline: dict[str, float | None] | None) -> float | None:
    """Decode tokens/s (1 / mean TPOT: the prefill, which both sides pay alike, left out) over
    the batch-1 decode bound; at 1 stream only, where that bound holds. The bound is the
    bandwidth read around the scenario itself where it was (`scenario_bandwidth`), else the
    one from the start."""
    bound = roofline and roofline["decode_roofline_tok_s"]
    paired, weight_bytes = summary.get("read_gb_s"), roofline and roofline["weight_bytes"]
    if paired and weight_bytes:
        bound = float(paired) * 1e9 / weight_bytes  # type: ignore[arg-type]
    tpot = (summary.get("tpot_s") or {}).get("mean")  # type: ignore[attr-defined]
    return 1 / tpot / bound if concurrency == 1 and bound and tpot else None


def table(runs: list[ServerRun], scenarios: list[Scenario],
          roofline: dict[str, float | None] | None) -> str:
    """One row per server and scenario."""
    header = ["server", "scenario", "tok/s", "out tok/req", "TTFT p50 s", "prefill tok/s",
              "ITL p50 ms", "TPOT ms", "tok/chunk", "CPU ms/tok", "accept", "acc len",
              "read GB/s", "x roofline"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for run in runs:
        for scenario in scenarios:
            summary = run.scenarios.get(scenario.key)
            if summary is None:
                continue
            ttft, itl, tpot = (summary.get(name) or {} for name in ("ttft_s", "itl_s", "tpot_s"))
            spec = summary.get("spec_decode") or {}
            cells = [run.name, scenario.key, _fmt(summary.get("output_tok_s"), ".1f"),
                     _fmt(summary.get("mean_output_tokens"), ".0f"),
                     _fmt(ttft.get("p50"), ".2f"),  # type: ignore[union-attr]
                     _fmt(summary.get("prefill_tok_s"), ".0f"),
                     _fmt(itl.get("p50") and itl["p50"] * 1e3, ".1f"),  # type: ignore
                     _fmt(tpot.get("mean") and tpot["mean"] * 1e3, ".1f"),  # type: ignore
                     _fmt(summary.get("tokens_per_chunk"), ".2f"),
                     _fmt(summary.get("server_cpu_ms_per_output_token"), ".1f"),
                     _fmt(spec.get("acceptance_rate"), ".1%"),  # type: ignore[union-attr]
                     _fmt(spec.get("mean_accepted_length"), ".2f"),  # type: ignore[union-attr]
                     _fmt(summary.get("read_gb_s"), ".1f"),
                     _fmt(_roofline_ratio(summary, scenario.concurrency, roofline), ".2f")]
            lines.append(" | ".join(cells))
    return "\n".join(lines)


def server_table(runs: list[ServerRun]) -> str:
    lines = ["server | ready s | peak RSS GB", "--- | --- | ---"]
    lines += [f"{run.name} | {_fmt(run.ready_s, '.1f')} | {_fmt(run.peak_rss_gb, '.2f')}"
              for run in runs]
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
        for metric, stat in (("ttft_s", "p50"), ("itl_s", "p50"), ("tpot_s", "mean")):
            if metric in a and metric in b:
                result[f"{key} {metric[:-2]} {stat} (other/ours)"] = (
                    b[metric][stat] / max(a[metric][stat], 1e-9))  # type: ignore[index]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8011, help="pagedserve's port")
    parser.add_argument("--ours-cmd", default=None,
                        help="command starting pagedserve (default: this Python, "
                        "-m server serve --dtype bfloat16 --port PORT)")
    parser.add_argument("--ours-variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="also bench pagedserve started with these extra serve flags, "
                        "split like a shell would, e.g. int8='--quantization int8' or "
                        "\"ngram=--speculative-config '{\\\"method\\\": \\\"ngram\\\"}'\" "
                        "(repeatable; same port, in turn; NAME= with no flags is the plain "
                        "command, which then does not run again first)")
    parser.add_argument("--skip-ours", action="store_true", help="bench only the peer")
    parser.add_argument("--peer-cmd", default=None, help="command starting the peer server")
    parser.add_argument("--peer-port", type=int, default=8100, help="the peer command's port")
    parser.add_argument("--peer-url", default=None, help="an already running peer's base URL")
    parser.add_argument("--peer-pid", type=int, default=None, help="that peer's PID, for RSS")
    parser.add_argument("--peer-name", default="peer")
    parser.add_argument("--model", default=None,
                        help="model directory for the tokenizer, the weight bytes of the "
                        "roofline and --offline (default: the embedded default model)")
    parser.add_argument("--scenarios", default="1:4,16:32",
                        help="[WORKLOAD:]CONCURRENCY[:NUM_REQUESTS][@PROMPT_TOKENS] items, "
                        "comma-separated, e.g. edit:1:8,chat:1:4,chat:16:32 (WORKLOAD default: "
                        "--workload; NUM_REQUESTS: 4x CONCURRENCY); @PROMPT_TOKENS, chat only, "
                        "overrides --prompt-tokens for that scenario: 1:2@1024,1:2@4096,"
                        "1:2@8192,1:1@16384 compares TTFT and prefill rate by prompt length")
    parser.add_argument("--workload", choices=WORKLOADS, default="chat",
                        help="workload of the scenarios that name none")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--prompt-tokens", type=int, default=230,
                        help="chat workload: tokens per prompt, template included (a "
                        "scenario's @PROMPT_TOKENS overrides it)")
    parser.add_argument("--file-tokens", type=int, default=300,
                        help="edit workload: tokens per generated Python file")
    parser.add_argument("--output-tokens", type=int, default=None,
                        help="exactly this many tokens per answer (default: 128 for chat; "
                        "edit answers stop on their own, at most 1.3x their file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2, help="short requests before each run")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--bandwidth-gib", type=float, default=2.0,
                        help="fp32 buffer summed for the read bandwidth (0: skip the roofline)")
    parser.add_argument("--bandwidth-threads", type=int, default=torch.get_num_threads(),
                        help="threads of that sum (default: torch's default, the server's)")
    parser.add_argument("--weights-bytes", type=int, default=None,
                        help="weight bytes read per decoded token (default: --model's "
                        "config.json, in bf16)")
    parser.add_argument("--interleave", action="store_true",
                        help="all servers up at once; each scenario runs on every server in "
                        "turn before the next scenario (fair ratios on a drifting machine)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --interleave: each 1-stream scenario's requests in up to "
                        "this many rounds, every server taking its share of each in turn "
                        "(A B B A ...), so a ratio's two figures are seconds apart; scenarios "
                        "of more streams run whole")
    parser.add_argument("--offline", action="store_true",
                        help="also run the prompts through LLM.generate (server overhead)")
    parser.add_argument("--log-dir", default="/tmp", help="where the servers' logs go")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    try:  # bad scenarios and variants fail here, before any server starts
        parse_scenarios(args.scenarios, args.workload)
        for variant in args.ours_variant:
            parse_variant(variant)
    except ValueError as exc:
        parser.error(str(exc))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.rounds > 1 and not args.interleave:
        parser.error("--rounds takes turns between servers that are up at once: add --interleave")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if args.model is None:
        from engine.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    tokenizer = load_tokenizer(args.model)
    roofline = measure_roofline(args)
    runs = (bench_interleaved if args.interleave else bench_in_turn)(args, tokenizer)
    if args.offline:
        runs.append(bench_offline(args, tokenizer))
    report(args, runs, roofline)


def describe(args: argparse.Namespace, scenarios: list[Scenario],
             roofline: dict[str, float | None] | None) -> str:
    """What was run, and the machine's bound."""
    workloads = {scenario.workload for scenario in scenarios}
    lines = [f"scenarios {args.scenarios} (workload, streams, requests, @prompt tokens)"]
    if "chat" in workloads:
        lengths = dict.fromkeys(s.prompt_tokens or args.prompt_tokens
                                for s in scenarios if s.workload == "chat")
        lines.append(f"chat: {'/'.join(map(str, lengths))} prompt tokens, "
                     f"{default_output_tokens('chat', args.output_tokens)} output tokens")
    if "edit" in workloads:
        output = (f"exactly {args.output_tokens}" if args.output_tokens
                  else "until the model stops, at most 1.3x the file")
        lines.append(f"edit: Python files of ~{args.file_tokens} tokens returned with one "
                     f"change; output tokens: {output}")
    if roofline is not None:
        bound, weights = roofline["decode_roofline_tok_s"], roofline["weight_bytes"]
        lines.append(f"read bandwidth {roofline['read_gb_s']:.1f} GB/s "
                     f"({roofline['threads']} threads, {args.bandwidth_gib:g} GiB fp32 sum, "
                     f"best of 5); decode roofline "
                     + (f"{bound:.1f} tok/s (bf16 weights {weights / 1e9:.3f} GB read per token)"
                        if bound else "unknown (no weight bytes)"))
    return "\n".join(lines)


def report(args: argparse.Namespace, runs: list[ServerRun],
           roofline: dict[str, float | None] | None) -> None:
    scenarios = parse_scenarios(args.scenarios, args.workload)
    keys = [scenario.key for scenario in scenarios]
    print("\n" + describe(args, scenarios, roofline) + "\n")
    print(table(runs, scenarios, roofline))
    print("\n" + server_table(runs))
    all_ratios: dict[str, dict[str, float]] = {}
    ours = [run for run in runs if run.name.startswith("pagedserve")]
    for mine in ours:
        for other in runs:
            if other in ours and other is not ours[0] or other is mine:
                continue  # every pagedserve run against the peers; variants against the first
            label = f"{mine.name} vs {other.name}"
            all_ratios[label] = ratios(mine, other, keys)
            print(f"\n{label} (> 1: {mine.name} better):")
            width = max((len(name) for name in all_ratios[label]), default=0)
            for name, value in all_ratios[label].items():
                print(f"  {name:{width}s} {value:6.2f}")
    if args.json is not None:
        payload = {"roofline": roofline, "ratios": all_ratios,
                   "runs": [{"name": r.name, "ready_s": r.ready_s, "peak_rss_gb": r.peak_rss_gb,
                             "scenarios": r.scenarios} for r in runs]}
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()

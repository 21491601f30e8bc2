"""bench/serve.py, bench/edit_workload.py and bench/compare.py's parsing: the edit workload is
seeded, valid Python near its token target; edit requests stop on their own unless a length is
forced; chat prompts of a run, its warm-ups and its other scenarios part within their first
tokens; the prefill rate is reported; spec-decode counters are read from Prometheus text and
diffed; the RSS sampler finds a child started late; scenarios (a prompt length included) and
variants (a JSON flag value in quotes included) parse as documented."""

from __future__ import annotations

import ast
import itertools
import json
import math
import os
import subprocess
import sys

import pytest

from bench.compare import (
    Scenario,
    ServerRun,
    load_config,
    parse_args,
    parse_scenarios,
    parse_variant,
    pass_schedule,
    ratios,
    servers_to_start,
    table,
)
from bench.edit_workload import edit_tasks
from bench.serve import (
    LoadConfig,
    LoadPass,
    Prompt,
    RequestResult,
    RssSampler,
    build_prompts,
    default_output_tokens,
    format_summary,
    parse_spec_counters,
    request_body,
    spec_decode_delta,
    summarize,
    summarize_passes,
    warm_up_config,
)
from tests.tiny_models import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return build_tokenizer()


class _WordTokenizer:
    """One token per whitespace-separated word: file sizes the test can reason about."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [0] * len(text.split())


# ---------------------------------------------------------------------------- the edit workload


def test_edit_tasks_are_seeded_varied_python() -> None:
    tasks = edit_tasks(_WordTokenizer(), 12, 200, seed=3)
    assert tasks == edit_tasks(_WordTokenizer(), 12, 200, seed=3)
    assert tasks[:5] == edit_tasks(_WordTokenizer(), 5, 200, seed=3)  # a prefix of a longer run
    assert tasks != edit_tasks(_WordTokenizer(), 12, 200, seed=4)
    assert len({task.code for task in tasks}) == len(tasks)
    for task in tasks:
        ast.parse(task.code)
        assert task.code.endswith("\n") and "def " in task.code and '"""' in task.code
        assert task.instruction.split()[0] in ("In", "Rename", "Change", "Add")
        assert f"```python\n{task.code}```" in task.prompt()
        assert 0.5 * 200 <= task.num_code_tokens <= 1.15 * 200


def test_edit_requests_stop_on_their_own_unless_forced(tokenizer) -> None:  # noqa: ANN001
    config = LoadConfig(url="", workload="edit", num_requests=3, file_tokens=300,
                        output_tokens=default_output_tokens("edit", None))
    prompts = build_prompts(tokenizer, config)
    tasks = edit_tasks(tokenizer, 3, 300, seed=0)
    assert [p.max_tokens for p in prompts] == [math.ceil(1.3 * t.num_code_tokens)
                                               for t in tasks]
    assert not any(p.is_forced for p in prompts)
    body = request_body(config, prompts[0])
    assert "ignore_eos" not in body and "min_tokens" not in body
    assert body["messages"] == [{"role": "user", "content": tasks[0].prompt()}]
    config.output_tokens = 50
    body = request_body(config, build_prompts(tokenizer, config)[0])  # forced: as in chat
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (50, 50, True)


def test_chat_requests_keep_their_exact_length(tokenizer) -> None:  # noqa: ANN001
    config = LoadConfig(url="", num_requests=2, output_tokens=default_output_tokens("chat", None))
    prompt = build_prompts(tokenizer, config)[0]
    assert prompt.is_forced and prompt.max_tokens == 128
    body = request_body(config, prompt)
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (128, 128, True)
    body = request_body(LoadConfig(url="", endpoint="completions"), Prompt("hi", 4, False))
    assert body["prompt"] == "hi" and "ignore_eos" not in body


def _common_prefix(a: list[int], b: list[int]) -> int:
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


def test_long_prompts_part_within_their_first_tokens(tokenizer) -> None:  # noqa: ANN001
    """Every timed prompt of a prompt-length sweep differs from every other prompt sent to the
    same server, warm-ups and other scenarios included, within its first few tokens: a prefix
    cache (16-token blocks) can reuse no block of it beyond the chat template's opening. The
    longer scenario's first prompt used to open with the shorter one's whole text."""
    args = parse_args(["--scenarios", "1:2@512,1:2@1024,1:1@2048,1:4,4:4"])
    timed, warm = [], []
    for position, scenario in enumerate(parse_scenarios(args.scenarios)):
        config = load_config(scenario, position, "", None, args)
        timed += [p.text for p in build_prompts(tokenizer, config)]
        warm += [p.text for p in build_prompts(tokenizer, warm_up_config(config, args.warmup))]
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in timed + warm]
    assert len({tuple(i[:64]) for i in ids}) == len(ids) == 13 + 5 * args.warmup
    timed_ids = ids[:len(timed)]
    assert max(_common_prefix(a, b) for a, b in itertools.combinations(ids, 2)
               if a in timed_ids or b in timed_ids) < 8
    lengths = [len(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)) for text in timed[:5]]
    assert [round(n, -1) for n in lengths] == [510, 510, 1020, 1020, 2050]  # about @N each


def test_summary_and_table_report_the_prefill_rate() -> None:
    """prefill tok/s = prompt tokens / TTFT per request, median; none without usage."""
    config = LoadConfig(url="", prompt_tokens=4096)
    results = [RequestResult(ok=True, ttft=ttft, e2e=ttft + 0.7, prompt_tokens=4000,
                             output_tokens=8, num_chunks=8, chunk_gaps=[0.1] * 7)
               for ttft in (2.0, 4.0, 8.0)] + [RequestResult(ok=False, error="HTTP 400")]
    summary = summarize(config, results, duration=15.0, peak_rss_bytes=0)
    assert summary["prefill_tok_s"] == 1000.0  # 2000, 1000, 500
    assert summary["mean_prompt_tokens"] / summary["ttft_s"]["p50"] == 1000.0  # type: ignore
    assert "prefill 1000 tok/s" in format_summary(summary)
    no_usage = [RequestResult(ok=True, ttft=1.0, e2e=2.0, output_tokens=8, num_chunks=8)]
    assert summarize(config, no_usage, 2.0, 0)["prefill_tok_s"] is None

    scenarios = parse_scenarios("1:3@4096,1:2")
    ours = ServerRun("pagedserve", scenarios={scenarios[0].key: summary})
    lines = table([ours], scenarios, None).splitlines()
    header, row = lines[0].split(" | "), lines[2].split(" | ")
    assert len(lines) == 3 and row[1] == "chat c1 @4096"
    assert row[header.index("prefill tok/s")] == "1000"
    assert row[header.index("TTFT p50 s")] == "4.00"
    slower = summarize(config, [RequestResult(ok=True, ttft=2 * r.ttft, e2e=2 * r.ttft + 0.7,
                                              prompt_tokens=4000, output_tokens=8,
                                              chunk_gaps=[0.1] * 7) for r in results[:3]],
                       duration=30.0, peak_rss_bytes=0)
    peer = ServerRun("peer", scenarios={scenarios[0].key: slower})
    # TTFT as other / ours, like every latency there: > 1 means ours is faster
    assert ratios(ours, peer, [s.key for s in scenarios]) == pytest.approx({
        "chat c1 @4096 tok/s": 2.0, "chat c1 @4096 ttft p50 (other/ours)": 2.0,
        "chat c1 @4096 itl p50 (other/ours)": 1.0, "chat c1 @4096 tpot mean (other/ours)": 1.0})


# ------------------------------------------------------------------------- spec-decode counters

_METRICS = """\
# HELP pagedserve_spec_decode_num_drafts_total Speculative decoding: verifications.
# TYPE pagedserve_spec_decode_num_drafts_total counter
pagedserve_spec_decode_num_drafts_total{model_name="a b}"} 10.0
pagedserve_spec_decode_num_drafts_created{model_name="a b}"} 1.7e+09
pagedserve_spec_decode_num_draft_tokens_total{model_name="a b}"} 50.0
pagedserve_spec_decode_num_accepted_tokens_total{model_name="a b}"} 20.0
pagedserve_spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="0"} 9.0
pagedserve_generation_tokens_total{model_name="m"} 999.0
"""


def test_spec_counters_are_summed_over_labels_and_diffed() -> None:
    before = parse_spec_counters(_METRICS)
    assert before == {"num_drafts": 10.0, "num_draft_tokens": 50.0, "num_accepted_tokens": 20.0}
    after = parse_spec_counters(_METRICS + 'pagedserve_spec_decode_num_drafts_total{model_name='
                                '"other"} 4\npagedserve_spec_decode_num_draft_tokens_total 10\n'
                                "pagedserve_spec_decode_num_accepted_tokens_total 8 1700000000\n")
    delta = spec_decode_delta(before, after)
    assert delta == {"num_drafts": 4.0, "num_draft_tokens": 10.0, "num_accepted_tokens": 8.0,
                     "acceptance_rate": 0.8, "mean_accepted_length": 3.0}


def test_spec_counters_under_vllm_names_count_once() -> None:
    """A vLLM server (or ours with --metrics-names vllm) has only vLLM's names; ours with
    `both` counts every event under each name, which must not count twice."""
    vllm = _METRICS.replace("pagedserve_", "vllm:")
    assert parse_spec_counters(vllm) == parse_spec_counters(_METRICS)
    assert parse_spec_counters(_METRICS + vllm) == parse_spec_counters(_METRICS)


def test_absent_or_idle_spec_counters() -> None:
    assert parse_spec_counters("pagedserve_generation_tokens_total 3\n") is None
    assert spec_decode_delta(None, None) is None
    idle = parse_spec_counters(_METRICS)
    assert spec_decode_delta(idle, idle) == {
        "num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0,
        "acceptance_rate": None, "mean_accepted_length": None}


def test_roofline_column_takes_the_bandwidth_read_around_its_scenario() -> None:
    """At 1 stream, x roofline = (1 / mean TPOT) / (read GB/s / weight bytes per token): with
    the bandwidth read around that scenario where there is one, else the run's opening one."""
    config = LoadConfig(url="", prompt_tokens=230)
    results = [RequestResult(ok=True, ttft=0.5, e2e=0.5 + 7 * 0.025, prompt_tokens=230,
                             output_tokens=8, num_chunks=8, chunk_gaps=[0.025] * 7)]
    paired = summarize(config, results, duration=1.0, peak_rss_bytes=0)
    assert paired["tpot_s"]["mean"] == pytest.approx(0.025)  # type: ignore[index]
    paired["read_gb_s"] = 50.0
    opening_only = dict(paired)
    del opening_only["read_gb_s"]
    scenarios = parse_scenarios("1:1,2:2")
    roofline = {"read_gb_s": 80.0, "threads": 2, "weight_bytes": 1e9,
                "decode_roofline_tok_s": 80.0}
    rows = []
    for summary in (paired, opening_only):
        run = ServerRun("pagedserve", scenarios={s.key: summary for s in scenarios})
        lines = table([run], scenarios, roofline).splitlines()
        header = lines[0].split(" | ")
        rows.append([line.split(" | ") for line in lines[2:]])
    column, bandwidth = header.index("x roofline"), header.index("read GB/s")
    assert rows[0][0][column] == "0.80" and rows[0][0][bandwidth] == "50.0"  # 40 / 50 tok/s
    assert rows[1][0][column] == "0.50" and rows[1][0][bandwidth] == "-"  # 40 / 80 tok/s
    assert rows[0][1][column] == "-"  # 2 streams: no batch-1 bound


# ------------------------------------------------------------------------ compare's arguments


def test_scenarios_name_their_workload() -> None:
    assert parse_scenarios("edit:1:8,1:4,chat:16") == [
        Scenario("edit", 1, 8), Scenario("chat", 1, 4), Scenario("chat", 16, 64)]
    assert parse_scenarios("1", default_workload="edit") == [Scenario("edit", 1, 4)]
    assert [s.key for s in parse_scenarios("edit:1:2,chat:1:2")] == ["edit c1", "chat c1"]
    for bad in ("foo:1", "1:2:3", "edit", "1:2,1:3"):
        with pytest.raises(ValueError):
            parse_scenarios(bad)


def test_scenarios_take_a_prompt_length() -> None:
    assert parse_scenarios("1:2@4096,chat:1@512,4:8") == [
        Scenario("chat", 1, 2, 4096), Scenario("chat", 1, 4, 512), Scenario("chat", 4, 8)]
    sweep = parse_scenarios("1:2@1024,1:2@4096,1:2@8192,1:1@16384,1:2")
    assert [s.key for s in sweep] == ["chat c1 @1024", "chat c1 @4096", "chat c1 @8192",
                                      "chat c1 @16384", "chat c1"]
    for bad in ("1:2@", "1:2@x", "1:2@0", "1@2@3", "@512", "1:2@1024,1:4@1024"):
        with pytest.raises(ValueError):
            parse_scenarios(bad)
    for edit in ("edit:1:2@4096", "1@512"):  # edit prompts are sized by --file-tokens
        with pytest.raises(ValueError, match="chat workload only"):
            parse_scenarios(edit, default_workload="edit" if edit == "1@512" else "chat")


def test_load_config_takes_the_scenario_length_and_its_own_seed() -> None:
    args = parse_args(["--scenarios", "1:2@4096,16:32", "--seed", "7", "--output-tokens", "8"])
    configs = [load_config(scenario, position, "http://x", 42, args)
               for position, scenario in enumerate(parse_scenarios(args.scenarios))]
    assert [(c.prompt_tokens, c.num_requests, c.concurrency, c.seed, c.output_tokens)
            for c in configs] == [(4096, 2, 1, 7, 8), (230, 32, 16, 8, 8)]
    with pytest.raises(SystemExit):  # rejected before any server starts
        parse_args(["--scenarios", "edit:1:2@4096"])


def test_interleave_starts_every_server_on_its_own_port() -> None:
    args = parse_args(["--ours-cmd", "python -m server serve --port 8011", "--ours-variant",
                       "base=", "--ours-variant", "int8=--quantization int8", "--peer-cmd",
                       "vllm serve m --port 8100", "--interleave"])
    assert servers_to_start(args) == [
        ("pagedserve base", ["python", "-m", "server", "serve", "--port", "8011"],
         "http://127.0.0.1:8011"),
        ("pagedserve int8", ["python", "-m", "server", "serve", "--port", "8012",
                             "--quantization", "int8"], "http://127.0.0.1:8012"),
        ("peer", ["vllm", "serve", "m", "--port", "8100"], "http://127.0.0.1:8100")]
    no_port = parse_args(["--ours-cmd", "python -m server serve", "--ours-variant", "a=",
                          "--ours-variant", "b=--seed 1", "--interleave"])
    with pytest.raises(ValueError, match="needs --port 8011"):
        servers_to_start(no_port)


def test_rounds_take_turns_at_one_stream() -> None:
    one_stream = Scenario("chat", 1, 4, 4096)
    assert pass_schedule(2, one_stream, 4) == [(0, slice(0, 1)), (1, slice(0, 1)),
                                               (1, slice(1, 2)), (0, slice(1, 2)),
                                               (0, slice(2, 3)), (1, slice(2, 3)),
                                               (1, slice(3, 4)), (0, slice(3, 4))]
    assert pass_schedule(2, one_stream, 1) == [(0, slice(0, 4)), (1, slice(0, 4))]
    assert pass_schedule(2, one_stream, 9) == pass_schedule(2, one_stream, 4)  # 1 request each
    uneven = pass_schedule(1, Scenario("chat", 1, 7), 3)
    assert [r.stop - r.start for _, r in uneven] == [2, 2, 3]
    assert [i for _, r in uneven for i in range(r.start, r.stop)] == list(range(7))
    # more streams run whole: a round would start and end with a burst of arrivals
    assert pass_schedule(3, Scenario("chat", 16, 64), 4) == [
        (0, slice(0, 64)), (1, slice(0, 64)), (2, slice(0, 64))]
    for bad in (["--rounds", "2"], ["--rounds", "0", "--interleave"]):
        with pytest.raises(SystemExit):  # rounds take turns between servers up at once
            parse_args(bad)
    assert parse_args(["--rounds", "4", "--interleave"]).rounds == 4


def test_passes_pool_into_one_summary() -> None:
    config = LoadConfig(url="http://x", num_requests=3, concurrency=1, pid=1)
    first = [RequestResult(True, ttft=1.0, e2e=2.0, chunk_gaps=[0.1], prompt_tokens=100,
                           output_tokens=2, num_chunks=2, finish_reason="length")]
    second = [RequestResult(True, ttft=3.0, e2e=5.0, chunk_gaps=[0.2, 0.3], prompt_tokens=300,
                            output_tokens=3, num_chunks=3, finish_reason="length"),
              RequestResult(False, error="boom")]
    spec = {"num_drafts": 2.0, "num_draft_tokens": 8.0, "num_accepted_tokens": 4.0}
    passes = [LoadPass(first, 2.0, 10 << 20, 1.0, {**spec}),
              LoadPass(second, 8.0, 30 << 20, 3.0, {**spec, "num_accepted_tokens": 2.0})]
    pooled = summarize_passes(config, passes)
    assert pooled["num_ok"] == 2 and pooled["num_failed"] == 1 and pooled["num_passes"] == 2
    assert pooled["duration_s"] == 10.0 and pooled["output_tok_s"] == 0.5  # 5 tokens in 10 s
    assert pooled["ttft_s"]["mean"] == 2.0 and pooled["ttft_s"]["p50"] in (1.0, 3.0)
    assert sorted(pooled["itl_s"].values())[-1] == pytest.approx(0.3)
    assert pooled["prefill_tok_s"] == 100.0  # median of 100 / 1 and 300 / 3
    assert pooled["peak_rss_gb"] == pytest.approx((30 << 20) / 1e9)
    assert pooled["server_cpu_s"] == 4.0 and pooled["server_cpu_ms_per_output_token"] == 800.0
    assert pooled["spec_decode"]["num_drafts"] == 4.0
    assert pooled["spec_decode"]["acceptance_rate"] == pytest.approx(6 / 16)
    assert pooled["spec_decode"]["mean_accepted_length"] == pytest.approx(1 + 6 / 4)
    # one pass summarises as before; a server without the counters has no acceptance
    alone = summarize_passes(config, passes[:1])
    assert "num_passes" not in alone and alone["output_tok_s"] == 1.0
    assert summarize_passes(config, [passes[0], LoadPass(second, 1.0)])["spec_decode"] is None


def test_variant_flags_keep_a_quoted_json_value_whole() -> None:
    spec = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2}
    name, flags = parse_variant(f"ngram=--speculative-config '{json.dumps(spec)}' --seed 1")
    assert name == "ngram" and flags[0] == "--speculative-config" and flags[2:] == ["--seed", "1"]
    assert json.loads(flags[1]) == spec
    assert parse_variant("base=") == ("base", [])
    assert parse_variant("int8=--quantization int8") == ("int8", ["--quantization", "int8"])
    for bad in ("noflags", "=--seed 1", "x=--speculative-config '{unclosed"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_rss_sampler_finds_a_child_started_after_its_first_scan() -> None:
    sampler = RssSampler(os.getpid(), rescan_s=3600.0)
    alone = sampler.sample()
    assert alone > 0
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time; block = bytearray(200 << 20); "
                              "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        assert sampler.sample() < alone + (100 << 20)  # the tree is not scanned again yet
        sampler.rescan_s = 0.0
        assert sampler.sample() > alone + (150 << 20)
        assert sampler.peak_bytes > alone + (150 << 20)
    finally:
        child.kill()
        child.wait()

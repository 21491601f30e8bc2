"""engine/metrics.py through the real AsyncEngine on a tiny llama: counters add up to what the
clients received, gauges fall back to idle, TTFT counts from arrival, the exposition parses,
under pagedserve's names and vLLM's (engine/vllm_metrics.py: vLLM's counting rules, buckets and
labels); plus the periodic and per-request log lines and server/logging_config.py's JSON format."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from engine import AsyncEngine, EngineConfig, InvalidRequestError, QueueFullError, SamplingParams
from engine.core import StepStats
from engine.llm_engine import LLMEngine
from engine.loader import LoadedModel, load_model
from engine.metrics import LATENCY_BUCKETS, METRIC_NAMES, TOKEN_BUCKETS, MetricsLogger
from engine.outputs import RequestOutput
from engine.vllm_metrics import (
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    one_two_five_buckets,
)
from server.logging_config import build_handler
from server.routes.metrics import exposition

MODEL_NAME = "tiny"
# what Prometheus 2.x sends when it scrapes
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
VOCAB_SIZE = 512
EARLY_ARRIVAL_S = 5.0  # one request "arrived" this long before generate() was called

# every family pagedserve exports, as the text parser names them (counters without _total)
EXPECTED_FAMILIES = {
    "pagedserve_time_to_first_token_seconds", "pagedserve_inter_token_latency_seconds",
    "pagedserve_e2e_request_latency_seconds", "pagedserve_request_queue_time_seconds",
    "pagedserve_request_prefill_time_seconds", "pagedserve_request_decode_time_seconds",
    "pagedserve_request_prompt_tokens", "pagedserve_request_generation_tokens",
    "pagedserve_iteration_tokens", "pagedserve_prompt_tokens", "pagedserve_generation_tokens",
    "pagedserve_request_success", "pagedserve_request_failure", "pagedserve_num_preemptions",
    "pagedserve_prefix_cache_queries", "pagedserve_prefix_cache_hits",
    "pagedserve_num_requests_running", "pagedserve_num_requests_waiting",
    "pagedserve_kv_cache_usage_ratio", "pagedserve_spec_decode_num_drafts",
    "pagedserve_spec_decode_num_draft_tokens", "pagedserve_spec_decode_num_accepted_tokens",
    "pagedserve_spec_decode_num_accepted_tokens_per_pos",
}
INFO_FAMILY = "pagedserve_engine_config"  # an info metric: "..._info", a gauge, in the text format
# every family exported under vLLM's names, as the text parser names them; the spec-decode
# counters only appear once a step verified proposals (none here)
EXPECTED_VLLM_FAMILIES = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:engine_sleep_state", "vllm:cache_config_info",
    "vllm:prompt_tokens", "vllm:prompt_tokens_by_source", "vllm:prompt_tokens_cached",
    "vllm:generation_tokens", "vllm:request_success", "vllm:num_preemptions",
    "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds",
    "vllm:request_time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds", "vllm:request_inference_time_seconds",
    "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
    "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
    "vllm:request_prefill_kv_computed_tokens", "vllm:request_max_num_generation_tokens",
    "vllm:request_params_n", "vllm:request_params_max_tokens", "vllm:iteration_tokens_total",
}


# ---- helpers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loaded(tiny_llama_dir: Path) -> LoadedModel:
    return load_model(str(tiny_llama_dir), dtype="float32", device="cpu")


def make_engine(loaded: LoadedModel, registry: CollectorRegistry,
                **engine_args: object) -> AsyncEngine:
    """An engine on the tiny llama recording under both names, so each test checks both."""
    config = EngineConfig.from_kwargs(model=str(loaded.model_dir), dtype="float32",
                                      device="cpu", seed=0, **engine_args)
    return AsyncEngine(config, LLMEngine(config, loaded), served_model_name=MODEL_NAME,
                       registry=registry, metric_names="both")


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    if name.startswith("vllm:"):  # vLLM labels every series with its engine index too
        labels = {"engine": "0", **labels}
    value = registry.get_sample_value(name, {"model_name": MODEL_NAME, **labels})
    assert value is not None, f"{name}{labels} is not exported"
    return value


def bucket_bounds(registry: CollectorRegistry, histogram: str) -> list[float]:
    """The finite `le` bounds a histogram exports, in order."""
    families = text_string_to_metric_families(generate_latest(registry).decode())
    [family] = [f for f in families if f.name == histogram]
    return sorted({float(s.labels["le"]) for s in family.samples
                   if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"})


def prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(3, VOCAB_SIZE) for _ in range(length)]


def fixed_length(num_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True, n=n)


async def final_output(engine: AsyncEngine, request_id: str, prompt_ids: list[int],
                       params: SamplingParams, arrival_time: float | None = None) -> RequestOutput:
    final = None
    async for output in engine.generate(request_id, prompt_ids, params, arrival_time):
        final = output
    assert final is not None and final.finished
    return final


@pytest.fixture()
def engine_runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


async def wait_idle(engine: AsyncEngine, registry: CollectorRegistry) -> None:
    """Until the worker has gone idle and published the idle gauges (it does so within a loop
    turn of the last request finishing)."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        gauges = [sample(registry, f"pagedserve_num_requests_{kind}") for kind in
                  ("running", "waiting")]
        if engine.num_running == engine.num_waiting == 0 and gauges == [0.0, 0.0]:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"engine not idle: gauges running/waiting = {gauges}")


def num_tokens(outputs: list[RequestOutput]) -> int:
    return sum(len(choice.token_ids) for output in outputs for choice in output.outputs)


# ---- a scripted run: lengths, n = 2, a stop token, validation failures ------------------------

@dataclass(slots=True)
class ScriptedRun:
    registry: CollectorRegistry
    outputs: list[RequestOutput]  # every successful request's final output
    num_sequences: int
    engine: AsyncEngine


async def _scripted(engine: AsyncEngine, registry: CollectorRegistry) -> ScriptedRun:
    rng = random.Random(0)
    await engine.start()
    try:
        early = time.monotonic() - EARLY_ARRIVAL_S
        phase_one = await asyncio.gather(
            final_output(engine, "probe", prompt(rng, 11), fixed_length(8)),
            final_output(engine, "a", prompt(rng, 10), fixed_length(6), arrival_time=early),
            final_output(engine, "b", prompt(rng, 7), fixed_length(5, n=2)))
        # a stop token taken from the probe's greedy output: the same prompt stops at its first
        # occurrence, with finish reason "stop"
        probe = phase_one[0]
        stop_id = probe.outputs[0].token_ids[3]
        stopped = await final_output(engine, "c", probe.prompt_token_ids, SamplingParams(
            temperature=0.0, max_tokens=8, ignore_eos=True, stop_token_ids=(stop_id,)))
        for bad_prompt, params in (([VOCAB_SIZE + 5], fixed_length(2)),
                                   (prompt(rng, 4), fixed_length(100_000))):
            with pytest.raises(InvalidRequestError):
                await final_output(engine, "bad", bad_prompt, params)
        await wait_idle(engine, registry)
    finally:
        await engine.shutdown()
    return ScriptedRun(registry, [*phase_one, stopped], num_sequences=5, engine=engine)


@pytest.fixture(scope="module")
def scripted(loaded: LoadedModel) -> ScriptedRun:
    registry = CollectorRegistry()
    engine = make_engine(loaded, registry, enable_prefix_caching=False, num_blocks=64,
                         block_size=4)
    return asyncio.run(_scripted(engine, registry))


def test_token_counters_equal_what_clients_received(scripted: ScriptedRun) -> None:
    registry, outputs = scripted.registry, scripted.outputs
    generated = num_tokens(outputs)
    # prefix caching off and no preemption: every prompt position of every sequence is computed
    # once; request b's n=2 sequences each compute the prompt
    computed_prompt = sum(len(o.prompt_token_ids) * len(o.outputs) for o in outputs)
    assert sample(registry, "pagedserve_generation_tokens_total") == generated
    assert sample(registry, "pagedserve_prompt_tokens_total") == computed_prompt
    assert sample(registry, "pagedserve_num_preemptions_total") == 0
    assert sample(registry, "pagedserve_prefix_cache_queries_total") == 0
    assert sample(registry, "pagedserve_iteration_tokens_sum") == generated + computed_prompt
    # every generated token is one sequence's first (TTFT) or a later one (ITL)
    ttft = sample(registry, "pagedserve_time_to_first_token_seconds_count")
    itl = sample(registry, "pagedserve_inter_token_latency_seconds_count")
    assert ttft == scripted.num_sequences
    assert itl == generated - scripted.num_sequences


def test_requests_counted_by_finish_reason_and_failure_reason(scripted: ScriptedRun) -> None:
    registry, outputs = scripted.registry, scripted.outputs
    reasons = [{c.finish_reason for c in o.outputs} for o in outputs]
    assert reasons == [{"length"}, {"length"}, {"length"}, {"stop"}]
    assert sample(registry, "pagedserve_request_success_total", finish_reason="length") == 3
    assert sample(registry, "pagedserve_request_success_total", finish_reason="stop") == 1
    assert sample(registry, "pagedserve_request_failure_total", reason="validation") == 2
    for reason in ("abort", "error", "queue_full"):
        assert sample(registry, "pagedserve_request_failure_total", reason=reason) == 0
    # per-request histograms: one observation per successful user request (n=2 counts once)
    assert sample(registry, "pagedserve_request_prompt_tokens_count") == len(outputs)
    assert sample(registry, "pagedserve_request_prompt_tokens_sum") == sum(
        len(o.prompt_token_ids) for o in outputs)
    assert sample(registry, "pagedserve_request_generation_tokens_sum") == num_tokens(outputs)
    for name in ("e2e_request_latency", "request_queue_time", "request_prefill_time",
                 "request_decode_time"):
        assert sample(registry, f"pagedserve_{name}_seconds_count") == len(outputs)


def test_ttft_and_e2e_count_from_the_arrival_time(scripted: ScriptedRun) -> None:
    """Request a was handed to generate() with an arrival EARLY_ARRIVAL_S in the past, as the
    server does with the HTTP arrival time: its TTFT and e2e must include that wait."""
    registry = scripted.registry
    le = f"{EARLY_ARRIVAL_S:.1f}"
    assert EARLY_ARRIVAL_S in LATENCY_BUCKETS
    below = sample(registry, "pagedserve_time_to_first_token_seconds_bucket", le=le)
    assert below == scripted.num_sequences - 1
    e2e_below = sample(registry, "pagedserve_e2e_request_latency_seconds_bucket", le=le)
    assert e2e_below == len(scripted.outputs) - 1
    queue_below = sample(registry, "pagedserve_request_queue_time_seconds_bucket", le=le)
    assert queue_below == len(scripted.outputs) - 1


def test_gauges_return_to_idle_and_engine_info(scripted: ScriptedRun) -> None:
    registry = scripted.registry
    assert sample(registry, "pagedserve_num_requests_running") == 0
    assert sample(registry, "pagedserve_num_requests_waiting") == 0
    assert sample(registry, "pagedserve_kv_cache_usage_ratio") == 0.0
    info = {"block_size": "4", "num_blocks": str(scripted.engine.num_total_blocks),
            "dtype": "float32", "device": "cpu", "enable_prefix_caching": "false"}
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    [info_sample] = families[f"{INFO_FAMILY}_info"].samples
    assert info_sample.value == 1
    assert info.items() <= info_sample.labels.items()
    assert info_sample.labels["model_name"] == MODEL_NAME


def test_exposition_parses_with_help_for_every_family(scripted: ScriptedRun) -> None:
    text = generate_latest(scripted.registry).decode()
    families = list(text_string_to_metric_families(text))
    vllm_spec_families = {f"vllm:spec_decode_num_{name}" for name in (
        "drafts", "draft_tokens", "accepted_tokens", "accepted_tokens_per_pos")}
    assert {f.name for f in families} == (EXPECTED_FAMILIES | {f"{INFO_FAMILY}_info"}
                                          | EXPECTED_VLLM_FAMILIES | vllm_spec_families)
    # no "<name>_created" series (turned off, as vLLM does): they only grew the exposition
    assert not [s.name for f in families for s in f.samples if s.name.endswith("_created")]
    for family in families:
        assert family.documentation.strip(), f"{family.name} has no HELP"
        # vLLM's spec-decode series, and both namings' per-position ones, exist once a step
        # verified proposals
        assert family.samples or family.name in vllm_spec_families | {
            "pagedserve_spec_decode_num_accepted_tokens_per_pos"}, family.name
        for s in family.samples:
            if family.name == "vllm:cache_config_info":  # vLLM's has no model_name either
                assert s.labels["engine"] == "0" and "model_name" not in s.labels, s
                continue
            assert s.labels.get("model_name") == MODEL_NAME, s
            assert s.labels.get("engine") == ("0" if s.name.startswith("vllm:") else None), s
    # OpenMetrics, what /metrics serves to Prometheus (which asks for it), parses too, with
    # the same sample names: vLLM's keep their colons (prometheus_client alone would not)
    body, content_type = exposition(scripted.registry, "both", PROMETHEUS_ACCEPT)
    assert content_type.startswith("application/openmetrics-text")
    om_families = list(parse_om(body.decode()))
    assert {f.name for f in om_families} == ({f.name for f in families} - {
        f"{INFO_FAMILY}_info"} | {INFO_FAMILY})
    assert all(f.documentation.strip() for f in om_families)
    assert ({s.name for f in om_families for s in f.samples}
            == {s.name for f in families for s in f.samples})
    unescaped = parse_om(generate_openmetrics(scripted.registry).decode())
    assert "vllm:prompt_tokens_total" not in {s.name for f in unescaped for s in f.samples}


def test_each_choice_of_names_registers_only_its_families() -> None:
    for names in METRIC_NAMES:
        registry = CollectorRegistry()
        MetricsLogger(MODEL_NAME, registry=registry, names=names).record_step(
            StepStats(num_generation_tokens=2, inter_token_latencies=[0.01]))
        text = generate_latest(registry).decode()
        families = {f.name for f in text_string_to_metric_families(text)}
        ours = {name for name in families if name.startswith("pagedserve_")}
        theirs = {name for name in families if name.startswith("vllm:")}
        assert ours | theirs == families
        assert bool(ours) == (names != "vllm") and bool(theirs) == (names != "pagedserve")
        if theirs:
            assert sample(registry, "vllm:generation_tokens_total") == 2
        if ours:
            assert sample(registry, "pagedserve_generation_tokens_total") == 2


# ---- vLLM's names on the same run: vLLM's counting rules, buckets and labels -----------------

def test_vllm_counts_each_choice_and_each_prompt_once(scripted: ScriptedRun) -> None:
    """vLLM runs each of n choices as a request of its own and counts a prompt whole when its
    first token comes: request b (n=2) counts twice everywhere but request_params_n."""
    registry, outputs = scripted.registry, scripted.outputs
    choices = [(output, choice) for output in outputs for choice in output.outputs]
    generated = num_tokens(outputs)
    prompts = sum(len(output.prompt_token_ids) for output, _ in choices)
    assert sample(registry, "vllm:generation_tokens_total") == generated
    assert sample(registry, "vllm:prompt_tokens_total") == prompts
    assert sample(registry, "vllm:prompt_tokens_by_source_total",
                  source="local_compute") == prompts
    for source in ("local_cache_hit", "external_kv_transfer"):
        assert sample(registry, "vllm:prompt_tokens_by_source_total", source=source) == 0
    assert sample(registry, "vllm:prompt_tokens_cached_total") == 0
    assert sample(registry, "vllm:iteration_tokens_total_sum") == prompts + generated
    # the validation failures never reached the engine: vLLM does not count them
    expected = {"length": 4, "stop": 1, "abort": 0, "error": 0, "repetition": 0}
    for reason, count in expected.items():
        assert sample(registry, "vllm:request_success_total", finished_reason=reason) == count
    assert sample(registry, "vllm:time_to_first_token_seconds_count") == len(choices)
    assert sample(registry, "vllm:inter_token_latency_seconds_count") == generated - len(choices)
    for name in ("e2e_request_latency", "request_queue_time", "request_inference_time",
                 "request_prefill_time", "request_decode_time",
                 "request_time_per_output_token"):
        assert sample(registry, f"vllm:{name}_seconds_count") == len(choices)
    assert sample(registry, "vllm:request_prompt_tokens_sum") == prompts
    assert sample(registry, "vllm:request_prefill_kv_computed_tokens_sum") == prompts
    assert sample(registry, "vllm:request_generation_tokens_sum") == generated
    assert [output.max_tokens for output in outputs] == [8, 6, 5, 8]
    assert sample(registry, "vllm:request_params_max_tokens_sum") == 8 + 6 + 5 + 5 + 8
    assert sample(registry, "vllm:request_params_n_count") == len(outputs)
    assert sample(registry, "vllm:request_params_n_sum") == len(choices)
    assert sample(registry, "vllm:request_max_num_generation_tokens_sum") == sum(
        max(choice.num_tokens for choice in output.outputs) for output in outputs)


def test_vllm_request_time_per_output_token_leaves_the_first_token_out(
        scripted: ScriptedRun) -> None:
    expected = 0.0
    for output in scripted.outputs:
        timing = output.timing
        assert timing.first_token is not None and timing.last_token is not None
        for choice in output.outputs:
            expected += (timing.last_token - timing.first_token) / (choice.num_tokens - 1)
    assert sample(scripted.registry, "vllm:request_time_per_output_token_seconds_sum") == (
        pytest.approx(expected))


def test_vllm_ttft_and_e2e_count_from_the_arrival_time(scripted: ScriptedRun) -> None:
    registry = scripted.registry
    assert EARLY_ARRIVAL_S in TTFT_BUCKETS and EARLY_ARRIVAL_S in REQUEST_LATENCY_BUCKETS
    le = f"{EARLY_ARRIVAL_S:.1f}"
    assert sample(registry, "vllm:time_to_first_token_seconds_bucket", le=le) == (
        scripted.num_sequences - 1)
    assert sample(registry, "vllm:e2e_request_latency_seconds_bucket", le=le) == (
        scripted.num_sequences - 1)
    assert sample(registry, "vllm:request_queue_time_seconds_bucket", le=le) == (
        scripted.num_sequences - 1)


def test_vllm_buckets_are_vllms(scripted: ScriptedRun) -> None:
    registry, max_model_len = scripted.registry, scripted.engine.max_model_len
    assert one_two_five_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert one_two_five_buckets(252)[-3:] == (50, 100, 200)
    expected = {"vllm:time_to_first_token_seconds": TTFT_BUCKETS,
                "vllm:inter_token_latency_seconds": ITL_BUCKETS,
                "vllm:time_per_output_token_seconds": ITL_BUCKETS,
                "vllm:request_time_per_output_token_seconds": ITL_BUCKETS,
                "vllm:e2e_request_latency_seconds": REQUEST_LATENCY_BUCKETS,
                "vllm:request_decode_time_seconds": REQUEST_LATENCY_BUCKETS,
                "vllm:request_prompt_tokens": one_two_five_buckets(max_model_len),
                "vllm:request_params_n": (1, 2, 5, 10, 20),
                "vllm:iteration_tokens_total": (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048,
                                                4096, 8192, 16384)}
    for histogram, buckets in expected.items():
        assert bucket_bounds(registry, histogram) == list(buckets), histogram


def test_vllm_renamed_names_repeat_the_current_ones(scripted: ScriptedRun) -> None:
    """The names vLLM's older dashboard queries are the same series under the old name."""
    registry = scripted.registry
    for suffix in ("_count", "_sum"):
        assert sample(registry, f"vllm:time_per_output_token_seconds{suffix}") == sample(
            registry, f"vllm:inter_token_latency_seconds{suffix}")
    assert sample(registry, "vllm:gpu_cache_usage_perc") == sample(
        registry, "vllm:kv_cache_usage_perc")


def test_vllm_gauges_return_to_idle_and_cache_config_info(scripted: ScriptedRun) -> None:
    registry = scripted.registry
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert sample(registry, f"vllm:{name}") == 0
    for state, value in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
        assert sample(registry, "vllm:engine_sleep_state", sleep_state=state) == value
    assert registry.get_sample_value("vllm:cache_config_info", {
        "block_size": "4", "cache_dtype": "auto", "enable_prefix_caching": "False",
        "gpu_memory_utilization": "0.9", "prefix_caching_hash_algo": "sha256",
        "num_gpu_blocks": str(scripted.engine.num_total_blocks), "engine": "0"}) == 1


# ---- preemption, prefix caching, aborts and rejections ----------------------------------------

def test_preemptions_counted_with_a_tiny_kv_pool(loaded: LoadedModel,
                                                 engine_runner: asyncio.Runner) -> None:
    registry = CollectorRegistry()
    # 4 sequences x 20 tokens need 20 blocks of 4 at the end; 9 usable force preemptions
    engine = make_engine(loaded, registry, enable_prefix_caching=False, num_blocks=10,
                         block_size=4)
    rng = random.Random(1)
    prompts = [prompt(rng, 8) for _ in range(4)]

    async def run() -> list[RequestOutput]:
        await engine.start()
        try:
            outputs = await asyncio.gather(*(final_output(engine, f"r{i}", p, fixed_length(12))
                                             for i, p in enumerate(prompts)))
            await wait_idle(engine, registry)
            return outputs
        finally:
            await engine.shutdown()

    outputs = engine_runner.run(run())
    num_preemptions = engine.llm_engine.core.scheduler.num_preemptions
    assert num_preemptions > 0
    assert sample(registry, "pagedserve_num_preemptions_total") == num_preemptions
    assert sample(registry, "pagedserve_generation_tokens_total") == num_tokens(outputs) == 48
    # a preempted sequence recomputes its whole prompt (its prefill finished in one step)
    assert sample(registry, "pagedserve_prompt_tokens_total") == 8 * (4 + num_preemptions)
    assert sample(registry, "pagedserve_request_success_total", finish_reason="length") == 4
    assert sample(registry, "pagedserve_inter_token_latency_seconds_count") == 48 - 4
    assert sample(registry, "pagedserve_kv_cache_usage_ratio") == 0.0
    # vLLM counts a prompt once, when its first token comes, however often it is recomputed
    assert sample(registry, "vllm:num_preemptions_total") == num_preemptions
    assert sample(registry, "vllm:prompt_tokens_total") == 8 * 4
    assert sample(registry, "vllm:generation_tokens_total") == 48


def test_prefix_cache_hits_count_shared_full_blocks(loaded: LoadedModel,
                                                    engine_runner: asyncio.Runner) -> None:
    registry = CollectorRegistry()
    block_size = 4
    engine = make_engine(loaded, registry, num_blocks=64, block_size=block_size)
    rng = random.Random(2)
    first = prompt(rng, 14)
    second = first[:10] + prompt(rng, 5)
    # brute force: the longest common prefix in whole blocks, capped to leave one token to run
    common = next(i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y)
    expected_hits = min(common // block_size, (len(second) - 1) // block_size) * block_size

    async def run() -> list[RequestOutput]:
        await engine.start()
        try:
            outputs = [await final_output(engine, "first", first, fixed_length(3)),
                       await final_output(engine, "second", second, fixed_length(3))]
            await wait_idle(engine, registry)
            return outputs
        finally:
            await engine.shutdown()

    outputs = engine_runner.run(run())
    assert expected_hits == 8
    assert outputs[1].num_cached_tokens == expected_hits
    assert sample(registry, "pagedserve_prefix_cache_hits_total") == expected_hits
    assert sample(registry, "pagedserve_prefix_cache_queries_total") == len(first) + len(second)
    assert sample(registry, "pagedserve_prompt_tokens_total") == (
        len(first) + len(second) - expected_hits)
    # vLLM's prompt tokens count the cache hits too, and say how many there were
    assert sample(registry, "vllm:prompt_tokens_total") == len(first) + len(second)
    assert sample(registry, "vllm:prompt_tokens_cached_total") == expected_hits
    assert sample(registry, "vllm:prompt_tokens_by_source_total",
                  source="local_cache_hit") == expected_hits
    assert sample(registry, "vllm:prompt_tokens_by_source_total", source="local_compute") == (
        len(first) + len(second) - expected_hits)
    assert sample(registry, "vllm:prefix_cache_hits_total") == expected_hits
    assert sample(registry, "vllm:prefix_cache_queries_total") == len(first) + len(second)
    assert sample(registry, "vllm:request_prefill_kv_computed_tokens_sum") == (
        len(first) + len(second) - expected_hits)


def test_abort_and_queue_full_are_failures(loaded: LoadedModel, engine_runner: asyncio.Runner,
                                           caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    engine = make_engine(loaded, registry, num_blocks=64, block_size=4)
    rng = random.Random(3)

    async def run() -> None:
        await engine.start()
        try:
            stream = engine.generate("dropped", prompt(rng, 6), fixed_length(200))
            assert isinstance(stream, AsyncGenerator)
            await stream.__anext__()
            await stream.aclose()  # as a disconnecting client does: aborts in the engine
            await wait_idle(engine, registry)
        finally:
            await engine.shutdown()

    with caplog.at_level(logging.INFO, logger="engine.metrics"):
        engine_runner.run(run())
    assert sample(registry, "pagedserve_request_failure_total", reason="abort") == 1
    assert sample(registry, "pagedserve_request_success_total", finish_reason="length") == 0
    [line] = [r for r in caplog.records if "finished request" in r.getMessage()]
    assert getattr(line, "request_id", None) == "dropped"
    assert "finish_reason=abort" in line.getMessage()
    assert sample(registry, "pagedserve_e2e_request_latency_seconds_count") == 0
    # vLLM counts every finished request by its finish reason, an abort too
    assert sample(registry, "vllm:request_success_total", finished_reason="abort") == 1
    assert sample(registry, "vllm:request_success_total", finished_reason="length") == 0
    assert sample(registry, "vllm:e2e_request_latency_seconds_count") == 1

    full_registry = CollectorRegistry()
    full = make_engine(loaded, full_registry, num_blocks=8, block_size=4, max_queue_len=0)
    with pytest.raises(QueueFullError):
        engine_runner.run(final_output(full, "refused", prompt(rng, 4), fixed_length(2)))
    assert sample(full_registry, "pagedserve_request_failure_total", reason="queue_full") == 1
    # refused before the engine core: vLLM counts nothing
    assert sum(sample(full_registry, "vllm:request_success_total", finished_reason=reason)
               for reason in ("stop", "length", "abort", "error", "repetition")) == 0


def test_engine_errors_and_server_validation_count_as_failures(loaded: LoadedModel) -> None:
    """fail_request's outputs (finish reason "error") and the server's own rejections."""
    config = EngineConfig.from_kwargs(model=str(loaded.model_dir), dtype="float32",
                                      device="cpu", num_blocks=16, block_size=4)
    engine = LLMEngine(config, loaded)
    registry = CollectorRegistry()
    metrics = MetricsLogger(MODEL_NAME, registry=registry)
    engine.add_request("doomed", [5, 6, 7], fixed_length(10))
    outputs = engine.step()
    metrics.record_step(engine.last_step_stats, outputs)
    metrics.record_finished(engine.fail_request("doomed", "the sampler broke"))
    metrics.record_validation_failure()
    assert sample(registry, "pagedserve_request_failure_total", reason="error") == 1
    assert sample(registry, "pagedserve_request_failure_total", reason="validation") == 1
    assert sample(registry, "pagedserve_request_success_total", finish_reason="stop") == 0


# ---- buckets, shared registries, log lines ------------------------------------------------------

def test_latency_buckets_separate_gpu_and_cpu_steps() -> None:
    registry = CollectorRegistry()
    metrics = MetricsLogger(MODEL_NAME, registry=registry)
    metrics.record_step(StepStats(inter_token_latencies=[0.005, 0.2]))
    bucket = "pagedserve_inter_token_latency_seconds_bucket"
    lowest_with_one = min(b for b in LATENCY_BUCKETS if b >= 0.005)
    assert sample(registry, bucket, le=str(lowest_with_one)) == 1
    assert sample(registry, bucket, le="0.15") == 1  # 200 ms is not in 5 ms's bucket
    assert sample(registry, bucket, le="0.2") == 2
    assert LATENCY_BUCKETS[0] == 0.001 and LATENCY_BUCKETS[-1] >= 600
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    assert all(b == 2 ** k for k, b in enumerate(TOKEN_BUCKETS))


def test_loggers_share_a_registry_with_separate_series() -> None:
    registry = CollectorRegistry()
    first, second = (MetricsLogger(name, registry=registry) for name in ("m1", "m2"))
    first.record_step(StepStats(num_generation_tokens=3))
    second.record_step(StepStats(num_generation_tokens=5))
    again = MetricsLogger("m1", registry=registry)  # a reloaded engine keeps counting
    again.record_step(StepStats(num_generation_tokens=1))
    name = "pagedserve_generation_tokens_total"
    assert registry.get_sample_value(name, {"model_name": "m1"}) == 4
    assert registry.get_sample_value(name, {"model_name": "m2"}) == 5


@dataclass(slots=True)
class FakeClock:
    """A monotonic clock the test moves by hand: the log interval without sleeping."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_periodic_engine_line_only_when_due(caplog: pytest.LogCaptureFixture) -> None:
    busy = StepStats(num_prompt_tokens=100, num_generation_tokens=10, num_running=2,
                     num_waiting=1, kv_cache_usage=0.25, prefix_cache_queries=120,
                     prefix_cache_hits=30)
    clock = FakeClock()
    metrics = MetricsLogger(MODEL_NAME, registry=CollectorRegistry(), clock=clock)
    with caplog.at_level(logging.INFO, logger="engine.metrics"):
        clock.advance(4.5)
        metrics.record_step(busy)
        assert not caplog.records  # 4.5 s of the 5 s interval
        clock.advance(0.5)
        metrics.record_step(busy)  # due: two steps' tokens over exactly 5 s
        clock.advance(1.0)
        metrics.record_step(busy)  # the next interval has only begun
    [record] = caplog.records
    message = record.getMessage()
    assert "prompt 40.0 tokens/s, generation 4.0 tokens/s" in message
    assert "running 2, waiting 1, KV cache 25.0%, prefix-cache hit rate 25.0%" in message
    assert getattr(record, "prefix_cache_hit_rate", None) == 0.25
    assert getattr(record, "generation_tokens_per_s", None) == 4.0


def test_idle_restarts_the_log_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    metrics = MetricsLogger(MODEL_NAME, registry=CollectorRegistry(), log_interval_s=2.0,
                            clock=clock)
    clock.advance(3.0)  # idle for longer than the interval
    with caplog.at_level(logging.INFO, logger="engine.metrics"):
        metrics.record_idle(0.0)  # the quiet 3 s must not count as an interval
        metrics.record_step(StepStats(num_generation_tokens=4, num_running=1))
        assert not caplog.records
        clock.advance(2.0)
        metrics.record_step(StepStats(num_generation_tokens=4, num_running=1))
    [record] = caplog.records
    # 8 tokens over the 2 busy seconds, not over the 5 since the logger was made
    assert "generation 4.0 tokens/s, running 1, waiting 0" in record.getMessage()


def test_json_log_lines_carry_the_request_fields() -> None:
    stream = io.StringIO()
    handler = build_handler("json", stream=stream)
    log = logging.getLogger("engine.metrics")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        output = _finished_output()
        MetricsLogger(MODEL_NAME, registry=CollectorRegistry()).record_finished([output])
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("engine loop died")
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    finished, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert finished["level"] == "INFO" and finished["logger"] == "engine.metrics"
    assert finished["request_id"] == "req-7" and finished["prompt_tokens"] == 3
    assert finished["output_tokens"] == 2 and finished["finish_reason"] == "length"
    assert finished["cached_tokens"] == 0 and finished["ttft_s"] == pytest.approx(0.25)
    assert finished["e2e_s"] == pytest.approx(1.0)
    assert finished["time"].endswith("+00:00")
    assert failed["request_id"] == "-" and "RuntimeError: boom" in failed["exception"]
    with pytest.raises(ValueError, match="log format"):
        build_handler("xml")


def _finished_output() -> RequestOutput:
    from engine.outputs import CompletionOutput, RequestTiming

    timing = RequestTiming(arrival=10.0, first_scheduled=10.1, first_token=10.25,
                           last_token=10.9, finished=11.0)
    return RequestOutput(request_id="req-7", prompt_token_ids=[1, 2, 3], finished=True,
                         outputs=[CompletionOutput(index=0, token_ids=[4, 5], num_tokens=2,
                                                   finish_reason="length")], timing=timing)

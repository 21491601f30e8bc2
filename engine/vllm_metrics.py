"""vLLM's metric names (`vllm:*`), labels (model_name, engine), buckets and counting rules over
the engine's StepStats and RequestOutputs, so dashboards and alerts written for vLLM read
pagedserve unchanged. The names and rules follow vllm/v1/metrics/loggers.py and stats.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric

if TYPE_CHECKING:
    from engine.core import StepStats
    from engine.outputs import CompletionOutput, RequestOutput, RequestTiming
    from engine.spec_decode.proposer import SpecDecodeStats

PREFIX = "vllm:"
ENGINE_INDEX = "0"  # vLLM labels every series with its data-parallel engine; there is one here
LABELS = ["model_name", "engine"]
# vLLM's own bucket bounds, so a quantile interpolates between the same bounds as on vLLM
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS: tuple[float, ...] = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
PROMPT_TOKEN_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
# the CacheConfig fields vLLM's cache_config_info carries that have a meaning here
CACHE_CONFIG_LABELS = ("block_size", "cache_dtype", "enable_prefix_caching",
                       "gpu_memory_utilization", "num_gpu_blocks", "prefix_caching_hash_algo",
                       "engine")


def one_two_five_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: vLLM's buckets for token counts, which it
    sizes to the context length."""
    buckets: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(float(mantissa * scale))
        scale *= 10


@dataclass(slots=True)
class VllmGauges:
    num_running: Gauge
    num_waiting: Gauge
    kv_cache_usage: Gauge
    sleep_state: Gauge
    cache_config: Gauge


@dataclass(slots=True)
class VllmCounters:
    prompt_tokens: Counter
    prompt_tokens_by_source: Counter
    prompt_tokens_cached: Counter
    generation_tokens: Counter
    request_success: Counter
    preemptions: Counter
    prefix_cache_queries: Counter
    prefix_cache_hits: Counter
    spec_decode_drafts: Counter
    spec_decode_draft_tokens: Counter
    spec_decode_accepted_tokens: Counter
    spec_decode_accepted_per_position: Counter


@dataclass(slots=True)
class VllmHistograms:
    ttft: Histogram
    itl: Histogram
    request_time_per_output_token: Histogram
    e2e: Histogram
    queue_time: Histogram
    inference_time: Histogram
    prefill_time: Histogram
    decode_time: Histogram
    request_prompt_tokens: Histogram
    request_generation_tokens: Histogram
    request_prefill_kv_computed: Histogram
    request_max_generation_tokens: Histogram
    request_params_n: Histogram
    request_params_max_tokens: Histogram
    iteration_tokens: Histogram


@dataclass(slots=True)
class VllmFamilies:
    """vLLM's metric families in one registry; each VllmRecorder binds its model's children."""

    gauges: VllmGauges
    counters: VllmCounters
    histograms: VllmHistograms


def create_families(registry: CollectorRegistry, max_model_len: int) -> VllmFamilies:
    """Register vLLM's families; token-count buckets follow `max_model_len`, as vLLM's do.
    The former names of two of them, which vLLM's older dashboard queries, are the same
    families again, copied at scrape time: they cost nothing per step."""
    families = VllmFamilies(_gauges(registry), _counters(registry),
                            _histograms(registry, one_two_five_buckets(max_model_len)))
    registry.register(RenamedFamily(
        families.histograms.itl, PREFIX + "time_per_output_token_seconds",
        "Histogram of time per output token in seconds. DEPRECATED in vLLM 0.11: the same "
        "as vllm:inter_token_latency_seconds."))
    registry.register(RenamedFamily(
        families.gauges.kv_cache_usage, PREFIX + "gpu_cache_usage_perc",
        "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED in vLLM 0.10: the same as "
        "vllm:kv_cache_usage_perc."))
    return families


class RenamedFamily:
    """A collector exporting another family's samples under another name."""

    def __init__(self, source: Gauge | Histogram, name: str, documentation: str) -> None:
        self.source = source
        self.name = name
        self.documentation = documentation

    def describe(self) -> list[Metric]:
        """The name it exports, so the registry refuses a second family of that name."""
        kind = "histogram" if isinstance(self.source, Histogram) else "gauge"
        return [Metric(self.name, self.documentation, kind)]

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            renamed = Metric(self.name, self.documentation, family.type)
            for sample in family.samples:  # "<name>_bucket" -> "<new name>_bucket", ...
                renamed.add_sample(self.name + sample.name.removeprefix(family.name),
                                   sample.labels, sample.value, sample.timestamp,
                                   sample.exemplar)
            yield renamed


def _gauges(registry: CollectorRegistry) -> VllmGauges:
    def gauge(name: str, documentation: str, extra: Sequence[str] = ()) -> Gauge:
        return Gauge(PREFIX + name, documentation, [*LABELS, *extra], registry=registry)

    return VllmGauges(
        num_running=gauge("num_requests_running", "Number of requests in model execution "
                          "batches (sequences: a request with n > 1 counts n)."),
        num_waiting=gauge("num_requests_waiting", "Number of requests waiting to be "
                          "processed (sequences, new or preempted)."),
        kv_cache_usage=gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent "
                             "usage."),
        sleep_state=gauge("engine_sleep_state", "Engine sleep state: awake = 1 (pagedserve "
                          "never sleeps).", ["sleep_state"]),
        cache_config=Gauge(PREFIX + "cache_config_info", "Information of the KV cache "
                           "configuration (vLLM's CacheConfig fields that apply).",
                           list(CACHE_CONFIG_LABELS), registry=registry))


def _counters(registry: CollectorRegistry) -> VllmCounters:
    def counter(name: str, documentation: str, extra: Sequence[str] = ()) -> Counter:
        return Counter(PREFIX + name, documentation, [*LABELS, *extra], registry=registry)

    return VllmCounters(
        prompt_tokens=counter("prompt_tokens", "Number of prefill tokens processed: each "
                              "sequence's whole prompt once, when its first token comes, "
                              "cache hits included."),
        prompt_tokens_by_source=counter("prompt_tokens_by_source", "Number of prompt tokens "
                                        "by source.", ["source"]),
        prompt_tokens_cached=counter("prompt_tokens_cached", "Number of cached prompt tokens "
                                     "(local + external)."),
        generation_tokens=counter("generation_tokens", "Number of generation tokens "
                                  "processed."),
        request_success=counter("request_success", "Count of finished requests (sequences) by "
                                "finish reason.", ["finished_reason"]),
        preemptions=counter("num_preemptions", "Cumulative number of preemption from the "
                            "engine."),
        prefix_cache_queries=counter("prefix_cache_queries", "Prefix cache queries, in terms of "
                                     "number of queried tokens."),
        prefix_cache_hits=counter("prefix_cache_hits", "Prefix cache hits, in terms of number "
                                  "of cached tokens."),
        spec_decode_drafts=counter("spec_decode_num_drafts", "Number of spec decoding drafts."),
        spec_decode_draft_tokens=counter("spec_decode_num_draft_tokens", "Number of draft "
                                         "tokens."),
        spec_decode_accepted_tokens=counter("spec_decode_num_accepted_tokens", "Number of "
                                            "accepted tokens."),
        spec_decode_accepted_per_position=counter(
            "spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft position.",
            ["position"]))


def _histograms(registry: CollectorRegistry, token_buckets: Sequence[float]) -> VllmHistograms:
    def histogram(name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(PREFIX + name, documentation, LABELS, buckets=buckets,
                         registry=registry)

    latency = REQUEST_LATENCY_BUCKETS
    return VllmHistograms(
        ttft=histogram("time_to_first_token_seconds", "Histogram of time to first token in "
                       "seconds.", TTFT_BUCKETS),
        itl=histogram("inter_token_latency_seconds", "Histogram of inter-token latency in "
                      "seconds.", ITL_BUCKETS),
        request_time_per_output_token=histogram(
            "request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds "
            "per request.", ITL_BUCKETS),
        e2e=histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in "
                      "seconds.", latency),
        queue_time=histogram("request_queue_time_seconds", "Histogram of time spent in WAITING "
                             "phase for request.", latency),
        inference_time=histogram("request_inference_time_seconds", "Histogram of time spent in "
                                 "RUNNING phase for request.", latency),
        prefill_time=histogram("request_prefill_time_seconds", "Histogram of time spent in "
                               "PREFILL phase for request.", latency),
        decode_time=histogram("request_decode_time_seconds", "Histogram of time spent in DECODE "
                              "phase for request.", latency),
        request_prompt_tokens=histogram("request_prompt_tokens", "Number of prefill tokens "
                                        "processed.", token_buckets),
        request_generation_tokens=histogram("request_generation_tokens", "Number of generation "
                                            "tokens processed.", token_buckets),
        request_prefill_kv_computed=histogram(
            "request_prefill_kv_computed_tokens", "Histogram of new KV tokens computed during "
            "prefill (excluding cached tokens).", token_buckets),
        request_max_generation_tokens=histogram(
            "request_max_num_generation_tokens", "Histogram of maximum number of requested "
            "generation tokens.", token_buckets),
        request_params_n=histogram("request_params_n", "Histogram of the n request parameter.",
                                   N_BUCKETS),
        request_params_max_tokens=histogram("request_params_max_tokens", "Histogram of the "
                                            "max_tokens request parameter.", token_buckets),
        iteration_tokens=histogram("iteration_tokens_total", "Histogram of number of tokens per "
                                   "engine_step.", ITERATION_TOKEN_BUCKETS))


class VllmRecorder:
    """One engine's stats under vLLM's names, labelled model_name and engine="0"."""

    def __init__(self, families: VllmFamilies, model_name: str) -> None:
        self.families = families
        self.labels = (model_name, ENGINE_INDEX)
        self._touch_children()

    def _touch_children(self) -> None:
        """Every series exists (at 0) from the first scrape, as vLLM binds them at start."""
        gauges, counters = self.families.gauges, self.families.counters
        for reason in FINISH_REASONS:
            counters.request_success.labels(*self.labels, reason)
        for source in PROMPT_TOKEN_SOURCES:
            counters.prompt_tokens_by_source.labels(*self.labels, source)
        for state in SLEEP_STATES:
            gauges.sleep_state.labels(*self.labels, state).set(1.0 if state == "awake" else 0.0)
        for family in (gauges.num_running, gauges.num_waiting, gauges.kv_cache_usage,
                       counters.prompt_tokens,
                       counters.prompt_tokens_cached, counters.generation_tokens,
                       counters.preemptions, counters.prefix_cache_queries,
                       counters.prefix_cache_hits, *_fields(self.families.histograms)):
            family.labels(*self.labels)

    def record_engine_info(self, info: Mapping[str, str]) -> None:
        """vllm:cache_config_info from engine_config_info()'s labels, spelled as vLLM's
        (Python's str() of each value); like vLLM's, it has no model_name label."""
        self.families.gauges.cache_config.labels(
            block_size=info["block_size"], cache_dtype="auto",
            enable_prefix_caching=str(info["enable_prefix_caching"] == "true"),
            gpu_memory_utilization=info["gpu_memory_utilization"],
            num_gpu_blocks=info["num_blocks"],
            prefix_caching_hash_algo=info["prefix_caching_hash_algo"],
            engine=ENGINE_INDEX).set(1)

    def record_step(self, stats: StepStats) -> None:
        counters, labels = self.families.counters, self.labels
        num_prompt = stats.num_prefilled_prompt_tokens
        num_cached = stats.num_prefilled_cached_tokens
        counters.prompt_tokens.labels(*labels).inc(num_prompt)
        counters.prompt_tokens_by_source.labels(*labels, "local_compute").inc(
            num_prompt - num_cached)
        counters.prompt_tokens_by_source.labels(*labels, "local_cache_hit").inc(num_cached)
        counters.prompt_tokens_cached.labels(*labels).inc(num_cached)
        counters.generation_tokens.labels(*labels).inc(stats.num_generation_tokens)
        counters.preemptions.labels(*labels).inc(stats.num_preemptions)
        counters.prefix_cache_queries.labels(*labels).inc(stats.prefix_cache_queries)
        counters.prefix_cache_hits.labels(*labels).inc(stats.prefix_cache_hits)
        self._observe_step_latencies(stats)
        if stats.spec is not None:
            self._record_spec_decode(stats.spec)
        self.set_load(stats.num_running, stats.num_waiting, stats.kv_cache_usage)

    def _observe_step_latencies(self, stats: StepStats) -> None:
        histograms, labels = self.families.histograms, self.labels
        # vLLM's tokens per step: the prompts completed this step (see num_prompt_tokens
        # above), not the prefill chunks computed, plus the tokens sampled
        num_step_tokens = stats.num_prefilled_prompt_tokens + stats.num_generation_tokens
        if num_step_tokens:
            histograms.iteration_tokens.labels(*labels).observe(num_step_tokens)
        observe_all(histograms.ttft.labels(*labels), stats.time_to_first_tokens)
        observe_all(histograms.itl.labels(*labels), stats.inter_token_latencies)

    def _record_spec_decode(self, spec: SpecDecodeStats) -> None:
        counters, labels = self.families.counters, self.labels
        counters.spec_decode_drafts.labels(*labels).inc(spec.num_drafts)
        counters.spec_decode_draft_tokens.labels(*labels).inc(spec.num_draft_tokens)
        counters.spec_decode_accepted_tokens.labels(*labels).inc(spec.num_accepted_tokens)
        for position, count in enumerate(spec.accepted_per_position):
            counters.spec_decode_accepted_per_position.labels(*labels, str(position)).inc(count)

    def set_load(self, num_running: int, num_waiting: int, kv_cache_usage: float) -> None:
        gauges, labels = self.families.gauges, self.labels
        gauges.num_running.labels(*labels).set(num_running)
        gauges.num_waiting.labels(*labels).set(num_waiting)
        gauges.kv_cache_usage.labels(*labels).set(kv_cache_usage)

    def record_finished(self, output: RequestOutput) -> None:
        """A finished user request. vLLM runs each of n choices as its own request, so each
        choice counts once, by its own finish reason, aborts and errors included; the
        timestamps are the user request's (min first token, max last token over choices)."""
        for choice in output.outputs:
            self._record_finished_choice(output, choice)
        histograms, labels = self.families.histograms, self.labels
        histograms.request_params_n.labels(*labels).observe(len(output.outputs))
        histograms.request_max_generation_tokens.labels(*labels).observe(
            max((choice.num_tokens for choice in output.outputs), default=0))

    def _record_finished_choice(self, output: RequestOutput, choice: CompletionOutput) -> None:
        histograms, labels = self.families.histograms, self.labels
        reason = choice.finish_reason or "abort"
        self.families.counters.request_success.labels(*labels, reason).inc()
        spans = _spans(output.timing)
        for family, seconds in zip((histograms.e2e, histograms.queue_time,
                                    histograms.inference_time, histograms.prefill_time,
                                    histograms.decode_time), spans, strict=True):
            if seconds is not None:
                family.labels(*labels).observe(seconds)
        decode_time = spans[-1] or 0.0
        # vLLM's per-request TPOT leaves the first token out, and is 0 with one token
        histograms.request_time_per_output_token.labels(*labels).observe(
            decode_time / (choice.num_tokens - 1) if choice.num_tokens > 1 else 0.0)
        num_prompt_tokens = len(output.prompt_token_ids)
        histograms.request_prompt_tokens.labels(*labels).observe(num_prompt_tokens)
        histograms.request_generation_tokens.labels(*labels).observe(choice.num_tokens)
        histograms.request_prefill_kv_computed.labels(*labels).observe(
            num_prompt_tokens - output.num_cached_tokens)
        if output.max_tokens:
            histograms.request_params_max_tokens.labels(*labels).observe(output.max_tokens)


def _spans(timing: RequestTiming) -> tuple[float | None, ...]:
    """(e2e, queue, inference, prefill, decode) in seconds, None where a milestone was never
    reached (a request aborted while it waited has no prefill). Queue time counts from the
    HTTP arrival: vLLM's from the engine core's queue, after tokenization."""
    return (span(timing.arrival, timing.finished),
            span(timing.arrival, timing.first_scheduled),
            span(timing.first_scheduled, timing.last_token),
            span(timing.first_scheduled, timing.first_token),
            span(timing.first_token, timing.last_token))


def span(start: float | None, end: float | None) -> float | None:
    """Seconds from start to end (never negative), None where either was never reached."""
    return None if start is None or end is None else max(end - start, 0.0)


def observe_all(histogram: Histogram, values: Iterable[float]) -> None:
    """One observation per value (a step's TTFTs or inter-token latencies)."""
    for value in values:
        histogram.observe(value)


def _fields(histograms: VllmHistograms) -> list[Histogram]:
    return [getattr(histograms, field.name) for field in dataclasses.fields(histograms)]

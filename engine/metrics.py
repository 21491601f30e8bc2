"""Observability: every Prometheus object, fed with StepStats once per step and with finished
RequestOutputs once per request, under pagedserve's names, vLLM's (engine/vllm_metrics.py) or
both; plus the periodic engine log line and the per-request log line."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from engine.vllm_metrics import VllmRecorder, observe_all, span
from engine.vllm_metrics import create_families as create_vllm_families

if TYPE_CHECKING:
    from engine.core import StepStats
    from engine.llm_engine import LLMEngine
    from engine.outputs import RequestOutput
    from engine.spec_decode.proposer import SpecDecodeStats

logger = logging.getLogger(__name__)

# Every counter and histogram child would also export a "<name>_created" sample (its start
# time), which doubles the exposition and the series Prometheus stores, for a value no
# dashboard reads; vLLM turns them off as well. Process-wide, like the registry itself.
disable_created_metrics()

PREFIX = "pagedserve_"
# whose names /metrics exports: pagedserve's (pagedserve_*), vLLM's (vllm:*), or both
MetricNames = Literal["pagedserve", "vllm", "both"]
METRIC_NAMES: tuple[MetricNames, ...] = ("pagedserve", "vllm", "both")
DEFAULT_METRIC_NAMES: MetricNames = "pagedserve"
DEFAULT_MAX_MODEL_LEN = 131072  # sizes vLLM's token-count buckets when the caller gives none
# 1 ms to ~10 min: fine enough that a 5 ms GPU step and a 200 ms CPU step fall in different
# buckets, long enough for a minutes-long generation (e2e) or a deep queue
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_BUCKETS: tuple[float, ...] = tuple(float(2**k) for k in range(18))  # 1 .. 131072
LOG_INTERVAL_S = 5.0
SUCCESS_REASONS = ("stop", "length")
FAILURE_REASONS = ("abort", "error", "validation", "queue_full")


@dataclass(slots=True)
class _Families:
    """pagedserve's metric families in one registry; each _PagedserveRecorder binds its
    model_name children."""

    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue_time: Histogram
    prefill_time: Histogram
    decode_time: Histogram
    request_prompt_tokens: Histogram
    request_generation_tokens: Histogram
    iteration_tokens: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    request_success: Counter
    request_failure: Counter
    preemptions: Counter
    prefix_cache_queries: Counter
    prefix_cache_hits: Counter
    spec_decode_drafts: Counter
    spec_decode_draft_tokens: Counter
    spec_decode_accepted_tokens: Counter
    spec_decode_accepted_per_position: Counter
    num_running: Gauge
    num_waiting: Gauge
    kv_cache_usage: Gauge
    engine_config: Info


# A registry refuses a second family of the same name, yet a process may build several engines
# (tests, a reload): each registry's families of each naming are created once and shared by
# every logger, which only adds its own model_name children. Weak keys: a dropped registry
# frees its families.
_families_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, object]] = (
    weakref.WeakKeyDictionary())
_families_lock = threading.Lock()
_F = TypeVar("_F")


def _families_for(registry: CollectorRegistry, naming: str,
                  create: Callable[[CollectorRegistry], _F]) -> _F:
    """The registry's families of one naming; the first caller creates them (so the first
    engine's max_model_len sizes vLLM's token buckets for the whole registry)."""
    with _families_lock:
        by_naming = _families_by_registry.setdefault(registry, {})
        if naming not in by_naming:
            by_naming[naming] = create(registry)
        families: _F = by_naming[naming]  # type: ignore[assignment]
        return families


def _histogram(registry: CollectorRegistry, name: str, documentation: str,
               buckets: Sequence[float]) -> Histogram:
    return Histogram(PREFIX + name, documentation, ["model_name"], buckets=buckets,
                     registry=registry)


def _create_families(registry: CollectorRegistry) -> _Families:
    latency, tokens = LATENCY_BUCKETS, TOKEN_BUCKETS
    labels = ["model_name"]
    return _Families(
        ttft=_histogram(registry, "time_to_first_token_seconds", "Time from the HTTP request's "
                        "arrival to each sequence's first generated token.", latency),
        itl=_histogram(registry, "inter_token_latency_seconds", "Time between two consecutive "
                       "generated tokens of one sequence.", latency),
        e2e=_histogram(registry, "e2e_request_latency_seconds", "Successful requests' time "
                       "from HTTP arrival to finish.", latency),
        queue_time=_histogram(registry, "request_queue_time_seconds", "Successful requests' "
                              "time from arrival to first being scheduled.", latency),
        prefill_time=_histogram(registry, "request_prefill_time_seconds", "Successful "
                                "requests' time from first scheduled to first token.", latency),
        decode_time=_histogram(registry, "request_decode_time_seconds", "Successful requests' "
                               "time from first token to last token.", latency),
        request_prompt_tokens=_histogram(registry, "request_prompt_tokens", "Prompt length of "
                                         "successful requests, in tokens.", tokens),
        request_generation_tokens=_histogram(
            registry, "request_generation_tokens", "Tokens generated by successful requests "
            "(all n choices together).", tokens),
        iteration_tokens=_histogram(registry, "iteration_tokens", "Tokens per engine step: "
                                    "prefill tokens computed plus tokens sampled.", tokens),
        prompt_tokens=Counter(PREFIX + "prompt_tokens", "Prompt (prefill) tokens computed; "
                              "prefix-cache hits are not computed and not counted.", labels,
                              registry=registry),
        generation_tokens=Counter(PREFIX + "generation_tokens", "Tokens generated.", labels,
                                  registry=registry),
        request_success=Counter(PREFIX + "request_success", "Requests finished normally, by "
                                "finish reason (length when any of n choices hit a limit).",
                                labels + ["finish_reason"], registry=registry),
        request_failure=Counter(PREFIX + "request_failure", "Requests that did not finish "
                                "normally, by reason: abort, error, validation, queue_full.",
                                labels + ["reason"], registry=registry),
        preemptions=Counter(PREFIX + "num_preemptions", "Sequences preempted (KV blocks freed, "
                            "recomputed later) because the KV cache was full.", labels,
                            registry=registry),
        prefix_cache_queries=Counter(PREFIX + "prefix_cache_queries", "Tokens looked up in "
                                     "the prefix cache.", labels, registry=registry),
        prefix_cache_hits=Counter(PREFIX + "prefix_cache_hits", "Tokens found in the prefix "
                                  "cache (their KV was reused, not computed).", labels,
                                  registry=registry),
        spec_decode_drafts=Counter(PREFIX + "spec_decode_num_drafts", "Speculative decoding: "
                                   "verifications of a sequence's proposals.", labels,
                                   registry=registry),
        spec_decode_draft_tokens=Counter(PREFIX + "spec_decode_num_draft_tokens", "Speculative "
                                         "decoding: tokens proposed and verified.", labels,
                                         registry=registry),
        spec_decode_accepted_tokens=Counter(PREFIX + "spec_decode_num_accepted_tokens",
                                            "Speculative decoding: proposed tokens the target "
                                            "model accepted.", labels, registry=registry),
        spec_decode_accepted_per_position=Counter(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos", "Speculative decoding: "
            "accepted proposals by their position in the draft (0: the first).",
            labels + ["position"], registry=registry),
        num_running=Gauge(PREFIX + "num_requests_running", "Sequences in the running batch.",
                          labels, registry=registry),
        num_waiting=Gauge(PREFIX + "num_requests_waiting", "Sequences waiting to be scheduled "
                          "(new or preempted).", labels, registry=registry),
        kv_cache_usage=Gauge(PREFIX + "kv_cache_usage_ratio", "Fraction of KV cache blocks "
                             "held by requests (1 = full).", labels, registry=registry),
        engine_config=Info(PREFIX + "engine_config", "The engine's configuration: model, dtype, "
                           "device, KV cache block size and number of blocks, batch limits.",
                           labels, registry=registry),
    )


@dataclass(slots=True)
class _IntervalTotals:
    """What the periodic log line reports: sums since the previous line."""

    start: float
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    spec_decode_draft_tokens: int = 0
    spec_decode_accepted_tokens: int = 0


class _Recorder(Protocol):
    """One naming's metrics for one engine: what MetricsLogger hands each step and request."""

    def record_engine_info(self, info: Mapping[str, str]) -> None: ...

    def record_step(self, stats: StepStats) -> None: ...

    def set_load(self, num_running: int, num_waiting: int, kv_cache_usage: float) -> None: ...

    def record_finished(self, output: RequestOutput) -> None: ...


class _PagedserveRecorder:
    """One engine's stats under pagedserve's names, labelled model_name."""

    def __init__(self, families: _Families, model_name: str) -> None:
        self.families = families
        self.model_name = model_name
        self._touch_children()

    def _touch_children(self) -> None:
        """Create every child now, so each series exists (at 0) from the first scrape: rate()
        then sees the first increase, and dashboards find every label value."""
        families, name = self.families, self.model_name
        for reason in SUCCESS_REASONS:
            families.request_success.labels(name, reason)
        for reason in FAILURE_REASONS:
            families.request_failure.labels(name, reason)
        for family in (families.ttft, families.itl, families.e2e, families.queue_time,
                       families.prefill_time, families.decode_time,
                       families.request_prompt_tokens, families.request_generation_tokens,
                       families.iteration_tokens, families.prompt_tokens,
                       families.generation_tokens, families.preemptions,
                       families.prefix_cache_queries, families.prefix_cache_hits,
                       families.spec_decode_drafts, families.spec_decode_draft_tokens,
                       families.spec_decode_accepted_tokens, families.num_running,
                       families.num_waiting, families.kv_cache_usage):
            family.labels(name)

    def record_engine_info(self, info: Mapping[str, str]) -> None:
        self.families.engine_config.labels(self.model_name).info(dict(info))

    def record_step(self, stats: StepStats) -> None:
        families, name = self.families, self.model_name
        families.prompt_tokens.labels(name).inc(stats.num_prompt_tokens)
        families.generation_tokens.labels(name).inc(stats.num_generation_tokens)
        families.preemptions.labels(name).inc(stats.num_preemptions)
        families.prefix_cache_queries.labels(name).inc(stats.prefix_cache_queries)
        families.prefix_cache_hits.labels(name).inc(stats.prefix_cache_hits)
        num_step_tokens = stats.num_prompt_tokens + stats.num_generation_tokens
        if num_step_tokens:
            families.iteration_tokens.labels(name).observe(num_step_tokens)
        observe_all(families.ttft.labels(name), stats.time_to_first_tokens)
        observe_all(families.itl.labels(name), stats.inter_token_latencies)
        if stats.spec is not None:
            self._record_spec_decode(stats.spec)
        self.set_load(stats.num_running, stats.num_waiting, stats.kv_cache_usage)

    def _record_spec_decode(self, spec: SpecDecodeStats) -> None:
        families, name = self.families, self.model_name
        families.spec_decode_drafts.labels(name).inc(spec.num_drafts)
        families.spec_decode_draft_tokens.labels(name).inc(spec.num_draft_tokens)
        families.spec_decode_accepted_tokens.labels(name).inc(spec.num_accepted_tokens)
        for position, count in enumerate(spec.accepted_per_position):
            families.spec_decode_accepted_per_position.labels(name, str(position)).inc(count)

    def set_load(self, num_running: int, num_waiting: int, kv_cache_usage: float) -> None:
        families, name = self.families, self.model_name
        families.num_running.labels(name).set(num_running)
        families.num_waiting.labels(name).set(num_waiting)
        families.kv_cache_usage.labels(name).set(kv_cache_usage)

    def record_finished(self, output: RequestOutput) -> None:
        """A finished user request: counted once, whatever its n."""
        reasons = {choice.finish_reason for choice in output.outputs}
        if "error" in reasons or "abort" in reasons:
            self.record_failure("error" if "error" in reasons else "abort")
        else:
            self._record_success(output, "length" if "length" in reasons else "stop")

    def record_failure(self, reason: str, num_requests: int = 1) -> None:
        assert reason in FAILURE_REASONS, reason
        self.families.request_failure.labels(self.model_name, reason).inc(num_requests)

    def _record_success(self, output: RequestOutput, finish_reason: str) -> None:
        families, name, timing = self.families, self.model_name, output.timing
        families.request_success.labels(name, finish_reason).inc()
        families.request_prompt_tokens.labels(name).observe(len(output.prompt_token_ids))
        families.request_generation_tokens.labels(name).observe(
            sum(choice.num_tokens for choice in output.outputs))
        spans = ((families.e2e, span(timing.arrival, timing.finished)),
                 (families.queue_time, span(timing.arrival, timing.first_scheduled)),
                 (families.prefill_time, span(timing.first_scheduled, timing.first_token)),
                 (families.decode_time, span(timing.first_token, timing.last_token)))
        for family, seconds in spans:
            if seconds is not None:
                family.labels(name).observe(seconds)


class MetricsLogger:
    """Records one engine's stats under its model_name, in the naming(s) asked for; also writes
    the log lines. record_step and record_finished run on the engine thread; record_failure may
    run on any thread (prometheus_client locks)."""

    def __init__(self, model_name: str, registry: CollectorRegistry = REGISTRY,
                 log_interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, *,
                 names: MetricNames = DEFAULT_METRIC_NAMES,
                 max_model_len: int = DEFAULT_MAX_MODEL_LEN) -> None:
        """`clock` times the periodic log line's interval (tests pass a fake one);
        `max_model_len` sizes vLLM's token-count buckets, as vLLM sizes them."""
        assert names in METRIC_NAMES, names
        self.model_name = model_name
        self.log_interval_s = log_interval_s
        self._clock = clock
        self._ours = (None if names == "vllm" else _PagedserveRecorder(
            _families_for(registry, "pagedserve", _create_families), model_name))
        vllm = (None if names == "pagedserve" else VllmRecorder(
            _families_for(registry, "vllm", lambda r: create_vllm_families(r, max_model_len)),
            model_name))
        self._recorders: list[_Recorder] = [r for r in (self._ours, vllm) if r is not None]
        self._interval = _IntervalTotals(start=clock())

    def record_engine_info(self, info: Mapping[str, str]) -> None:
        for recorder in self._recorders:
            recorder.record_engine_info(info)

    # ---- once per step ------------------------------------------------------------------------

    def record_step(self, stats: StepStats, outputs: Iterable[RequestOutput] = ()) -> None:
        """One engine step: its StepStats and the RequestOutputs it returned."""
        for recorder in self._recorders:
            recorder.record_step(stats)
        self.record_finished(outputs)
        self._accumulate(stats)

    def set_load(self, num_running: int, num_waiting: int, kv_cache_usage: float) -> None:
        """The gauges; also called when the engine goes idle, since requests finished outside
        a step (aborts, stop strings) are not in the last step's figures."""
        for recorder in self._recorders:
            recorder.set_load(num_running, num_waiting, kv_cache_usage)

    def record_idle(self, kv_cache_usage: float) -> None:
        """The engine has nothing to run: gauges to idle, and the log interval restarts, so the
        first line after a quiet spell reports busy time, not the idle time before it."""
        self.set_load(0, 0, kv_cache_usage)
        self._interval = _IntervalTotals(start=self._clock())

    # ---- once per request ---------------------------------------------------------------------

    def record_finished(self, outputs: Iterable[RequestOutput]) -> None:
        """Count and log each finished request among `outputs`; unfinished ones are skipped."""
        for output in outputs:
            if not output.finished:
                continue
            for recorder in self._recorders:
                recorder.record_finished(output)
            _log_finished(output)

    def record_failure(self, reason: str, num_requests: int = 1) -> None:
        """A request that did not finish normally; reason is one of FAILURE_REASONS. Only
        pagedserve's names count these: vLLM counts no request that never reached its engine
        core."""
        assert reason in FAILURE_REASONS, reason
        if self._ours is not None:
            self._ours.record_failure(reason, num_requests)

    def record_validation_failure(self) -> None:
        """A request rejected as invalid before it reached the engine (the server calls this)."""
        self.record_failure("validation")

    # ---- the periodic engine log line ---------------------------------------------------------

    def _accumulate(self, stats: StepStats) -> None:
        interval = self._interval
        interval.num_prompt_tokens += stats.num_prompt_tokens
        interval.num_generation_tokens += stats.num_generation_tokens
        interval.prefix_cache_queries += stats.prefix_cache_queries
        interval.prefix_cache_hits += stats.prefix_cache_hits
        if stats.spec is not None:
            interval.spec_decode_draft_tokens += stats.spec.num_draft_tokens
            interval.spec_decode_accepted_tokens += stats.spec.num_accepted_tokens
        now = self._clock()
        if now - interval.start >= self.log_interval_s:
            # only steps call this, so the line appears only while the engine is busy
            _log_interval(interval, now - interval.start, stats)
            self._interval = _IntervalTotals(start=now)


def _log_interval(interval: _IntervalTotals, elapsed: float, stats: StepStats) -> None:
    elapsed = max(elapsed, 1e-9)
    hit_rate = (100.0 * interval.prefix_cache_hits / interval.prefix_cache_queries
                if interval.prefix_cache_queries else 0.0)
    spec = ""
    extra: dict[str, object] = {}
    if interval.spec_decode_draft_tokens:
        acceptance = interval.spec_decode_accepted_tokens / interval.spec_decode_draft_tokens
        spec = (f", spec decode acceptance {100.0 * acceptance:.1f}% of "
                f"{interval.spec_decode_draft_tokens} proposed tokens")
        extra = {"spec_decode_acceptance_rate": round(acceptance, 6),
                 "spec_decode_draft_tokens": interval.spec_decode_draft_tokens}
    logger.info(
        "engine: prompt %.1f tokens/s, generation %.1f tokens/s, running %d, waiting %d, "
        "KV cache %.1f%%, prefix-cache hit rate %.1f%%%s",
        interval.num_prompt_tokens / elapsed, interval.num_generation_tokens / elapsed,
        stats.num_running, stats.num_waiting, 100.0 * stats.kv_cache_usage, hit_rate, spec,
        extra={**extra, "prompt_tokens_per_s": round(interval.num_prompt_tokens / elapsed, 3),
               "generation_tokens_per_s": round(interval.num_generation_tokens / elapsed, 3),
               "num_running": stats.num_running, "num_waiting": stats.num_waiting,
               "kv_cache_usage": round(stats.kv_cache_usage, 6),
               "prefix_cache_hit_rate": round(hit_rate / 100.0, 6)})


def _log_finished(output: RequestOutput) -> None:
    timing = output.timing
    ttft = None if timing.first_token is None else timing.first_token - timing.arrival
    e2e = None if timing.finished is None else timing.finished - timing.arrival
    num_output_tokens = sum(choice.num_tokens for choice in output.outputs)
    finish_reasons = ",".join(str(choice.finish_reason) for choice in output.outputs)
    logger.info(
        "finished request %s: prompt_tokens=%d cached_tokens=%d output_tokens=%d ttft=%s "
        "e2e=%s finish_reason=%s", output.request_id, len(output.prompt_token_ids),
        output.num_cached_tokens, num_output_tokens, _seconds(ttft), _seconds(e2e),
        finish_reasons,
        # request_id set explicitly: this runs on the engine thread, outside the request's
        # logging context; the other fields are for --log-format json
        extra={"request_id": output.request_id, "prompt_tokens": len(output.prompt_token_ids),
               "cached_tokens": output.num_cached_tokens, "output_tokens": num_output_tokens,
               "ttft_s": ttft, "e2e_s": e2e, "finish_reason": finish_reasons})


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def engine_config_info(engine: LLMEngine) -> dict[str, str]:
    """The engine_config info metric's labels: what was asked for and what was resolved."""
    config = engine.config
    return {
        "model": config.model.model or "<embedded default>",
        "dtype": str(engine.loaded.dtype).removeprefix("torch."),
        "device": str(engine.loaded.device),
        "quantization": config.model.quantization or "none",
        "block_size": str(config.cache.block_size),
        "num_blocks": str(engine.stats().num_total_blocks),
        "max_model_len": str(engine.max_model_len),
        "max_num_seqs": str(config.scheduler.max_num_seqs),
        "max_num_batched_tokens": str(config.scheduler.max_num_batched_tokens),
        "prefill_tokens_while_decoding": str(config.scheduler.prefill_tokens_while_decoding
                                             or "none"),
        "enable_prefix_caching": str(config.cache.enable_prefix_caching).lower(),
        "prefix_caching_hash_algo": config.cache.prefix_caching_hash_algo,
        "gpu_memory_utilization": str(config.cache.gpu_memory_utilization),
        "speculative": ("none" if (spec := config.speculative) is None
                        else f"{spec.method} k={spec.num_speculative_tokens}"),
    }

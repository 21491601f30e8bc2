"""AsyncEngine: the asyncio front of the engine. One worker thread runs the engine loop; each
request gets an output queue on the event loop, fed once per step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry

from engine.config import EngineConfig
from engine.errors import (
    EngineDeadError,
    EngineDiedError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    RequestTimeoutError,
    WorkerGroupError,
)
from engine.fault_hooks import FaultHooks
from engine.llm_engine import LLMEngine, PreparedRequest
from engine.metrics import DEFAULT_METRIC_NAMES, MetricNames, MetricsLogger, engine_config_info
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.structured.params import StructuredOutputsParams
from engine.summary import EngineSummary, summarize

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # how long the idle worker sleeps between checks for new commands
DEAD_JOIN_TIMEOUT_S = 5.0  # how long shutdown waits for a dead loop's thread


@dataclass(slots=True)
class _Add:
    prepared: PreparedRequest


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Fail:
    request_id: str
    message: str


_Command = _Add | _Abort | _Fail


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None, *,
                 served_model_name: str | None = None,
                 registry: CollectorRegistry = REGISTRY,
                 strict_max_model_len: bool = False,
                 metric_names: MetricNames = DEFAULT_METRIC_NAMES) -> None:
        """Loads the model (blocking: call through asyncio.to_thread from async code).
        Metrics go to `registry` labelled model_name=served_model_name (default: the model's
        directory or file name), under pagedserve's names, vLLM's or both (`metric_names`).
        strict_max_model_len: see LLMEngine."""
        self.config = config
        self.llm_engine = engine or LLMEngine(config, strict_max_model_len=strict_max_model_len)
        self.tokenizer = self.llm_engine.tokenizer
        self.max_model_len = self.llm_engine.max_model_len
        self.vocab_size = self.llm_engine.vocab_size
        self.generation_defaults = dict(self.llm_engine.generation_defaults)
        self.model_name = served_model_name or _model_name(config.model.model)
        self.metrics = MetricsLogger(self.model_name, registry=registry, names=metric_names,
                                     max_model_len=self.max_model_len)
        self.metrics.record_engine_info(engine_config_info(self.llm_engine))
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        # sequences sent to the worker but not yet applied (each counter has a single writer
        # thread), and requests applied
        self._num_sequences_sent = 0
        self._num_sequences_applied = 0
        self._num_applied = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.dead_error: BaseException | None = None
        self._dying = threading.Lock()
        # called once, from the engine's or the group watcher's thread, when the engine dies
        # (the CLI ends the process non-zero then, so a supervisor restarts it)
        self.on_dead: Callable[[BaseException], None] | None = None
        # the worker's heartbeat: stamped at every pass of its loop (each step, each idle wait)
        self.last_step_time = time.monotonic()
        self._is_idle = False

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()
        if self.llm_engine.workers is not None:
            self.llm_engine.workers.watch(self._group_broken)

    async def shutdown(self) -> None:
        """Stop the loop after its current step, then the parallel group's workers. A dead
        loop may be stuck in a collective with a lost worker: it gets a few seconds."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            timeout = None if self.dead_error is None else DEAD_JOIN_TIMEOUT_S
            await asyncio.to_thread(self._thread.join, timeout)
        await asyncio.to_thread(self.llm_engine.close, self.dead_error is None)

    @property
    def is_ready(self) -> bool:
        return self._thread is not None and self.dead_error is None

    @property
    def is_alive(self) -> bool:
        return self.is_ready and self._thread is not None and self._thread.is_alive()

    @property
    def fault_hooks(self) -> FaultHooks:
        """Test-only fault injection (see FaultHooks); production never sets a hook."""
        return self.llm_engine.fault_hooks

    @property
    def num_running(self) -> int:
        return self.llm_engine.stats().num_running

    @property
    def num_waiting(self) -> int:
        """Sequences waiting: a request with n choices counts n times."""
        return (self.llm_engine.stats().num_waiting + self._num_sequences_sent
                - self._num_sequences_applied)

    @property
    def num_admitted(self) -> int:
        """Requests the worker has taken in since start (each then ends exactly once)."""
        return self._num_applied

    @property
    def seconds_since_progress(self) -> float:
        """Seconds the loop has spent in its current pass (a step, usually); 0 while it waits
        idle for work. Large means hung."""
        return 0.0 if self._is_idle else time.monotonic() - self.last_step_time

    @property
    def kv_cache_usage(self) -> float:
        return self.llm_engine.stats().kv_cache_usage

    @property
    def num_free_blocks(self) -> int:
        return self.llm_engine.stats().num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.llm_engine.stats().num_total_blocks

    @property
    def summary(self) -> EngineSummary:
        """What the engine resolved at start-up, for the server's ready line."""
        return summarize(self.llm_engine)

    # ---- requests -----------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, arrival_time: float | None = None,
                       deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs (as params.output_kind says) until the request finishes with "stop"
        or "length". Invalid input raises before the first output; a request that fails in
        the engine raises RequestFailedError (a passed `deadline`, in time.monotonic(),
        RequestTimeoutError; a dead engine EngineDeadError). Leaving the loop early aborts the
        request in the engine."""
        if params.structured_outputs is not None:
            await self.compile_grammar(params.structured_outputs)
        prepared = self._admit(request_id, prompt_token_ids, params, arrival_time)
        await self.start()
        assert self._loop is not None
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        self._send(_Add(prepared))
        timer = None if deadline is None else self._loop.call_later(
            max(deadline - time.monotonic(), 0.0), self._time_out, request_id)
        finished = False
        try:
            self._check_alive()  # the loop may have died while this request was admitted
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if timer is not None:
                timer.cancel()
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def compile_grammar(self, params: StructuredOutputsParams) -> None:
        """Compile a constraint in a worker thread (llguidance releases the GIL), so neither
        the event loop nor the engine's steps wait for it; cached, so admission then finds it.
        InvalidRequestError, naming the field, when it does not compile."""
        with self._counting_refusals():
            await asyncio.to_thread(self.llm_engine.grammars.compile, params)

    def abort(self, request_id: str) -> None:
        """Finish a request from any thread; idempotent. Its blocks are freed within a step."""
        self._send(_Abort(request_id))

    def fail(self, request_id: str, error: BaseException) -> None:
        """Fail a request (call on the event loop): its iterator raises `error` at once, and
        the engine finishes it as an error (blocks freed, counted) within a step."""
        self._put(request_id, error)
        self._send(_Fail(request_id, str(error) or type(error).__name__))

    def fail_all(self, error: BaseException) -> int:
        """Fail every request in flight (shutdown). Returns how many there were."""
        request_ids = list(self._streams)
        for request_id in request_ids:
            self.fail(request_id, error)
        return len(request_ids)

    def _time_out(self, request_id: str) -> None:
        self.fail(request_id, RequestTimeoutError(f"request {request_id} passed its deadline"))

    def _admit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               arrival_time: float | None) -> PreparedRequest:
        """Validate and admit a request, counting the failure when it is refused."""
        with self._counting_refusals():
            self._check_alive()
            prepared = self.llm_engine.prepare_request(request_id, prompt_token_ids, params,
                                                       arrival_time)
            self._check_capacity(len(prepared.sequences), "n")
        return prepared

    @contextlib.contextmanager
    def _counting_refusals(self) -> Iterator[None]:
        """Count a refused admission in request_failure_total by its reason, then re-raise."""
        try:
            yield
        except InvalidRequestError:
            self.metrics.record_failure("validation")
            raise
        except QueueFullError:
            self.metrics.record_failure("queue_full")
            raise
        except EngineDeadError:
            self.metrics.record_failure("error")
            raise

    def _check_alive(self) -> None:
        if self.dead_error is not None or self._stopping.is_set():
            raise EngineDeadError(f"the engine is not running ({self.dead_error or 'stopped'})")

    def check_prompt(self, prompt_token_ids: list[int],
                     truncate_prompt_tokens: int | None = None) -> list[int]:
        """A token-id prompt checked (and truncated) as admission will check it, for callers
        that use it before admitting it, e.g. to echo its text."""
        return self.llm_engine.check_prompt(prompt_token_ids, truncate_prompt_tokens)

    def check_capacity(self, num_sequences: int, param: str = "n") -> None:
        """Raise unless `num_sequences` more sequences fit the waiting queue: InvalidRequestError
        (naming `param`) when they never could, QueueFullError when they cannot now. For a
        caller about to admit several prompts at once; the refusal is counted."""
        with self._counting_refusals():
            self._check_capacity(num_sequences, param)

    def _check_capacity(self, num_sequences: int, param: str) -> None:
        max_queue_len = self.config.scheduler.max_queue_len
        if max_queue_len is None:
            return
        if num_sequences > max(max_queue_len, 1):  # one sequence is only ever "not now"
            raise InvalidRequestError(
                f"this request asks for {num_sequences} sequences (n times the number of "
                f"prompts), more than the {max_queue_len} that may wait at once", param=param)
        if self.num_waiting + num_sequences > max_queue_len:
            raise QueueFullError(f"the waiting queue is full ({self.num_waiting} of "
                                 f"{max_queue_len} sequences)")

    def _send(self, command: _Command) -> None:
        if isinstance(command, _Add):
            self._num_sequences_sent += len(command.prepared.sequences)
        self._commands.put(command)
        self._wakeup.set()

    # ---- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self.last_step_time = time.monotonic()  # heartbeat: every pass of the loop
                self._apply_commands()
                if not self.llm_engine.has_unfinished_requests():
                    self._wait_idle()
                    continue
                outputs = self.llm_engine.step()
                self._deliver(outputs)  # clients first; the metrics can wait a moment
                self.metrics.record_step(self.llm_engine.last_step_stats, outputs)
        except BaseException as error:  # the loop is dead: tell every waiting client now
            logger.exception("engine loop died")
            self._die(error, f"the engine loop died: {error!r}")

    def _group_broken(self, message: str) -> None:
        """A worker of the parallel group exited (the watcher's thread): the loop may still be
        blocked in a collective with it, so the clients are told from here, at once."""
        self._die(WorkerGroupError(message), f"the parallel group broke: {message}")

    def _die(self, error: BaseException, message: str) -> None:
        """Once: fail every request in flight, count them, and tell on_dead."""
        with self._dying:
            if self.dead_error is not None:
                return
            self.dead_error = error
        self.metrics.record_failure("error", self.llm_engine.stats().num_unfinished_requests)
        self._fail_all(EngineDiedError(message))
        if self.on_dead is not None:
            self.on_dead(error)

    def _wait_idle(self) -> None:
        self.metrics.record_idle(self.kv_cache_usage)
        self._is_idle = True  # waiting for work is not a stall
        self._wakeup.wait(IDLE_WAIT_S)
        self._wakeup.clear()
        self.last_step_time = time.monotonic()  # before leaving idle: never read stale
        self._is_idle = False

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._add(command.prepared)
                self._num_applied += 1
                self._num_sequences_applied += len(command.prepared.sequences)
                continue
            if isinstance(command, _Abort):
                outputs = self.llm_engine.abort_request(command.request_id)
            else:
                outputs = self.llm_engine.fail_request(command.request_id, command.message)
            self._deliver(outputs)
            self.metrics.record_finished(outputs)

    def _add(self, prepared: PreparedRequest) -> None:
        try:
            self.llm_engine.add_prepared(prepared)
        except Exception as error:  # a duplicate id: only this request fails
            self.metrics.record_failure(
                "validation" if isinstance(error, InvalidRequestError) else "error")
            self._deliver_to(prepared.request_id, error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._put_outputs, outputs)

    def _deliver_to(self, request_id: str, item: BaseException) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._put, request_id, item)

    def _put_outputs(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            self._put(output.request_id, _stream_item(output))

    def _put(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(item)

    def _fail_all(self, error: BaseException) -> None:
        if self._loop is None:
            return
        def fail() -> None:
            for stream in self._streams.values():
                stream.put_nowait(error)
        self._loop.call_soon_threadsafe(fail)


def _stream_item(output: RequestOutput) -> RequestOutput | BaseException:
    """A request's failure reaches its consumer one way only: as the exception its stream
    raises. Outputs that end normally ("stop", "length") pass as data."""
    if output.finished and any(c.finish_reason in ("error", "abort") for c in output.outputs):
        return RequestFailedError(output.error or "the request was aborted in the engine")
    return output


def _model_name(model: str | None) -> str:
    """The default served name: the directory, file or hub id's last part."""
    if model is None:
        from engine.default_model import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    return Path(model.rstrip("/")).name.removesuffix(".gguf")

"""A fake ModelRunner for fast, deterministic engine tests: no model and no KV tensors; the next
token is a pure function of a sequence's tokens so far. Plus engines built around it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import threading
import time
from collections import abc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch
import transformers
from prometheus_client import CollectorRegistry

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.llm_engine import LLMEngine
from engine.loader import LoadedModel
from engine.model_runner import ModelRunnerOutput
from engine.outputs import PositionLogprobs
from engine.scheduler import ScheduledRow
from engine.sequence import Sequence
from tests.tiny_models import VOCAB_SIZE, build_config, build_tokenizer

HOLD_TIMEOUT_S = 10.0  # a held pass gives up waiting after this (a test that forgot to release)
SAMPLED_LOGPROB = -0.25  # the fake's sampled token always has rank 1 and this logprob


@functools.cache
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer (trained once per process)."""
    return build_tokenizer()


@functools.cache
def text_token_ids() -> tuple[int, ...]:
    """The tiny tokenizer's ids that decode on their own to printable text: no special
    tokens (EOS included), no partial UTF-8 characters. The fake generates only these, so
    every generated token adds text to a stream."""
    ids = []
    for token_id in range(VOCAB_SIZE):
        text = tokenizer().decode([token_id], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)
        if text and text.isprintable() and "\ufffd" not in text:
            ids.append(token_id)
    return tuple(ids)


def next_token_id(token_ids: abc.Sequence[int]) -> int:
    """The greedy token after `token_ids`: (last token * 31 + position) picks a text token."""
    ids = text_token_ids()
    return ids[(token_ids[-1] * 31 + len(token_ids)) % len(ids)]


def greedy_tokens(prompt: abc.Sequence[int], num_tokens: int) -> list[int]:
    """The tokens the fake generates greedily after `prompt`."""
    token_ids = list(prompt)
    for _ in range(num_tokens):
        token_ids.append(next_token_id(token_ids))
    return token_ids[len(prompt):]


def _following(token_id: int, k: int) -> int:
    """The text token k places after `token_id` (wrapping)."""
    ids = text_token_ids()
    return ids[(ids.index(token_id) + k) % len(ids)]


def fake_logprobs(token_id: int, num_top: int) -> PositionLogprobs:
    """As ModelRunner returns them: the sampled token, then the top `num_top` (the sampled
    token first, then the text tokens after it, one nat apart)."""
    return [(token_id, SAMPLED_LOGPROB, 1)] + [
        (_following(token_id, k), SAMPLED_LOGPROB - k, k + 1) for k in range(num_top)]


class FakeModelRunner:
    """ModelRunner's surface as EngineCore uses it: num_blocks, kv_cache_bytes,
    execute(rows, block_ids), probe().

    Greedy rows take next_token_id; seeded rows draw from a random.Random seeded by the
    request's seed and the output position (as ModelRunner seeds its torch generators), so a
    retried row draws what it would have. A row verifying proposals keeps them while each is
    what the fake samples where it stands, then the first token that differs.
    `fail_when(request)` makes every pass holding that request raise (or raises itself);
    `hold()` parks passes until `release_hold()`. `passes` records each attempted pass as
    (sequence id, start, end) rows."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_cache_bytes = 0
        self.device = torch.device("cpu")
        self.unseeded = random.Random(0)
        self.passes: list[list[tuple[str, int, int]]] = []
        self.fail_when: Callable[[Sequence], bool] | None = None
        self.probe_error: Exception | None = None  # probe() raises it: a broken engine
        self.num_probes = 0
        self._hold_after: int | None = None
        self._open = threading.Event()
        self.held = threading.Event()  # set while a pass waits for release_hold()
        self.hold_expired = False  # a held pass gave up waiting: the test never released it

    # ---- the ModelRunner surface ----------------------------------------------------------

    def execute(self, rows: abc.Sequence[ScheduledRow],
                block_ids: dict[str, list[int]]) -> ModelRunnerOutput:
        self.passes.append([(r.sequence.sequence_id, r.start, r.end) for r in rows])
        self._wait_if_held()
        for row in rows:
            assert row.sequence.sequence_id in block_ids, "every row has its block table"
            if self.fail_when is not None and self.fail_when(row.sequence):
                raise RuntimeError(f"fake pass failed on {row.sequence.sequence_id}")
        sampled: dict[str, list[int]] = {}
        logprobs: dict[str, list[PositionLogprobs]] = {}
        for row in rows:
            request = row.sequence
            if row.end != request.num_tokens + len(row.spec_token_ids):
                continue  # a prefill chunk that has not caught up: nothing to sample
            token_ids = self._verify(request, row.spec_token_ids)
            sampled[request.sequence_id] = token_ids
            num_top = request.sampling_params.logprobs
            if num_top is not None:
                logprobs[request.sequence_id] = [fake_logprobs(t, num_top) for t in token_ids]
        return ModelRunnerOutput(sampled, logprobs)

    def dummy_step(self, num_tokens: int, max_num_seqs: int,
                   prompt_logprobs: bool = True) -> torch.Tensor:
        """What speculative decoding times at startup: here 2 ms, and a tenth of that more for
        each token past the first (as a small model on a fast device would cost)."""
        time.sleep(0.002 * (1 + 0.1 * (num_tokens - 1)))
        return torch.zeros(min(num_tokens, max_num_seqs), dtype=torch.long)

    def probe(self) -> None:
        self.num_probes += 1
        if self.probe_error is not None:
            raise self.probe_error

    # ---- holding passes -------------------------------------------------------------------

    def hold(self, after_passes: int = 0) -> None:
        """Let `after_passes` more passes run, then park each pass until release_hold()."""
        self._open.clear()
        self._hold_after = len(self.passes) + after_passes

    def release_hold(self) -> None:
        self._hold_after = None
        self._open.set()

    def _wait_if_held(self) -> None:
        if self._hold_after is None or len(self.passes) <= self._hold_after:
            return
        self.held.set()
        if not self._open.wait(HOLD_TIMEOUT_S):
            self.hold_expired = True
        self.held.clear()

    # ---- sampling -------------------------------------------------------------------------

    def _verify(self, request: Sequence, proposals: abc.Sequence[int]) -> list[int]:
        token_ids = list(request.all_token_ids)
        drawn: list[int] = []
        for proposal in [*proposals, None]:
            drawn.append(self._sample(request, token_ids))
            if drawn[-1] != proposal:
                break
            token_ids.append(proposal)
        return drawn

    def _sample(self, request: Sequence, token_ids: list[int]) -> int:
        params = request.sampling_params
        num_output_tokens = len(token_ids) - request.num_prompt_tokens
        token_id = (next_token_id(token_ids) if params.is_greedy
                    else self._draw(request, num_output_tokens))
        banned = _banned_token_ids(request, num_output_tokens)
        while token_id in banned:  # below min_tokens: the next text token that may be sampled
            token_id = _following(token_id, 1)
        return token_id

    def _draw(self, request: Sequence, position: int) -> int:
        seed = request.sampling_params.seed
        generator = self.unseeded if seed is None else random.Random(seed * 1_000_003 + position)
        return generator.choice(text_token_ids())


def _banned_token_ids(request: Sequence, num_output_tokens: int) -> set[int]:
    params = request.sampling_params
    if num_output_tokens >= params.min_tokens:
        return set()
    eos = () if params.ignore_eos else params.eos_token_ids
    return {*eos, *params.stop_token_ids}


# ---- engines around the fake ----------------------------------------------------------------


def weightless_model() -> LoadedModel:
    """A tiny llama's config and tokenizer with no weights: what LLMEngine reads from a loaded
    model (vocabulary, context, EOS) without a model to run."""
    return LoadedModel(model=None,  # type: ignore[arg-type]
                       hf_config=build_config("llama", architectures=["LlamaForCausalLM"]),
                       tokenizer=tokenizer(), generation_config=None,
                       model_dir=Path("fake-llama"), dtype=torch.float32,
                       device=torch.device("cpu"))


def fake_config(**engine_args: object) -> EngineConfig:
    """Engine args for the fake: 128 usable blocks of 4 tokens hold the 512-token context."""
    args: dict[str, object] = {"dtype": "float32", "device": "cpu", "num_blocks": 129,
                               "block_size": 4, **engine_args}
    return EngineConfig.from_kwargs("fake-llama", **args)


def fake_core(**engine_args: object) -> tuple[EngineCore, FakeModelRunner]:
    """An EngineCore running the fake, given through its `runner` argument."""
    config = fake_config(**engine_args)
    assert config.cache.num_blocks is not None
    runner = FakeModelRunner(config.cache.num_blocks)
    loaded = weightless_model()
    max_model_len = int(loaded.hf_config.max_position_embeddings)
    core = EngineCore(config, loaded, max_model_len, runner=runner)  # type: ignore[arg-type]
    return core, runner


def fake_llm_engine(**engine_args: object) -> tuple[LLMEngine, FakeModelRunner]:
    """An LLMEngine whose core runs the fake. LLMEngine builds its own EngineCore, so the real
    runner it makes (KV tensors for num_blocks, no model) is swapped out before any request;
    the pool keeps the same number of blocks."""
    config = fake_config(**engine_args)
    engine = LLMEngine(config, weightless_model())
    assert config.cache.num_blocks is not None  # an explicit pool: both runners agree on it
    runner = FakeModelRunner(config.cache.num_blocks)
    assert engine.core.runner.num_blocks == runner.num_blocks
    engine.core.runner = runner  # type: ignore[assignment]
    return engine, runner


def fake_async_engine(registry: CollectorRegistry | None = None,
                      **engine_args: object) -> tuple[AsyncEngine, FakeModelRunner]:
    """An AsyncEngine over fake_llm_engine; its metrics go to `registry` (default: a registry
    of its own), labelled model_name="fake"."""
    llm_engine, runner = fake_llm_engine(**engine_args)
    engine = AsyncEngine(llm_engine.config, llm_engine, served_model_name="fake",
                         registry=registry or CollectorRegistry())
    return engine, runner


# ---- around a fake-runner AsyncEngine in a test

GUARD_S = 10.0  # only a failing test waits this long


@contextlib.asynccontextmanager
async def running(engine: AsyncEngine, runner: FakeModelRunner) -> AsyncIterator[None]:
    await engine.start()
    try:
        yield
    finally:
        runner.release_hold()  # a held pass would keep the worker from stopping
        await engine.shutdown()
    assert not runner.hold_expired, "a held pass waited for a release that never came"


async def until(condition: Callable[[], bool], what: str) -> None:
    """Until `condition` holds (the worker thread gets there within a loop turn or two)."""
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.001)


def all_blocks_free(engine: AsyncEngine) -> bool:
    return engine.num_free_blocks == engine.num_total_blocks

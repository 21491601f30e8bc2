"""A fake ModelRunner for fast, deterministic engine tests: no model and no KV tensors; the next
token is a pure function of a sequence's tokens so far. Plus engines built around it."""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable, Sequence
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
from engine.request import Request
from engine.scheduler import ScheduledRow
from tests.tiny_models import VOCAB_SIZE, build_config, build_tokenizer

# 0, 1, 2 are the tiny tokenizer's special tokens (2 is EOS): the fake never picks them itself
FIRST_TOKEN_ID = 3
HOLD_TIMEOUT_S = 30.0  # a held pass gives up waiting after this (a test that forgot release())
SAMPLED_LOGPROB = -0.25  # the fake's sampled token always has rank 1 and this logprob


def next_token_id(token_ids: Sequence[int], vocab_size: int = VOCAB_SIZE) -> int:
    """The greedy token after `token_ids`: (last token * 31 + position) folded into the
    non-special ids."""
    return FIRST_TOKEN_ID + (token_ids[-1] * 31 + len(token_ids)) % (vocab_size - FIRST_TOKEN_ID)


def greedy_tokens(prompt: Sequence[int], num_tokens: int) -> list[int]:
    """The tokens the fake generates greedily after `prompt`."""
    token_ids = list(prompt)
    for _ in range(num_tokens):
        token_ids.append(next_token_id(token_ids))
    return token_ids[len(prompt):]


def fake_logprobs(token_id: int, num_top: int,
                  vocab_size: int = VOCAB_SIZE) -> PositionLogprobs:
    """As ModelRunner returns them: the sampled token, then the top `num_top` (the sampled
    token first, then its successors, one nat apart)."""
    span = vocab_size - FIRST_TOKEN_ID
    top = [FIRST_TOKEN_ID + (token_id - FIRST_TOKEN_ID + k) % span for k in range(num_top)]
    return [(token_id, SAMPLED_LOGPROB, 1)] + [
        (alternative, SAMPLED_LOGPROB - k, k + 1) for k, alternative in enumerate(top)]


class FakeModelRunner:
    """ModelRunner's surface as EngineCore uses it: num_blocks, kv_cache_bytes,
    execute(rows, block_ids), release(ids), probe(), generators.

    Greedy rows take next_token_id; seeded rows draw from a random.Random per sequence. A
    pass that raises draws nothing, so a retried row draws what it would have (ModelRunner
    restores its torch generators to the same end). `fail_when(request)` makes every pass
    holding that request raise (or raises itself); `hold()` parks passes until
    `release_hold()`. `passes` records each attempted pass as (sequence id, start, end) rows."""

    def __init__(self, num_blocks: int, vocab_size: int = VOCAB_SIZE) -> None:
        self.num_blocks = num_blocks
        self.vocab_size = vocab_size
        self.kv_cache_bytes = 0
        self.generators: dict[str, random.Random] = {}
        self.unseeded = random.Random(0)
        self.passes: list[list[tuple[str, int, int]]] = []
        self.released: list[str] = []
        self.fail_when: Callable[[Request], bool] | None = None
        self.probe_error: Exception | None = None  # probe() raises it: a broken engine
        self.num_probes = 0
        self._hold_after: int | None = None
        self._open = threading.Event()
        self.held = threading.Event()  # set while a pass waits for release_hold()

    # ---- the ModelRunner surface ----------------------------------------------------------

    def execute(self, rows: Sequence[ScheduledRow],
                block_ids: dict[str, list[int]]) -> ModelRunnerOutput:
        self.passes.append([(r.request.request_id, r.start, r.end) for r in rows])
        self._wait_if_held()
        for row in rows:
            assert row.request.request_id in block_ids, "every row has its block table"
            if self.fail_when is not None and self.fail_when(row.request):
                raise RuntimeError(f"fake pass failed on {row.request.request_id}")
        sampled: dict[str, int] = {}
        logprobs: dict[str, PositionLogprobs] = {}
        for row in rows:
            request = row.request
            if row.end != request.num_tokens:
                continue  # a prefill chunk that has not caught up: nothing to sample
            token_id = self._sample(request, row.end)
            sampled[request.request_id] = token_id
            num_top = request.sampling_params.logprobs
            if num_top is not None:
                logprobs[request.request_id] = fake_logprobs(token_id, num_top, self.vocab_size)
        return ModelRunnerOutput(sampled, logprobs)

    def release(self, request_ids: Sequence[str]) -> None:
        self.released.extend(request_ids)
        for request_id in request_ids:
            self.generators.pop(request_id, None)

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
        self._open.wait(HOLD_TIMEOUT_S)
        self.held.clear()

    # ---- sampling -------------------------------------------------------------------------

    def _sample(self, request: Request, end: int) -> int:
        token_ids = request.all_token_ids[:end]
        params = request.sampling_params
        if params.is_greedy:
            token_id = next_token_id(token_ids, self.vocab_size)
        else:
            token_id = self._draw(request)
        banned = _banned_token_ids(request)
        while token_id in banned:  # below min_tokens: the next id that may be sampled
            token_id = FIRST_TOKEN_ID + (token_id + 1 - FIRST_TOKEN_ID) % (
                self.vocab_size - FIRST_TOKEN_ID)
        return token_id

    def _draw(self, request: Request) -> int:
        seed = request.sampling_params.seed
        if seed is None:
            generator = self.unseeded
        else:
            generator = self.generators.setdefault(request.request_id, random.Random(seed))
        return generator.randrange(FIRST_TOKEN_ID, self.vocab_size)


def _banned_token_ids(request: Request) -> set[int]:
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        return set()
    eos = () if params.ignore_eos else params.eos_token_ids
    return {*eos, *params.stop_token_ids}


# ---- engines around the fake ----------------------------------------------------------------


@functools.cache
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer (trained once per process)."""
    return build_tokenizer()


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

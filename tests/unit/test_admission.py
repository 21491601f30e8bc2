"""Admission is complete: each rule refuses what the engine could not run, naming the field, and
anything admission accepts runs through the engine's steps without raising."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from engine import (
    AsyncEngine,
    ContextLengthExceededError,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
)
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    InvalidTextError,
    check_encodable,
)
from server.tokenization import PIECE_CHARS, encode_prompt
from tests.tiny_models import VOCAB_SIZE, build_tokenizer

# ---------------------------------------------------------------- SamplingParams.validate

REJECTED = [
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": 2.0}, "n"), ({"n": True}, "n"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"),
    ({"min_p": -0.1}, "min_p"), ({"min_p": math.inf}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 1e-30}, "repetition_penalty"),
    ({"repetition_penalty": 1e309}, "repetition_penalty"),
    ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -math.inf}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"seed": 2**63}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2**31}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"min_tokens": 2**40, "max_tokens": None}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"), ({"logprobs": 21}, "logprobs"),
    ({"stop": [""]}, "stop"), ({"stop": ["x"] * 17}, "stop"), ({"stop": ["y" * 1025]}, "stop"),
    ({"stop": ["\ud800"]}, "stop"), ({"stop": [3]}, "stop"),
    ({"stop_token_ids": [VOCAB_SIZE]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"logit_bias": {VOCAB_SIZE: 1.0}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {1: 100.5}}, "logit_bias"), ({"logit_bias": {1: math.nan}}, "logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(1025)}}, "logit_bias"),
]


@pytest.mark.parametrize("fields, param", REJECTED, ids=[str(c[0])[:40] for c in REJECTED])
def test_each_rule_refuses_naming_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**fields).validate(vocab_size=VOCAB_SIZE)  # type: ignore[arg-type]
    assert info.value.param == param


@pytest.mark.parametrize("fields", [
    {"n": 16}, {"temperature": 0.0}, {"temperature": 2.0}, {"temperature": 1e-40},
    {"top_p": 1e-9}, {"top_k": -1}, {"top_k": 0}, {"top_k": 10**30}, {"min_p": 1.0},
    {"repetition_penalty": 0.01}, {"repetition_penalty": 100.0},
    {"seed": 2**63 - 1, "n": 16}, {"seed": -(2**63)}, {"max_tokens": 2**31 - 1},
    {"logprobs": 20}, {"stop": ["x"] * 16}, {"stop_token_ids": [VOCAB_SIZE - 1]},
    {"logit_bias": {0: -100.0, VOCAB_SIZE - 1: 100}}])
def test_boundaries_are_accepted(fields: dict[str, object]) -> None:
    SamplingParams(**fields).validate(vocab_size=VOCAB_SIZE)  # type: ignore[arg-type]


def test_tiny_temperatures_are_greedy() -> None:
    assert SamplingParams(temperature=1e-40).is_greedy
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=1e-5).is_greedy


# ---------------------------------------------------------------- the engine's admission


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine(EngineConfig.from_kwargs(str(tiny_llama_dir), dtype="float32",
                                              device="cpu", num_blocks=256, max_model_len=32))


@pytest.mark.parametrize("prompt, param", [
    ([], "prompt"), ([VOCAB_SIZE], "prompt"), ([-1], "prompt"), ([1.5], "prompt"),
    (["1"], "prompt"), ([2**70], "prompt")])
def test_prompts_must_be_token_ids_in_the_vocabulary(engine: LLMEngine, prompt: list[object],
                                                     param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        engine.prepare_request("p", prompt, SamplingParams())  # type: ignore[arg-type]
    assert info.value.param == param


def test_prompts_and_completions_must_fit_the_context(engine: LLMEngine) -> None:
    with pytest.raises(ContextLengthExceededError):
        engine.prepare_request("p", [1] * 33, SamplingParams())
    with pytest.raises(ContextLengthExceededError):
        engine.prepare_request("p", [1] * 28, SamplingParams(max_tokens=5))
    prepared = engine.prepare_request("p", [1] * 28, SamplingParams(max_tokens=4, n=3))
    assert len(prepared.sequences) == 3


def test_fan_out_counts_every_sequence_against_the_queue(tiny_llama_dir: Path) -> None:
    config = EngineConfig.from_kwargs(str(tiny_llama_dir), dtype="float32", device="cpu",
                                      num_blocks=64, max_queue_len=8)
    engine = AsyncEngine(config, registry=CollectorRegistry())
    with pytest.raises(InvalidRequestError) as info:
        engine.check_capacity(9)
    assert info.value.param == "n"
    engine.check_capacity(8)

    async def admit_then_overflow() -> None:
        # n=6 waits in the queue (the worker has not started); 6 + 3 > 8: 429
        stream = engine.generate("a", [1, 2, 3], SamplingParams(n=6, max_tokens=2))
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        assert engine.num_waiting == 6
        with pytest.raises(QueueFullError):
            engine.check_capacity(3)
        with pytest.raises(QueueFullError):
            await anext(engine.generate("b", [1, 2], SamplingParams(n=3, max_tokens=2)))
        await first
        await stream.aclose()
        await engine.shutdown()

    asyncio.run(admit_then_overflow())


# ---------------------------------------------------------------- admission + one step


def _params(floats: Callable[[float, float], st.SearchStrategy[float]],
            ints: Callable[[int, int], st.SearchStrategy[int]]
            ) -> st.SearchStrategy[SamplingParams]:
    return st.builds(
        SamplingParams,
        n=ints(1, 4), temperature=floats(0.0, 2.0), top_p=floats(0.0, 1.0),
        top_k=ints(-1, VOCAB_SIZE + 10), min_p=floats(0.0, 1.0),
        repetition_penalty=floats(0.01, 100.0), presence_penalty=floats(-2.0, 2.0),
        frequency_penalty=floats(-2.0, 2.0),
        logit_bias=st.none() | st.dictionaries(ints(0, VOCAB_SIZE - 1), floats(-100, 100),
                                               max_size=8),
        seed=st.none() | ints(-(2**63), 2**63 - 1), max_tokens=st.none() | ints(1, 8),
        min_tokens=ints(0, 8), stop=st.lists(st.text(min_size=1, max_size=4), max_size=3),
        stop_token_ids=st.lists(ints(0, VOCAB_SIZE - 1), max_size=3), ignore_eos=st.booleans(),
        logprobs=st.none() | ints(0, 20), skip_special_tokens=st.booleans(),
        include_stop_str_in_output=st.booleans())


def _any_float(low: float, high: float) -> st.SearchStrategy[float]:
    """In range or anything a float can be (NaN, inf, denormals, huge)."""
    return st.one_of(st.floats(low, high), st.floats(),
                     st.sampled_from([1e-40, 5e-324, 1e308, -0.0]))


def _any_int(low: int, high: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(low, high), st.integers(),
                     st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1]))


# half the examples in range field by field (edges included: denormal temperatures, int64
# seeds, top_k past the vocabulary), half from each field's whole domain
SAMPLING_PARAMS = st.one_of(_params(st.floats, st.integers), _params(_any_float, _any_int))


@pytest.fixture(scope="module")
def short_engine(tiny_llama_dir: Path) -> LLMEngine:
    """A 16-token context keeps each admitted example to a few steps."""
    return LLMEngine(EngineConfig.from_kwargs(str(tiny_llama_dir), dtype="float32",
                                              device="cpu", num_blocks=64, max_model_len=16))


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(params=SAMPLING_PARAMS,
       prompt=st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=12))
def test_whatever_admission_accepts_runs_without_raising(short_engine: LLMEngine,
                                                         params: SamplingParams,
                                                         prompt: list[int]) -> None:
    engine = short_engine
    try:
        engine.add_request("h", prompt, params)
    except InvalidRequestError:
        event("refused")
        return  # refused at admission: nothing entered the engine
    event("admitted")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()  # must not raise
    final = [output for output in outputs if output.finished]
    assert len(final) == 1 and final[0].error is None, final
    assert all(choice.finish_reason in ("stop", "length") for choice in final[0].outputs)
    manager = engine.core.kv_cache_manager
    assert manager.num_free_blocks == manager.num_total_blocks


# ---------------------------------------------------------------- the protocol's admission


@pytest.mark.parametrize("value, param", [
    ("a\ud800b", ""), (["ok", "\udfff"], "[1]"), ({"k": {"x": ["\ud83d"]}}, "k.x[0]"),
    ({"\ud800": 1}, "\ud800")])
def test_unencodable_text_is_named_at_any_depth(value: object, param: str) -> None:
    with pytest.raises(InvalidTextError) as info:
        check_encodable(value)
    assert info.value.param == param


def test_encodable_text_passes() -> None:
    check_encodable({"a": ["héllo", "日本語", "🙂", "\ufffe\uffff", "\x00"], "b": 1.5})


@pytest.mark.parametrize("fields, param", [
    ({"temperature": math.inf}, "temperature"), ({"top_p": math.nan}, "top_p"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"),
    ({"logit_bias": {"1": math.inf}}, "logit_bias"), ({"stop": ["s"] * 17}, "stop"),
    ({"stop_token_ids": [1] * 1025}, "stop_token_ids"), ({"user": "u" * 257}, "user"),
    ({"model": "m" * 257}, "model"), ({"messages": [{"role": "user", "content": "x"}] * 4097},
                                      "messages")])
def test_protocol_bounds(fields: dict[str, object], param: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], **fields})
    assert info.value.errors()[0]["loc"][0] == param


def test_completion_prompt_lists_are_bounded() -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": ["p"] * 1025})
    CompletionRequest.model_validate({"prompt": ["p"] * 1024})


# ---------------------------------------------------------------- bounded tokenization


def test_encode_prompt_is_the_tokenizer_when_it_fits() -> None:
    tokenizer = build_tokenizer()
    for text in ("hello world", "The quick brown fox. " * 2000):
        expected = tokenizer.encode(text)
        assert encode_prompt(tokenizer, text, len(expected)) == expected
        with pytest.raises(ContextLengthExceededError):
            encode_prompt(tokenizer, text, len(expected) - 1)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(words=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=60),
       repeat=st.integers(1, 400))
def test_early_refusals_are_only_for_texts_that_do_not_fit(words: list[str],
                                                           repeat: int) -> None:
    """The piecewise count is a lower bound: a text is refused early only when its whole
    tokenization is longer than the limit too."""
    tokenizer = build_tokenizer()
    text = " ".join(words * repeat)[: 4 * PIECE_CHARS]
    num_tokens = len(tokenizer.encode(text))
    for limit in (num_tokens // 2, num_tokens - 1, num_tokens):
        try:
            assert encode_prompt(tokenizer, text, limit) == tokenizer.encode(text)
        except ContextLengthExceededError as exc:
            assert num_tokens > limit
            assert exc.num_prompt_tokens <= num_tokens  # "at least" must be true

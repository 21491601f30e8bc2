"""engine/structured: constraints compile once (errors too), bitmasks allow exactly what the
grammar allows, the sampler masks only constrained rows, and the engine keeps every
constrained output valid — batched with free rows, preempted, n > 1 — while free rows keep
their tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from engine import LLM, InvalidRequestError, SamplingParams, StructuredOutputsParams
from engine.sampler import SamplingMetadata, apply_grammar_bitmask, sample
from engine.structured.grammar import GrammarCompiler, fill_bitmask
from tests.devices import device_args
from tests.tiny_models import VOCAB_SIZE, build_tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tokenizer = build_tokenizer()
    return GrammarCompiler(tokenizer, VOCAB_SIZE, [tokenizer.eos_token_id])


@pytest.fixture(scope="module")
def llm(tiny_model_dirs: dict[str, Path]) -> LLM:
    return LLM(str(tiny_model_dirs["llama"]), **device_args(dtype="float32", num_blocks=256))


def allowed_tokens(bitmask_row: torch.Tensor, vocab_size: int) -> set[int]:
    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten()[:vocab_size].nonzero().flatten().tolist())


# ---- params ----------------------------------------------------------------------------------

def test_params_take_exactly_one_constraint() -> None:
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=("b",)).validate()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams().validate()
    with pytest.raises(InvalidRequestError) as info:
        StructuredOutputsParams(choice=(), param="guided_choice").validate()
    assert info.value.param == "guided_choice"


def test_schema_text_keeps_the_property_order() -> None:
    params = StructuredOutputsParams.from_schema({"properties": {"b": {}, "a": {}}}, "x")
    assert params.json == '{"properties": {"b": {}, "a": {}}}'
    assert StructuredOutputsParams.from_schema(params.json, "x") == params
    with pytest.raises(InvalidRequestError, match="not valid JSON") as info:
        StructuredOutputsParams.from_schema("{nope", "guided_json")
    assert info.value.param == "guided_json"
    with pytest.raises(InvalidRequestError, match="must be an object"):
        StructuredOutputsParams.from_schema([1], "guided_json")


# ---- compiler --------------------------------------------------------------------------------

def test_compile_is_cached_errors_included(compiler: GrammarCompiler) -> None:
    params = StructuredOutputsParams.from_schema(SCHEMA, "response_format")
    assert compiler.compile(params) is compiler.compile(params)
    bad = StructuredOutputsParams(regex="(a", param="guided_regex")
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="does not compile") as info:
            compiler.compile(bad)
        assert info.value.param == "guided_regex"


@pytest.mark.parametrize("params", [
    StructuredOutputsParams.from_schema({"type": "frobnicate"}, "response_format"),
    StructuredOutputsParams.from_schema({"type": "object", "properties": 5}, "response_format"),
    StructuredOutputsParams(grammar="start: missing_rule", param="guided_grammar"),
    StructuredOutputsParams(grammar="root ::= (", param="guided_grammar"),
])
def test_bad_constraints_name_their_field(compiler: GrammarCompiler,
                                          params: StructuredOutputsParams) -> None:
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(params)
    assert info.value.param == params.param


def test_bitmask_allows_exactly_the_grammars_next_tokens(compiler: GrammarCompiler) -> None:
    tokenizer = build_tokenizer()
    matcher = compiler.compile(StructuredOutputsParams(regex="[a-z]{1,12}")).new_matcher()
    allowed = allowed_tokens(fill_bitmask([None, matcher], VOCAB_SIZE)[1], VOCAB_SIZE)
    expected = {t for t in range(len(tokenizer))
                if re.fullmatch("[a-z]+", tokenizer.decode([t]))
                and not tokenizer.convert_ids_to_tokens(t).startswith("<|")}
    assert len(expected) > 50 and allowed == expected
    for token_id in tokenizer.encode("abcdefghijkl"):
        assert matcher.accept(token_id)
    assert matcher.is_finished  # 12 letters: nothing but the end can follow
    only_eos = allowed_tokens(fill_bitmask([matcher], VOCAB_SIZE)[0], VOCAB_SIZE)
    assert only_eos == {tokenizer.eos_token_id}


def test_a_token_outside_the_grammar_finishes_the_matcher(compiler: GrammarCompiler) -> None:
    matcher = compiler.compile(StructuredOutputsParams(regex="[0-9]+")).new_matcher()
    assert not matcher.is_finished
    assert not matcher.accept(build_tokenizer().encode("x")[0])
    assert matcher.is_finished


def test_choice_quotes_any_string(compiler: GrammarCompiler) -> None:
    tokenizer = build_tokenizer()
    choice = 'say "hi"\\n\n\tnow'
    matcher = compiler.compile(StructuredOutputsParams(choice=(choice, "b"))).new_matcher()
    assert all(matcher.accept(t) for t in tokenizer.encode(choice))
    assert matcher.is_finished


# ---- sampler ---------------------------------------------------------------------------------

def test_bitmask_masks_only_the_constrained_rows() -> None:
    vocab_size = 70  # not a multiple of 32: the last word is partly padding
    logits = torch.randn(3, vocab_size)
    bitmask = torch.full((3, 3), -1, dtype=torch.int32)  # rows 0 and 2: no grammar
    bitmask[1] = 0
    bitmask[1, 1] = 1 << 5  # token 37 only
    masked = apply_grammar_bitmask(logits, bitmask)
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    assert masked[1].isfinite().nonzero().flatten().tolist() == [37]
    assert masked[1, 37] == logits[1, 37]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=3)]
    metadata = SamplingMetadata.build(params, [[], []], [[], []], [None, torch.Generator()],
                                      [[], []], vocab_size, torch.device("cpu"),
                                      grammar_bitmask=bitmask[:2])
    tokens = sample(logits[:2], metadata).sampled_token_ids.tolist()
    assert tokens == [int(logits[0].argmax()), 37]


def test_bits_map_to_tokens_in_order() -> None:
    """Bit j of word w is token 32 * w + j, for every bit position."""
    vocab_size = 96
    for token_id in range(vocab_size):
        bitmask = torch.zeros(1, 3, dtype=torch.int32)
        word, bit = divmod(token_id, 32)
        bitmask[0, word] = torch.tensor(1 << bit).to(torch.int32)  # bit 31: the sign bit
        masked = apply_grammar_bitmask(torch.zeros(1, vocab_size), bitmask)
        assert masked[0].isfinite().nonzero().flatten().tolist() == [token_id]


# ---- the engine ------------------------------------------------------------------------------

def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_constrained_and_free_rows_share_a_batch(llm: LLM) -> None:
    constraint = StructuredOutputsParams.from_schema(SCHEMA, "response_format")
    free = [SamplingParams(temperature=0.0, max_tokens=20, min_tokens=20)] * 3
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, free)]
    constrained = [SamplingParams(temperature=t, max_tokens=200, seed=7,
                                  structured_outputs=constraint) for t in (0.0, 1.0)]
    mixed = llm.generate(prompts + [[20, 21], [22]], free + constrained)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    for output in mixed[3:]:
        assert output.outputs[0].finish_reason == "stop"
        assert _valid(output.outputs[0].text), output.outputs[0].text
    assert llm.llm_engine.core.kv_cache_manager.usage == 0.0


def test_preempted_constrained_rows_stay_valid(tiny_model_dirs: dict[str, Path]) -> None:
    llm = LLM(str(tiny_model_dirs["llama"]), **device_args(dtype="float32", num_blocks=24,
                                                           block_size=16))
    constraint = StructuredOutputsParams.from_schema(SCHEMA, "response_format")
    params = SamplingParams(temperature=1.0, max_tokens=150, structured_outputs=constraint,
                            seed=11)
    outputs = llm.generate([[3 + i] * 40 for i in range(6)], params)
    assert llm.llm_engine.core.scheduler.num_preemptions > 0
    assert all(_valid(o.outputs[0].text) for o in outputs), [o.outputs[0].text for o in outputs]


def test_n_siblings_walk_the_grammar_each(llm: LLM) -> None:
    regex = r"(ab|cd)[0-9]{2}"
    params = SamplingParams(n=4, temperature=1.0, max_tokens=30, seed=5,
                            structured_outputs=StructuredOutputsParams(regex=regex))
    for choice in llm.generate([[5, 6]], params)[0].outputs:
        assert re.fullmatch(regex, choice.text), choice.text
        assert choice.finish_reason == "stop"


def test_a_finished_grammar_stops_even_with_ignore_eos(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(choice=("yes", "no")))
    choice = llm.generate([[5, 6]], params)[0].outputs[0]
    assert choice.text in ("yes", "no") and choice.finish_reason == "stop"


def test_other_token_restrictions_are_refused_beside_a_constraint(llm: LLM) -> None:
    """allowed_token_ids or bad_words could ban every token a grammar allows, mid-answer:
    refused up front, naming the field."""
    choice = StructuredOutputsParams(choice=("yes", "no"), param="guided_choice")
    for field, value in (("allowed_token_ids", (5,)), ("bad_words", ("yes",))):
        params = SamplingParams(max_tokens=10, structured_outputs=choice, **{field: value})
        with pytest.raises(InvalidRequestError, match="cannot be combined") as info:
            llm.generate([[5, 6]], params)
        assert info.value.param == field


def test_a_broken_grammar_fails_its_request_alone(llm: LLM) -> None:
    """Should a token ever break a grammar, that request fails (its output could not match);
    it does not "stop" with text that does not. Others go on."""
    engine = llm.llm_engine
    choice = StructuredOutputsParams(choice=("yes", "no"))
    for request_id in ("broken", "fine"):
        engine.add_request(request_id, [5, 6], SamplingParams(temperature=0.0, max_tokens=10,
                                                               structured_outputs=choice))
    broken = engine.core.scheduler.sequences["broken"]
    assert broken.grammar is not None
    broken.grammar.accept(build_tokenizer().encode("x")[0])  # a token the grammar forbids
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0]
    assert finished["broken"].finish_reason == "error"
    assert finished["fine"].finish_reason == "stop" and finished["fine"].text in ("yes", "no")
    assert engine.core.kv_cache_manager.usage == 0.0


def test_a_grammar_that_matches_nothing_is_refused(compiler: GrammarCompiler) -> None:
    with pytest.raises(InvalidRequestError, match="does not compile") as info:
        compiler.compile(StructuredOutputsParams(grammar="start: a\na: a", param="guided_grammar"))
    assert info.value.param == "guided_grammar"

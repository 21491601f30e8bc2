"""Request fields end to end through LLM on a tiny random llama: allowed_token_ids bound
every token, bad_words never appear whole, truncate_prompt_tokens equals sending the cut
prompt, and the engine seed makes unseeded sampling reproducible (also across a failed pass)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from engine import LLM, SamplingParams
from engine.llm_engine import tokenize_bad_words
from engine.model_runner import ModelRunnerOutput
from engine.scheduler import ScheduledRow
from tests.devices import device_args

PROMPTS = [[30 + i, 41, 52 + 2 * i, 63, 74, 85 + i, 96] for i in range(3)]
NUM_TOKENS = 32


def _llm(model_dir: Path, **engine_args: object) -> LLM:
    return LLM(str(model_dir), **device_args(dtype="float32", num_blocks=128, **engine_args))


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in llm.generate(prompts, params)]


def _random(**kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=NUM_TOKENS, ignore_eos=True, **kwargs)


def _greedy(**kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, **kwargs)


def _contains(tokens: Sequence[int], part: Sequence[int]) -> bool:
    return any(list(tokens[i:i + len(part)]) == list(part)
               for i in range(len(tokens) - len(part) + 1))


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> LLM:
    return _llm(tiny_llama_dir)


# ---- allowed_token_ids ----------------------------------------------------------------------

def test_allowed_token_ids_bound_every_token(llama: LLM) -> None:
    allowed = (5, 77, 131, 300, 411)
    sampled = _tokens(llama, PROMPTS, _random(allowed_token_ids=allowed, logprobs=1))
    greedy = _tokens(llama, PROMPTS[:1], _greedy(allowed_token_ids=allowed))
    assert all(set(tokens) <= set(allowed) for tokens in sampled + greedy)
    assert all(len(tokens) == NUM_TOKENS for tokens in sampled)
    assert len({t for tokens in sampled for t in tokens}) > 1


# ---- bad_words ------------------------------------------------------------------------------

def _word_in_output(llm: LLM, tokens: list[int], width: int) -> str:
    """A word of `width` output tokens whose bad-word forms occur in `tokens`: banning it
    must change the output."""
    for start in range(len(tokens) - width + 1):
        word = str(llm.tokenizer.decode(tokens[start:start + width])).strip()
        if not word.isalpha():
            continue
        forms = tokenize_bad_words(llm.tokenizer, [word], llm.llm_engine.vocab_size)
        if any(_contains(tokens, form) and len(form) == width for form in forms):
            return word
    raise AssertionError(f"no {width}-token word in the greedy output")


@pytest.mark.parametrize("width", [1, 2])
def test_bad_words_never_appear_whole(llama: LLM, width: int) -> None:
    prompt = llama.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    before = _tokens(llama, [prompt], _greedy())[0]
    word = _word_in_output(llama, before, width)
    after = _tokens(llama, [prompt], _greedy(bad_words=[f"  {word}"]))[0]
    forms = tokenize_bad_words(llama.tokenizer, [word], llama.llm_engine.vocab_size)
    assert not any(_contains(after, form) for form in forms)
    assert len(after) == NUM_TOKENS and after != before


def test_bad_words_are_tokenized_bare_and_after_a_space(llama: LLM) -> None:
    tokenizer = llama.tokenizer
    prepared = llama.llm_engine.prepare_request(
        "bw", PROMPTS[0], SamplingParams(bad_words=[" brown fox", "quick"]))
    params = prepared.sequences[0].sampling_params
    expected = [tuple(tokenizer.encode(text, add_special_tokens=False))
                for text in ("brown fox", " brown fox", "quick", " quick")]
    assert params.bad_words_token_ids == tuple(expected)
    # the spaced form goes when it tokenizes as the bare one; ids past the model's vocabulary
    # can never be sampled, so a form holding one goes too
    spaceless: Any = SpacelessTokenizer()
    assert tokenize_bad_words(spaceless, ["ab", "zz"], 100) == ((97, 98),)


class SpacelessTokenizer:
    """Tokenizes characters, ignoring spaces: both forms of a word are the same."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(char) for char in text if char != " "]


# ---- truncate_prompt_tokens -----------------------------------------------------------------

def test_truncate_prompt_tokens_equals_sending_the_cut_prompt(llama: LLM) -> None:
    llm = llama
    long_prompt = [3 + (7 * i) % 500 for i in range(llm.llm_engine.max_model_len + 10)]
    cut = _tokens(llm, [long_prompt], _greedy(truncate_prompt_tokens=20))
    assert cut == _tokens(llm, [long_prompt[-20:]], _greedy())
    short = long_prompt[:12]
    assert (_tokens(llm, [short], _greedy(truncate_prompt_tokens=12))
            == _tokens(llm, [short], _greedy(truncate_prompt_tokens=50))
            == _tokens(llm, [short], _greedy()))


# ---- the engine seed ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seed_7_tokens(tiny_llama_dir: Path) -> list[list[int]]:
    """Unseeded samples of a fresh engine started with seed 7."""
    return _tokens(_llm(tiny_llama_dir, seed=7), PROMPTS, _random())


def test_same_engine_seed_same_unseeded_samples(tiny_llama_dir: Path,
                                                seed_7_tokens: list[list[int]]) -> None:
    assert seed_7_tokens == _tokens(_llm(tiny_llama_dir, seed=7), PROMPTS, _random())
    # no seed: a fresh one on every start (NUM_TOKENS draws per prompt never all collide)
    assert (_tokens(_llm(tiny_llama_dir), PROMPTS, _random())
            != _tokens(_llm(tiny_llama_dir), PROMPTS, _random()))


def test_a_failed_pass_restores_the_unseeded_generator(tiny_llama_dir: Path,
                                                       seed_7_tokens: list[list[int]]) -> None:
    llm = _llm(tiny_llama_dir, seed=7)
    runner = llm.llm_engine.core.runner
    execute = runner._execute
    failures: list[int] = []

    def fail_after_sampling(rows: Sequence[ScheduledRow],
                            block_ids: dict[str, list[int]]) -> ModelRunnerOutput:
        output = execute(rows, block_ids)  # the draw is made: the generator has moved on
        if not failures and any(r.sequence.num_output_tokens == 5 for r in rows):
            failures.append(len(rows))
            raise RuntimeError("injected fault after sampling")
        return output

    runner._execute = fail_after_sampling  # type: ignore[method-assign]
    assert _tokens(llm, PROMPTS, _random()) == seed_7_tokens
    assert failures == [len(PROMPTS)]  # the whole batch failed once, then ran again

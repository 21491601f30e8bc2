"""engine/spec_decode/draft_model.py: a draft model's greedy proposals, verified by the target.
Whatever the draft proposes, greedy and seeded outputs are token-identical to no speculation
(under chunked prefill and preemption); a target drafting for itself has every proposal
accepted; a draft of another vocabulary is refused at load; the draft's blocks never leak."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.loader import load_model
from engine.sequence import Sequence, SequenceStatus
from engine.spec_decode.draft_model import DraftModel
from engine.spec_decode.proposer import DraftModelProposer, SpecDecodeStats
from tests.devices import device_args
from tests.tiny_models import build_tokenizer, save_tiny_model

NUM_SPECULATIVE_TOKENS = 3
MAX_TOKENS = 12
PROMPT_LENGTHS = (3, 7, 12, 20)
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# seeded tokens are drawn per output position: speculation must leave them unchanged too
SEEDED = SamplingParams(temperature=1.0, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)
MIXED = [GREEDY, SEEDED, GREEDY, GREEDY]


def make_prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENGTHS]


def make_llm(target: Path, draft: Path | None, **engine_args: object) -> LLM:
    speculative = None if draft is None else {
        "model": str(draft), "num_speculative_tokens": NUM_SPECULATIVE_TOKENS,
        "disable_by_batch_size": None}
    args = {"num_blocks": 64, **engine_args}
    return LLM(str(target), speculative_config=speculative,
               **device_args(dtype="float32", block_size=4, **args))


def run(llm: LLM, params: list[SamplingParams]) -> tuple[list[list[int]], SpecDecodeStats]:
    """Every prompt to completion, step by step: the output tokens in prompt order, and the
    verifications summed over the steps."""
    engine = llm.llm_engine
    for index, (prompt, row_params) in enumerate(zip(make_prompts(), params, strict=True)):
        engine.add_request(str(index), prompt, row_params)
    outputs: dict[str, list[int]] = {}
    total = SpecDecodeStats()
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = list(output.outputs[0].token_ids)
        step = engine.last_step_stats.spec
        if step is not None:
            total.num_drafts += step.num_drafts
            total.num_draft_tokens += step.num_draft_tokens
            total.num_accepted_tokens += step.num_accepted_tokens
    return [outputs[str(index)] for index in range(len(params))], total


def draft_of(llm: LLM) -> DraftModel:
    proposer = llm.llm_engine.core.proposer
    assert isinstance(proposer, DraftModelProposer)
    return proposer.draft


def assert_draft_blocks_free(llm: LLM) -> None:
    """After the engine's next step, whose drafting first releases the blocks of the
    sequences that ended."""
    llm.llm_engine.step()
    draft = draft_of(llm)
    assert not draft.sequences
    assert draft.kv_cache_manager.num_free_blocks == draft.kv_cache_manager.num_total_blocks


@pytest.fixture(scope="module")
def baselines(tiny_model_dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    """Outputs of MIXED without speculation, per target."""
    return {arch: run(make_llm(tiny_model_dirs[arch], None), MIXED)[0]
            for arch in ("llama", "gpt2")}


def test_a_target_drafting_for_itself_has_every_proposal_accepted(
        tiny_model_dirs: dict[str, Path], baselines: dict[str, list[list[int]]]) -> None:
    llama = tiny_model_dirs["llama"]
    llm = make_llm(llama, llama)
    outputs, stats = run(llm, [GREEDY] * len(PROMPT_LENGTHS))
    greedy_rows = [index for index, params in enumerate(MIXED) if params is GREEDY]
    assert [outputs[index] for index in greedy_rows] == [
        baselines["llama"][index] for index in greedy_rows]
    # max_tokens cuts proposals before they are verified: every verified one is accepted
    assert stats.num_draft_tokens > MAX_TOKENS
    assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert_draft_blocks_free(llm)


@pytest.mark.parametrize("target, draft", [("llama", "qwen3"), ("gpt2", "llama")])
def test_a_poor_draft_changes_no_token_under_chunked_prefill_and_preemption(
        tiny_model_dirs: dict[str, Path], baselines: dict[str, list[list[int]]], target: str,
        draft: str) -> None:
    # another random model of the same vocabulary: its proposals are nearly all rejected.
    # 11 usable blocks of 4 tokens hold 44 tokens, fewer than the four sequences need; 8
    # tokens a step chunk the longer prompts, and the draft's catch-up on them
    llm = make_llm(tiny_model_dirs[target], tiny_model_dirs[draft], num_blocks=12,
                   max_num_batched_tokens=8)
    outputs, stats = run(llm, MIXED)
    assert outputs == baselines[target]
    assert llm.llm_engine.core.scheduler.num_preemptions > 0
    assert stats.num_drafts > 10
    assert stats.num_accepted_tokens < stats.num_drafts / 4  # rejected on nearly every row
    assert_draft_blocks_free(llm)


def test_aborts_free_the_draft_blocks(tiny_model_dirs: dict[str, Path]) -> None:
    llm = make_llm(tiny_model_dirs["llama"], tiny_model_dirs["qwen2"])
    engine = llm.llm_engine
    for index, prompt in enumerate(make_prompts()):
        engine.add_request(str(index), prompt, GREEDY)
    engine.step()  # every prompt prefilled at once
    engine.step()  # every sequence drafting
    draft = draft_of(llm)
    assert set(draft.sequences) == {"0", "1", "2", "3"}
    held = draft.kv_cache_manager.num_free_blocks
    engine.abort_request("1")
    engine.step()
    assert set(draft.sequences) == {"0", "2", "3"}
    assert draft.kv_cache_manager.num_free_blocks > held  # its blocks came back
    while engine.has_unfinished_requests():
        engine.step()
    assert_draft_blocks_free(llm)


@pytest.fixture(scope="module")
def foreign_vocab_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Drafts the llama target must refuse: one whose tokenizer has a token more, one whose
    embedding has fewer rows than the tokenizer has ids."""
    root = tmp_path_factory.mktemp("foreign-vocab")
    extra_token = save_tiny_model("llama", root / "extra-token", seed=11)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<|draft_only|>"])
    tokenizer.save_pretrained(extra_token)
    return {"extra-token": extra_token,
            "small-embedding": save_tiny_model("llama", root / "small-embedding", seed=12,
                                               vocab_size=256)}


@pytest.mark.parametrize("draft, message", [("extra-token", "different vocabularies"),
                                            ("small-embedding", "vocab_size 256, too few")])
def test_a_draft_of_another_vocabulary_is_refused_at_load(
        tiny_model_dirs: dict[str, Path], foreign_vocab_dirs: dict[str, Path], draft: str,
        message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as raised:
        make_llm(tiny_model_dirs["llama"], foreign_vocab_dirs[draft])
    assert str(foreign_vocab_dirs[draft]) in str(raised.value)
    assert str(tiny_model_dirs["llama"]) in str(raised.value)
    assert raised.value.param == "speculative_config"


def _decoding(sequence_id: str, prompt: list[int]) -> Sequence:
    """A running sequence whose next pass decodes its last token."""
    sequence = Sequence(sequence_id, prompt, GREEDY, time.monotonic(), MAX_TOKENS,
                        status=SequenceStatus.RUNNING)
    sequence.num_computed_tokens = sequence.num_tokens - 1
    return sequence


def test_the_draft_proposes_its_greedy_tokens_as_budget_and_pool_allow(
        tiny_model_dirs: dict[str, Path]) -> None:
    draft_dir = tiny_model_dirs["qwen2"]
    prompts = make_prompts()
    expected = make_llm(draft_dir, None).generate(
        prompts[1:3], SamplingParams(temperature=0.0, max_tokens=NUM_SPECULATIVE_TOKENS,
                                     ignore_eos=True))
    config = EngineConfig.from_kwargs(str(draft_dir), max_num_batched_tokens=8,
                                      **device_args(dtype="float32", block_size=4))
    loaded = load_model(str(draft_dir), dtype="float32", device=config.model.device)
    # 5 usable blocks of 4 tokens: the 7-token prompt and its proposals take 3 (9 tokens)
    draft = DraftModel(loaded, config, num_blocks=6, target_vocab_size=512)
    first, second = _decoding("a", prompts[1]), _decoding("b", prompts[2])
    # an 8-token budget: the first catches up (7 tokens), the second gets 1 token, no more
    assert draft.propose([first, second], NUM_SPECULATIVE_TOKENS) == [
        list(expected[0].outputs[0].token_ids), []]
    # its next 8 tokens need 2 more blocks, and 1 is free: no proposals, nothing changes
    assert draft.propose([second], NUM_SPECULATIVE_TOKENS) == [[]]
    assert draft.sequences["b"].num_computed_tokens == 1
    draft.release([second])  # the first ended: its 3 blocks are free
    assert draft.propose([second], NUM_SPECULATIVE_TOKENS) == [[]]  # 8 tokens: 9 of 12
    assert draft.propose([second], NUM_SPECULATIVE_TOKENS) == [
        list(expected[1].outputs[0].token_ids)]
    draft.release([])
    assert draft.kv_cache_manager.num_free_blocks == draft.kv_cache_manager.num_total_blocks

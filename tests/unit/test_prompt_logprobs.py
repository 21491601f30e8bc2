"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers on tiny fp32 models:
every prompt position's token logprob, rank and top-k, in one pass and in chunks (LM head in
slices), past a prefix-cache candidate, at block boundaries and for a 1-token prompt, with n > 1,
in each output kind, through preemption by recompute and a failed pass that is retried; plus
the bookkeeping (which positions a row computes, prefix lookups skipped) without a model."""

from __future__ import annotations

import random
from collections import abc
from pathlib import Path

import pytest
import torch
import transformers

from engine import LLM, RequestOutput, RequestOutputKind, SamplingParams
from engine import model_runner as model_runner_module
from engine.detokenizer import decode_token
from engine.kv_cache.manager import KVCacheManager
from engine.llm_engine import LLMEngine
from engine.model_runner import PromptLogprobRows
from engine.output_processor import OutputProcessor
from engine.outputs import EngineCoreOutput, Logprob, TokenLogprobs
from engine.scheduler import ScheduledRow
from engine.sequence import Sequence
from tests.devices import device_args
from tests.fake_runner import tokenizer as fake_tokenizer

TOLERANCE = 1e-3
ARCHS = ("llama", "gpt2")  # a Llama-family and a GPT-2-family model


def make_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(length)]


def params(num_top: int | None = 5, max_tokens: int = 3, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          prompt_logprobs=num_top, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def hf_models(tiny_model_dirs: dict[str, Path]) -> dict[str, transformers.PreTrainedModel]:
    return {arch: transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dirs[arch], dtype=torch.float32).eval() for arch in ARCHS}


def reference(model: transformers.PreTrainedModel, prompt: list[int]) -> torch.Tensor:
    """[P, vocab_size]: transformers' log_softmax of the logits at every prompt position."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_matches(actual: list[TokenLogprobs | None] | None, prompt: list[int],
                   model: transformers.PreTrainedModel, num_top: int) -> None:
    """vLLM's shape, and transformers' values: entry j (j >= 1) is log_softmax at j - 1."""
    expected = reference(model, prompt)
    assert actual is not None and len(actual) == len(prompt)
    assert actual[0] is None
    for j in range(1, len(prompt)):
        entry, row, token_id = actual[j], expected[j - 1], prompt[j]
        assert entry is not None
        assert next(iter(entry)) == token_id  # the prompt token first
        own = entry[token_id]
        assert abs(own.logprob - row[token_id].item()) < TOLERANCE, j
        assert own.rank == int((row > row[token_id]).sum()) + 1, j
        assert own.decoded_token == decode_token(fake_tokenizer(), token_id)
        top_values, top_ids = row.topk(num_top)
        assert list(entry)[1:] == [t for t in top_ids.tolist() if t != token_id], j
        for rank, (value, top_id) in enumerate(zip(top_values.tolist(), top_ids.tolist(),
                                                   strict=True), start=1):
            assert abs(entry[top_id].logprob - value) < TOLERANCE, (j, rank)
            if top_id != token_id:
                assert entry[top_id].rank == rank
            assert entry[top_id].decoded_token is not None


def new_llm(model_dir: Path, **engine_args: object) -> LLM:
    # a small explicit pool: the default CPU budget would zero gigabytes for every engine
    engine_args.setdefault("num_blocks", 64)
    return LLM(str(model_dir), **device_args(dtype="float32", **engine_args))


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
        ) -> tuple[dict[str, list[RequestOutput]], int]:
    """Every output of each request, in order, and the prefix-cache hits (tokens) on the way."""
    for request_id, (prompt, sampling_params) in requests.items():
        engine.add_request(request_id, prompt, sampling_params)
    outputs: dict[str, list[RequestOutput]] = {request_id: [] for request_id in requests}
    hits = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id].append(output)
        hits += engine.last_step_stats.prefix_cache_hits
    return outputs, hits


def assert_no_leaks(engine: LLMEngine) -> None:
    manager = engine.core.kv_cache_manager
    assert not engine.has_unfinished_requests()
    assert manager.num_free_blocks == manager.num_total_blocks


# ---- against transformers -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logprobs_match_transformers(arch: str, tiny_model_dirs: dict[str, Path],
                                            hf_models: dict[str, transformers.PreTrainedModel]
                                            ) -> None:
    llm = new_llm(tiny_model_dirs[arch])
    prompts = [make_prompt(21, 1), make_prompt(13, 2), make_prompt(9, 3)]
    # one batch: rows that ask (k = 5, k = 0) around a row that does not
    outputs = llm.generate(prompts, [params(5), params(None), params(0)])
    assert_matches(outputs[0].prompt_logprobs, prompts[0], hf_models[arch], 5)
    assert outputs[1].prompt_logprobs is None
    assert_matches(outputs[2].prompt_logprobs, prompts[2], hf_models[arch], 0)
    assert all(len(output.outputs[0].token_ids) == 3 for output in outputs)
    assert_no_leaks(llm.llm_engine)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_and_sliced_lm_head(arch: str, tiny_model_dirs: dict[str, Path],
                                            hf_models: dict[str, transformers.PreTrainedModel],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # slices of 3 rows: chunks of 8 tokens each cross a slice boundary
    monkeypatch.setattr(model_runner_module, "PROMPT_LOGPROB_SLICE", 3)
    llm = new_llm(tiny_model_dirs[arch], max_num_batched_tokens=8)
    prompts = [make_prompt(30, 4), make_prompt(19, 5)]
    outputs = llm.generate(prompts, [params(4), params(2)])
    assert_matches(outputs[0].prompt_logprobs, prompts[0], hf_models[arch], 4)
    assert_matches(outputs[1].prompt_logprobs, prompts[1], hf_models[arch], 2)
    assert_no_leaks(llm.llm_engine)


def test_a_prefix_cache_candidate_is_recomputed(
        tiny_model_dirs: dict[str, Path],
        hf_models: dict[str, transformers.PreTrainedModel]) -> None:
    llm = new_llm(tiny_model_dirs["llama"])
    prompt = make_prompt(40, 6)  # two full blocks of 16
    first = llm.generate([prompt], params(None))[0]
    assert first.prompt_logprobs is None and first.num_cached_tokens == 0
    again = llm.generate([prompt], params(3))[0]
    assert again.num_cached_tokens == 0  # no lookup: every position had to yield logits
    assert_matches(again.prompt_logprobs, prompt, hf_models["llama"], 3)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert_no_leaks(llm.llm_engine)


def test_a_sequence_with_prompt_logprobs_still_registers_its_blocks(
        tiny_model_dirs: dict[str, Path]) -> None:
    llm = new_llm(tiny_model_dirs["llama"])
    prompt = make_prompt(40, 7)
    llm.generate([prompt], params(1))
    assert llm.generate([prompt], params(None))[0].num_cached_tokens == 32


def test_block_multiple_and_one_token_prompts(
        tiny_model_dirs: dict[str, Path],
        hf_models: dict[str, transformers.PreTrainedModel]) -> None:
    llm = new_llm(tiny_model_dirs["llama"], block_size=16)
    exact = make_prompt(32, 8)
    llm.generate([exact], params(None))  # its first block is now a prefix-cache candidate
    outputs = llm.generate([exact, [17]], params(2))
    assert_matches(outputs[0].prompt_logprobs, exact, hf_models["llama"], 2)
    assert outputs[0].num_cached_tokens == 0
    assert outputs[1].prompt_logprobs == [None]  # nothing predicts a first token
    assert len(outputs[1].outputs[0].token_ids) == 3
    assert_no_leaks(llm.llm_engine)


def test_n_siblings_share_the_prompt_and_only_the_first_computes_them(
        tiny_model_dirs: dict[str, Path],
        hf_models: dict[str, transformers.PreTrainedModel]) -> None:
    llm = new_llm(tiny_model_dirs["llama"])
    engine = llm.llm_engine
    sampling = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=4, ignore_eos=True,
                              prompt_logprobs=2, output_kind=RequestOutputKind.FINAL_ONLY)
    assert engine._sequence_params(sampling, 0).prompt_logprobs == 2
    assert engine._sequence_params(sampling, 1).prompt_logprobs is None
    prompt = make_prompt(40, 9)
    outputs, hits = run(engine, {"r": (prompt, sampling)})
    [final] = outputs["r"]
    assert len(final.outputs) == 2
    assert_matches(final.prompt_logprobs, prompt, hf_models["llama"], 2)
    assert hits == 32  # the second sibling hit the first one's two full prompt blocks
    assert_no_leaks(engine)


@pytest.mark.parametrize("kind", list(RequestOutputKind))
def test_output_kinds(kind: RequestOutputKind, tiny_model_dirs: dict[str, Path],
                      hf_models: dict[str, transformers.PreTrainedModel]) -> None:
    engine = new_llm(tiny_model_dirs["llama"], max_num_batched_tokens=8).llm_engine
    prompt = make_prompt(20, 10)
    outputs, _ = run(engine, {"r": (prompt, params(3, max_tokens=4, output_kind=kind))})
    carrying = [i for i, output in enumerate(outputs["r"]) if output.prompt_logprobs is not None]
    if kind is RequestOutputKind.DELTA:
        assert len(outputs["r"]) == 4 and carrying == [0]  # with the first token, once
    elif kind is RequestOutputKind.CUMULATIVE:
        assert len(outputs["r"]) == 4 and carrying == [0, 1, 2, 3]
    else:
        assert len(outputs["r"]) == 1 and carrying == [0]
    assert_matches(outputs["r"][carrying[0]].prompt_logprobs, prompt, hf_models["llama"], 3)
    assert_no_leaks(engine)


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 16])
def test_preemption_by_recompute_does_not_repeat_them(
        max_num_batched_tokens: int, tiny_model_dirs: dict[str, Path],
        hf_models: dict[str, transformers.PreTrainedModel]) -> None:
    # 8 usable blocks of 16 tokens; four sequences of up to 70 tokens want 20 of them
    engine = new_llm(tiny_model_dirs["llama"], num_blocks=9, block_size=16,
                     max_num_batched_tokens=max_num_batched_tokens).llm_engine
    prompts = {f"r{i}": make_prompt(30 + 3 * i, 20 + i) for i in range(4)}
    sampling = params(2, max_tokens=30, output_kind=RequestOutputKind.DELTA)
    outputs, _ = run(engine, {rid: (prompt, sampling) for rid, prompt in prompts.items()})
    assert engine.core.scheduler.num_preemptions > 0
    for request_id, prompt in prompts.items():
        carrying = [o.prompt_logprobs for o in outputs[request_id] if o.prompt_logprobs]
        assert len(carrying) == 1, request_id
        assert_matches(carrying[0], prompt, hf_models["llama"], 2)
        assert sum(len(o.outputs[0].token_ids) for o in outputs[request_id]) == 30
    assert_no_leaks(engine)


def test_a_failed_pass_that_is_retried_leaves_no_duplicates(
        tiny_model_dirs: dict[str, Path], hf_models: dict[str, transformers.PreTrainedModel],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The poisoned sequence's decode pass fails after computing everything, while the other
    is mid-prefill in the same batch: that pass's prompt logprobs are dropped, the retry's
    kept."""
    engine = new_llm(tiny_model_dirs["llama"], max_num_batched_tokens=12).llm_engine
    runner = engine.core.runner
    execute = runner.execute
    faults: list[int] = []

    def execute_then_fail(rows: abc.Sequence[ScheduledRow],
                          block_ids: dict[str, list[int]]) -> object:
        output = execute(rows, block_ids)
        if any(row.sequence.sequence_id == "poison" and row.sequence.num_output_tokens >= 1
               for row in rows):
            faults.append(len(rows))
            raise RuntimeError("injected fault after the pass")
        return output

    monkeypatch.setattr(runner, "execute", execute_then_fail)
    prompt = make_prompt(40, 11)
    final_only = RequestOutputKind.FINAL_ONLY
    outputs, _ = run(engine, {"poison": ([5, 6, 7, 8], params(None, output_kind=final_only)),
                              "good": (prompt, params(3, output_kind=final_only))})
    # the whole batch failed (twice: the retries start with it) before the poisoned one alone
    assert faults[0] == 2 and faults[-1] == 1
    assert outputs["poison"][-1].error is not None
    [final] = outputs["good"]
    assert final.error is None
    assert_matches(final.prompt_logprobs, prompt, hf_models["llama"], 3)
    assert_no_leaks(engine)


# ---- bookkeeping, without a model -----------------------------------------------------------


def _sequence(prompt_len: int, num_top: int | None = 2) -> Sequence:
    return Sequence(sequence_id="s", prompt_token_ids=list(range(100, 100 + prompt_len)),
                    sampling_params=SamplingParams(prompt_logprobs=num_top), arrival_time=0.0,
                    max_tokens=4)


def _positions(sequence: Sequence, start: int, end: int,
               offset: int = 0) -> tuple[list[int], list[int]]:
    rows = PromptLogprobRows()
    rows.add(ScheduledRow(sequence, start, end), offset)
    return rows.hidden_indices, rows.target_token_ids


def _fake_entries(num: int) -> list[list[tuple[int, float, int]]]:
    return [[(1, -1.0, 1)] for _ in range(num)]


def test_rows_cover_each_prompt_token_once_across_chunks_and_recompute() -> None:
    sequence = _sequence(10)
    prompt = sequence.prompt_token_ids
    # chunk [0, 4) at batch offset 3: positions 0..3 predict prompt tokens 1..4
    assert _positions(sequence, 0, 4, offset=3) == ([3, 4, 5, 6], prompt[1:5])
    sequence.add_prompt_logprobs(_fake_entries(4))
    # preempted mid-prefill and recomputed from 0: positions 0..3 run for the KV only
    assert _positions(sequence, 0, 8) == ([4, 5, 6, 7], prompt[5:9])
    sequence.add_prompt_logprobs(_fake_entries(4))
    # the last chunk: position 9 samples the first output token, it predicts no prompt token
    assert _positions(sequence, 8, 10) == ([0], prompt[9:10])
    sequence.add_prompt_logprobs(_fake_entries(1))
    assert not sequence.needs_prompt_logprobs
    sequence.append_output_token_id(7)
    assert _positions(sequence, 0, 11) == ([], [])  # a recompute after the first token
    taken = sequence.take_prompt_logprobs()
    assert taken is not None and len(taken) == 9
    assert sequence.take_prompt_logprobs() is None  # handed out once


def test_sequences_that_do_not_ask_add_no_rows() -> None:
    assert _positions(_sequence(10, num_top=None), 0, 10) == ([], [])
    one_token = _sequence(1)
    assert _positions(one_token, 0, 1) == ([], [])
    assert not one_token.needs_prompt_logprobs
    assert one_token.take_prompt_logprobs() == []


def test_prefix_lookups_are_skipped_until_the_prompt_logprobs_are_complete() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=4)
    plain = _sequence(10, num_top=None)
    manager.allocate_slots(plain, 10, *manager.get_computed_blocks(plain))
    manager.free(plain)
    asking = _sequence(10)
    assert manager.get_computed_blocks(asking) == ([], 0)
    asking.add_prompt_logprobs(_fake_entries(9))  # complete: a recompute may hit again
    blocks, num_cached = manager.get_computed_blocks(asking)
    assert num_cached == 8 and len(blocks) == 2


def test_the_output_processor_shapes_them_as_vllm_does() -> None:
    processor = OutputProcessor(fake_tokenizer())
    prompt = [40, 41, 42]
    processor.add_request("r", ["r"], prompt,
                          SamplingParams(prompt_logprobs=1,
                                         output_kind=RequestOutputKind.DELTA), 0.0)
    # the prompt token 41 is also the top-1: it appears once, first
    positions = [[(41, -0.5, 1), (41, -0.5, 1)], [(42, -3.0, 4), (9, -0.2, 1)]]
    first = processor.process([EngineCoreOutput("r", [5], prompt_logprobs=positions)])
    text = {t: decode_token(fake_tokenizer(), t) for t in (41, 42, 9)}
    assert first.outputs[0].prompt_logprobs == [
        None, {41: Logprob(-0.5, 1, text[41])},
        {42: Logprob(-3.0, 4, text[42]), 9: Logprob(-0.2, 1, text[9])}]
    second = processor.process([EngineCoreOutput("r", [6], finish_reason="length")])
    assert second.outputs[0].prompt_logprobs is None  # DELTA: once

"""The engine end to end on tiny random checkpoints: greedy outputs token-identical to
transformers for every architecture, under prefix caching, chunked prefill and preemption;
seeded sampling, stop conditions, n > 1, and no KV block leaks."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from engine import LLM, LLMEngine, RequestOutput, RequestOutputKind, SamplingParams
from tests.devices import device_args
from tests.tiny_models import ARCHITECTURES, greedy_reference

NUM_NEW_TOKENS = 24
PROMPT_LENGTHS = (3, 9, 17, 33, 57, 80)


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENGTHS]
    prompts.append(prompts[-1][:40] + [rng.randrange(3, 512) for _ in range(20)])  # shared prefix
    return prompts


def greedy(num_tokens: int = NUM_NEW_TOKENS, **kwargs: object) -> SamplingParams:
    # min_tokens mirrors transformers' min_new_tokens: EOS is masked until num_tokens
    return SamplingParams(temperature=0.0, max_tokens=num_tokens, min_tokens=num_tokens, **kwargs)


def reference_outputs(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' own greedy generate, one prompt at a time, fp32."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return greedy_reference(model, prompts, NUM_NEW_TOKENS)


@pytest.fixture(scope="module")
def references(tiny_model_dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    prompts = make_prompts()
    return {arch: reference_outputs(tiny_model_dirs[arch], prompts) for arch in ARCHITECTURES}


def assert_no_leaks(llm: LLM) -> None:
    manager = llm.llm_engine.core.kv_cache_manager
    assert not llm.llm_engine.has_unfinished_requests()
    assert manager.num_free_blocks == manager.num_total_blocks
    assert manager.usage == 0.0


VARIANTS = {
    "default": {},
    "no_prefix_caching": {"enable_prefix_caching": False},
    "chunked_prefill": {"max_num_batched_tokens": 20},
    "preemption": {"num_blocks": 12, "block_size": 16},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers(arch: str, variant: str, tiny_model_dirs: dict[str, Path],
                                     references: dict[str, list[list[int]]]) -> None:
    llm = LLM(str(tiny_model_dirs[arch]), **device_args(dtype="float32", **VARIANTS[variant]))
    outputs = llm.generate(make_prompts(), greedy())
    for output, expected in zip(outputs, references[arch], strict=True):
        assert output.outputs[0].token_ids == expected
        assert output.outputs[0].finish_reason == "length"
    assert len(set(map(tuple, references[arch]))) > 1  # the reference is not degenerate
    if variant == "preemption":
        assert llm.llm_engine.core.scheduler.num_preemptions > 0
    assert_no_leaks(llm)


@pytest.fixture(scope="module")
def llama(tiny_model_dirs: dict[str, Path]) -> LLM:
    return LLM(str(tiny_model_dirs["llama"]), **device_args(dtype="float32", num_blocks=256))


def test_seeded_sampling_is_independent_of_the_batch(llama: LLM) -> None:
    prompts = make_prompts(seed=1)
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, min_tokens=16)
    alone = llama.generate([prompts[2]], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=16, seed=i) for i in range(7)]
    batch = llama.generate(prompts[:2] + prompts[3:] + [prompts[2]], others[:6] + [seeded])
    assert batch[-1].outputs[0].token_ids == alone
    unseeded = llama.generate([prompts[2]] * 2, SamplingParams(temperature=1.0, max_tokens=16))
    assert unseeded[0].outputs[0].token_ids != alone or unseeded[1].outputs[0].token_ids != alone


def test_prefix_cache_reuses_a_finished_requests_blocks(tiny_model_dirs: dict[str, Path]) -> None:
    rng = random.Random(5)
    prefix = [rng.randrange(3, 512) for _ in range(64)]
    second = prefix + [rng.randrange(3, 512) for _ in range(7)]
    cached = LLM(str(tiny_model_dirs["qwen2"]), **device_args(dtype="float32"))
    cached.generate([prefix + [7, 8, 9]], greedy(8))
    with_cache = cached.generate([second], greedy(8))[0]
    uncached = LLM(str(tiny_model_dirs["qwen2"]),
                   **device_args(dtype="float32", enable_prefix_caching=False))
    without_cache = uncached.generate([second], greedy(8))[0]
    assert with_cache.num_cached_tokens >= 48
    assert without_cache.num_cached_tokens == 0
    assert with_cache.outputs[0].token_ids == without_cache.outputs[0].token_ids


def test_stop_string_spanning_tokens_is_excluded(llama: LLM) -> None:
    prompt = make_prompts(seed=2)[3]
    full = llama.generate([prompt], greedy(24))[0].outputs[0]
    tokenizer = llama.tokenizer
    # a stop string made of the tail of token 5 and the head of token 6
    piece_5 = tokenizer.decode(full.token_ids[5:6])
    piece_6 = tokenizer.decode(full.token_ids[6:7])
    assert piece_5 and piece_6
    stop = piece_5[-1:] + piece_6[:1]
    position = full.text.find(stop)
    assert position >= 0
    stopped = llama.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24,
                                                      stop=[stop]))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == full.text[:position]
    included = llama.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop],
                                                       include_stop_str_in_output=True))
    assert included[0].outputs[0].text == full.text[:position + len(stop)]
    assert_no_leaks(llama)


def test_stop_token_ids_max_tokens_and_min_tokens(llama: LLM) -> None:
    prompt = make_prompts(seed=3)[2]
    full = llama.generate([prompt], greedy(24))[0].outputs[0].token_ids
    stop_id = full[4]
    first = full.index(stop_id)
    stopped = llama.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24,
                                                      stop_token_ids=[stop_id]))[0].outputs[0]
    assert stopped.token_ids == full[:first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id
    # below min_tokens the stop token cannot be sampled at all, so the output diverges there
    late_params = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=first + 2,
                                 stop_token_ids=[stop_id])
    late = llama.generate([prompt], late_params)[0].outputs[0]
    assert len(late.token_ids) >= first + 2
    assert stop_id not in late.token_ids[:first + 1]
    short = llama.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert short.outputs[0].token_ids == full[:5] and short.outputs[0].finish_reason == "length"


def test_eos_stops_unless_ignored(llama: LLM) -> None:
    eos = llama.llm_engine.eos_token_ids[0]
    prompt = make_prompts(seed=4)[1]
    # bias EOS up so greedy picks it at once
    biased = dict(temperature=0.0, max_tokens=10, logit_bias={eos: 100.0})
    stopped = llama.generate([prompt], SamplingParams(**biased))[0].outputs[0]
    assert stopped.token_ids == [eos] and stopped.finish_reason == "stop"
    ignored = llama.generate([prompt], SamplingParams(**biased, ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == [eos] * 10 and ignored.finish_reason == "length"


def test_n_sequences_share_the_prompt(llama: LLM) -> None:
    prompt = make_prompts(seed=6)[5]  # 80 tokens: five full blocks to share
    output = llama.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=11,
                                                     max_tokens=12, min_tokens=12))[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
    again = llama.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=11,
                                                    max_tokens=12, min_tokens=12))[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in output.outputs]
    assert_no_leaks(llama)


def test_aborts_mid_prefill_and_mid_decode_leak_nothing(tiny_model_dirs: dict[str, Path]) -> None:
    llm = LLM(str(tiny_model_dirs["qwen3"]),
              **device_args(dtype="float32", max_num_batched_tokens=16))
    engine = llm.llm_engine
    prompts = make_prompts(seed=7)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=30))
    for _ in range(4):
        engine.step()
    mid_prefill = [r for r in engine.core.scheduler.running
                   if 0 < r.num_computed_tokens < r.num_prompt_tokens]
    mid_decode = [r for r in engine.core.scheduler.running if r.num_output_tokens > 0]
    assert mid_prefill and mid_decode
    for sequence in mid_prefill + mid_decode + list(engine.core.scheduler.waiting)[:1]:
        outputs = engine.abort_request(sequence.sequence_id)  # n=1: the request's own id
        assert outputs and outputs[0].finished
        assert outputs[0].outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(llm)


def _run_one(engine: LLMEngine, request_id: str, prompt: list[int],
             params: SamplingParams) -> list[RequestOutput]:
    engine.add_request(request_id, prompt, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return outputs


def test_deltas_concatenate_to_the_final_text(llama: LLM) -> None:
    """DELTA outputs hold each step's part only; joined they are the CUMULATIVE outputs'
    last text and tokens, which in turn decode to that text."""
    engine = llama.llm_engine
    prompt = llama.tokenizer.encode("日本語のテキスト 🙂🚀 中文文本")
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40)
    deltas = _run_one(engine, "delta", prompt,
                      replace(params, output_kind=RequestOutputKind.DELTA))
    cumulative = _run_one(engine, "cumulative", prompt, params)
    final = cumulative[-1].outputs[0]
    assert cumulative[-1].finished and deltas[-1].finished and len(deltas) > 10
    assert "".join(d.outputs[0].text for d in deltas) == final.text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == final.token_ids
    assert [d.outputs[0].num_tokens for d in deltas] == list(range(1, len(deltas) + 1))
    assert final.text == llama.tokenizer.decode(final.token_ids, skip_special_tokens=True)
    only_final = _run_one(engine, "final", prompt,
                          replace(params, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(only_final) == 1 and only_final[0].outputs[0].text == final.text

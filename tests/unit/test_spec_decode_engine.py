"""Speculative decoding (n-gram) through the whole engine. On tiny real checkpoints: greedy
output token-identical to no speculation (logprobs too) on every architecture under chunked
prefill and preemption, and with penalties, bans and min_tokens; temperature-1 samples
distributed exactly as the target model says; seeded requests unchanged. On the fake runner:
stops, max_tokens and stop strings inside a verified run of tokens, logprobs per kept token,
a failing verification pass, an abort mid-verification, and who gets proposals (rows mixed in
a step, disable_by_batch_size, constrained sequences)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, abc
from pathlib import Path

import pytest
import torch
import transformers

from engine import LLM, LLMEngine, SamplingParams
from engine.core import CoreStepOutput, EngineCore
from engine.outputs import CompletionOutput, RequestOutputKind
from engine.sequence import Sequence, SequenceStatus
from engine.spec_decode.proposer import SpecDecodeStats
from tests.devices import device_args
from tests.fake_runner import (
    GUARD_S,
    FakeModelRunner,
    _following,
    all_blocks_free,
    fake_async_engine,
    fake_core,
    fake_llm_engine,
    fake_logprobs,
    greedy_tokens,
    running,
    text_token_ids,
    tokenizer,
    until,
)
from tests.tiny_models import ARCHITECTURES, save_tiny_model
from tests.unit.test_core import (
    NORMAL_PROMPTS,
    PROMPT,
    _after_tokens,
    _assert_all_blocks_free,
    _mixed_requests,
    _request,
    _run,
)
from tests.unit.test_llm import assert_no_leaks


def ngram_config(**overrides: object) -> dict[str, object]:
    """The n-gram method, speculating at any batch size; not adaptive, so every decoding row
    verifies as many proposals as the lookup finds."""
    return {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
            "prompt_lookup_max": 3, "disable_by_batch_size": None, "adaptive": False,
            **overrides}


class SpecTally:
    """The verifications of every step of `core`, summed (wraps core.step)."""

    def __init__(self, core: EngineCore) -> None:
        self.total = SpecDecodeStats()
        self.per_step: list[SpecDecodeStats | None] = []
        step = core.step

        def counted_step() -> CoreStepOutput:
            output = step()
            spec = core.last_stats.spec
            self.per_step.append(spec)
            if spec is not None:
                self.total.num_drafts += spec.num_drafts
                self.total.num_draft_tokens += spec.num_draft_tokens
                self.total.num_accepted_tokens += spec.num_accepted_tokens
            return output

        core.step = counted_step  # type: ignore[method-assign]

    @property
    def num_rejected_tokens(self) -> int:
        return self.total.num_draft_tokens - self.total.num_accepted_tokens


# ---- greedy: token-identical on every architecture -------------------------------------------

NUM_NEW_TOKENS = 32
# 4 sequences of up to 58 tokens need up to 60 blocks of 4; the pool has 32: preemption
PRESSURE = {"block_size": 4, "num_blocks": 33, "max_num_batched_tokens": 16}


def repetitive_requests(seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """Prompts that repeat a motif, so lookups find proposals. A random checkpoint seldom
    continues its prompt's n-grams (nor a copy of its own greedy output placed earlier in
    the prompt: a changed context changes its continuation, and some architectures then
    accepted next to nothing), so two requests bias a few of the motif's tokens up: their
    greedy outputs cycle among them, and the verification accepts some proposals and
    rejects others, both decided by the model's logits."""
    rng = random.Random(seed)
    motif = [rng.randrange(3, 512) for _ in range(6)]
    noise = [rng.randrange(3, 512) for _ in range(17)]

    def greedy(**params: object) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True,
                              logprobs=2, **params)  # type: ignore[arg-type]

    return [
        (motif * 3 + noise[:2], greedy(logit_bias={t: 4.0 for t in motif[:4]})),
        (noise[:9] + motif * 2 + noise[9:14], greedy()),
        ([5, 9] * 6, greedy(logit_bias={5: 3.0, 9: 3.0, motif[0]: 3.0})),
        (noise, greedy()),
    ]


def run_requests(engine: LLMEngine,
                 requests: abc.Sequence[tuple[list[int], SamplingParams]]
                 ) -> list[CompletionOutput]:
    """Every request to completion, stepping the engine: the final outputs in request order."""
    for index, (prompt, params) in enumerate(requests):
        engine.add_request(str(index), prompt, params)
    finished: dict[str, CompletionOutput] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0]
    return [finished[str(index)] for index in range(len(requests))]


def assert_same_logprobs(spec: CompletionOutput, plain: CompletionOutput) -> None:
    assert spec.logprobs is not None and plain.logprobs is not None
    assert len(spec.logprobs) == len(spec.token_ids) == len(plain.logprobs)
    for position, (got, expected) in enumerate(zip(spec.logprobs, plain.logprobs, strict=True)):
        assert got.keys() == expected.keys(), f"position {position}: other top tokens"
        for token_id, logprob in expected.items():
            assert got[token_id].rank == logprob.rank
            assert got[token_id].logprob == pytest.approx(logprob.logprob, abs=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_is_token_identical_under_chunking_and_preemption(
        arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    requests = repetitive_requests()
    assert max(len(prompt) for prompt, _ in requests) > PRESSURE["max_num_batched_tokens"]
    model = str(tiny_model_dirs[arch])
    plain = LLM(model, **device_args(dtype="float32", **PRESSURE))
    expected = run_requests(plain.llm_engine, requests)
    spec = LLM(model, speculative_config=ngram_config(),
               **device_args(dtype="float32", **PRESSURE))
    tally = SpecTally(spec.llm_engine.core)
    outputs = run_requests(spec.llm_engine, requests)
    for got, want in zip(outputs, expected, strict=True):
        assert got.token_ids == want.token_ids
        assert got.finish_reason == want.finish_reason == "length"
        assert_same_logprobs(got, want)
    # what made this a test of speculation: verified proposals, kept and thrown away, while
    # sequences were preempted and prompts chunked
    assert tally.total.num_accepted_tokens > 0 and tally.num_rejected_tokens > 0
    assert spec.llm_engine.core.scheduler.num_preemptions > 0
    assert plain.llm_engine.core.scheduler.num_preemptions > 0
    assert_no_leaks(spec)


def test_penalties_bans_and_min_tokens_apply_at_every_verified_position(
        tiny_llama_dir: Path) -> None:
    """Each verified position samples from the output as if the proposals before it were
    accepted: penalties, bad words, min_tokens and allowed ids come out as without."""
    rng = random.Random(3)
    motif = [rng.randrange(3, 512) for _ in range(5)]
    repeats = {t: 4.0 for t in motif}  # outputs that repeat: proposals to verify
    settings: list[dict[str, object]] = [
        {"presence_penalty": 0.3, "logit_bias": repeats},
        {"frequency_penalty": 0.2, "logit_bias": repeats},
        {"repetition_penalty": 1.1, "logit_bias": repeats},
        {"min_tokens": 10, "stop_token_ids": [motif[0]], "logit_bias": repeats},
        {"bad_words": [" the"], "logit_bias": repeats},
        {"allowed_token_ids": [*motif, 7, 8]},
    ]
    requests = [(motif * 3, SamplingParams(temperature=0.0, max_tokens=24, logprobs=1,
                                           ignore_eos=True, **row))  # type: ignore[arg-type]
                for row in settings]
    args = device_args(dtype="float32", num_blocks=64, block_size=4)
    expected = run_requests(LLM(str(tiny_llama_dir), **args).llm_engine, requests)
    spec = LLM(str(tiny_llama_dir), speculative_config=ngram_config(), **args)
    tally = SpecTally(spec.llm_engine.core)
    outputs = run_requests(spec.llm_engine, requests)
    for got, want in zip(outputs, expected, strict=True):
        assert got.token_ids == want.token_ids
        assert_same_logprobs(got, want)
    assert tally.total.num_accepted_tokens > 0 and tally.num_rejected_tokens > 0
    assert_no_leaks(spec)


# ---- temperature 1: the target's distribution, exactly ---------------------------------------

SMALL_VOCAB = 8  # so that the joint law of three tokens has 512 outcomes, each computable
SMALL_PROMPT = [3, 4, 5]
NUM_SAMPLES = 20_000


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer llama over the tokenizer's first 8 ids, peaked enough (wide, large init)
    that its own likely continuations are often accepted: about a quarter of the proposals
    for sample_prompt() are."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("small-vocab"), seed=2,
                           vocab_size=SMALL_VOCAB, num_hidden_layers=1, hidden_size=128,
                           intermediate_size=256, initializer_range=0.5)


@pytest.fixture(scope="module")
def small_prompt(small_vocab_dir: Path) -> list[int]:
    """SMALL_PROMPT and the model's greedy continuation of it: the lookups then propose the
    model's own likely tokens. 13 tokens: with blocks of 4, a prompt's prefix-cache hit
    leaves one token to compute, so every copy of it prefills as a batched decode row."""
    llm = LLM(str(small_vocab_dir), **device_args(dtype="float32", num_blocks=16))
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    return SMALL_PROMPT + llm.generate([SMALL_PROMPT], params)[0].outputs[0].token_ids


def exact_joint_law(model_dir: Path, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """P(first three generated tokens) at temperature 1, from transformers' logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)

    def probs(context: list[int]) -> list[float]:
        logits = model(torch.tensor([context])).logits[0, -1]  # [vocab_size]
        return torch.softmax(logits, dim=-1).tolist()

    law = {}
    with torch.no_grad():
        first = probs(prompt)
        for a in range(SMALL_VOCAB):
            second = probs(prompt + [a])
            for b in range(SMALL_VOCAB):
                third = probs(prompt + [a, b])
                for c in range(SMALL_VOCAB):
                    law[(a, b, c)] = first[a] * second[b] * third[c]
    return law


def chi_square_p_value(counts: Counter[tuple[int, ...]], law: dict[tuple[int, ...], float],
                       num_samples: int) -> float:
    """Goodness of fit of `counts` to `law`. Outcomes expected fewer than 5 times share one
    bin (joined to the least likely other bin while it is still short of 5); the p-value is
    the chi-square survival function, the regularized upper incomplete gamma function."""
    by_expected = sorted(law, key=law.__getitem__, reverse=True)
    bins = [[o] for o in by_expected if law[o] * num_samples >= 5]
    rest = [o for o in by_expected if law[o] * num_samples < 5]
    if rest:
        if sum(law[o] for o in rest) * num_samples >= 5:
            bins.append(rest)
        else:
            bins[-1] += rest
    statistic = 0.0
    for outcomes in bins:
        expected = num_samples * sum(law[o] for o in outcomes)
        statistic += (sum(counts[o] for o in outcomes) - expected) ** 2 / expected
    half_degrees = torch.tensor((len(bins) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(half_degrees,
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def test_sampling_keeps_the_target_distribution(small_vocab_dir: Path,
                                                small_prompt: list[int]) -> None:
    """20k sequences sampled at temperature 1 with speculation: the joint law of their first
    three tokens is the model's (chi-square, p > 0.001). max_tokens 4 lets the second step
    verify 2 proposals: the second and third tokens come from accepted proposals, from the
    token drawn where one was rejected, or from the token after an accepted run.

    The reference is the exact law (8^3 outcomes, from transformers), not as many samples
    drawn without speculation: a stronger test at half the cost. The samples skip the
    output processor (it cannot change tokens) and go straight to the core, 2048 a step:
    20k take about 8 s on two cores."""
    prompt = small_prompt
    law = exact_joint_law(small_vocab_dir, prompt)
    llm = LLM(str(small_vocab_dir), speculative_config=ngram_config(
                  num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=2),
              **device_args(dtype="float32", block_size=4, num_blocks=8192, max_num_seqs=2048,
                            max_num_batched_tokens=8192, seed=1))
    engine = llm.llm_engine
    tally = SpecTally(engine.core)
    params = engine.prepare_request("template", prompt, SamplingParams(
        temperature=1.0, max_tokens=4, ignore_eos=True)).sequences[0].sampling_params
    sequences = [Sequence(str(i), list(prompt), params, arrival_time=0.0, max_tokens=4)
                 for i in range(NUM_SAMPLES)]
    for sequence in sequences:
        engine.core.add_sequence(sequence)
    while engine.core.has_unfinished_sequences():
        engine.core.step()
    assert all(s.status == SequenceStatus.FINISHED_LENGTH for s in sequences)
    counts = Counter(tuple(s.output_token_ids[:3]) for s in sequences)
    assert chi_square_p_value(counts, law, NUM_SAMPLES) > 1e-3
    # the draws went through verification (about two per sequence), and proposals were
    # often accepted and often rejected
    assert tally.total.num_drafts > NUM_SAMPLES
    assert 0.1 < tally.total.num_accepted_tokens / tally.total.num_draft_tokens < 0.9
    manager = engine.core.kv_cache_manager
    assert manager.num_free_blocks == manager.num_total_blocks


def test_seeded_requests_draw_the_same_tokens(small_vocab_dir: Path,
                                              small_prompt: list[int]) -> None:
    """Seeded tokens are drawn per output position: verifying proposals changes none."""
    seeds = (0, 1, 7, 1234, 2**40 + 3, 99)
    requests = [(small_prompt[:len(small_prompt) - i],
                 SamplingParams(temperature=0.8, seed=seed, max_tokens=16, ignore_eos=True))
                for i, seed in enumerate(seeds)]
    plain = LLM(str(small_vocab_dir), **device_args(dtype="float32", num_blocks=64))
    expected = run_requests(plain.llm_engine, requests)
    spec = LLM(str(small_vocab_dir), speculative_config=ngram_config(),
               **device_args(dtype="float32", num_blocks=64))
    tally = SpecTally(spec.llm_engine.core)
    outputs = run_requests(spec.llm_engine, requests)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    assert len({tuple(o.token_ids) for o in outputs}) > 1  # the seeds do differ
    assert tally.total.num_accepted_tokens > 0 and tally.num_rejected_tokens > 0
    assert_no_leaks(spec)


# ---- the fake runner: where a verified run of tokens meets a stop, a limit or an abort -------


class ScriptedProposer:
    """Proposes the fake's own greedy continuation (accepted in full), with the proposal at
    `wrong_at` replaced by another token (rejected there); only for the sequences in `only`,
    when given."""

    def __init__(self, num_tokens: int = 4, wrong_at: int | None = None,
                 only: abc.Container[str] | None = None) -> None:
        self.num_tokens = num_tokens
        self.wrong_at = wrong_at
        self.only = only

    def propose(self, running: abc.Sequence[Sequence]) -> None:
        for sequence in running:
            sequence.spec_token_ids = []
            if not sequence.is_decoding or (self.only is not None
                                            and sequence.sequence_id not in self.only):
                continue
            proposals = greedy_tokens(sequence.all_token_ids, self.num_tokens)
            if self.wrong_at is not None:
                proposals[self.wrong_at] = _following(proposals[self.wrong_at], 1)
            sequence.spec_token_ids = proposals

    def observe(self, rows: object, sampled_token_ids: object) -> None:
        """Learns nothing: the script is fixed."""


def scripted_core(proposer: ScriptedProposer, **engine_args: object
                  ) -> tuple[EngineCore, FakeModelRunner, SpecTally]:
    core, runner = fake_core(speculative_config=ngram_config(), **engine_args)
    core.proposer = proposer
    return core, runner, SpecTally(core)


def _first_at(tokens: list[int], index: int) -> int:
    """tokens[index], checked to occur there first: a stop on it ends the output there."""
    assert tokens[index] not in tokens[:index]
    return tokens[index]


@pytest.mark.parametrize("stop", ["stop_token_ids", "eos"])
def test_a_stop_token_inside_verified_tokens_ends_the_output_there(stop: str) -> None:
    expected = greedy_tokens(PROMPT, 8)
    stop_id = _first_at(expected, 2)  # the second of 4 accepted proposals
    core, runner, tally = scripted_core(ScriptedProposer(4))
    stop_params: dict[str, object] = (
        {"stop_token_ids": (stop_id,)} if stop == "stop_token_ids"
        else {"ignore_eos": False, "eos_token_ids": (stop_id,)})
    request = _request("a", PROMPT, max_tokens=8, logprobs=1, **stop_params)
    run = _run(core, [request])
    # the second pass verified 4 proposals, all accepted, plus the token after them; the
    # sequence kept them up to the stop
    assert runner.passes == [[("a", 0, 10)], [("a", 10, 15)]]
    assert tally.per_step[1] is not None and tally.per_step[1].num_accepted_tokens == 4
    outputs = run.outputs("a")
    assert [o.new_token_ids for o in outputs] == [expected[:1], expected[1:3]]
    assert request.output_token_ids == expected[:3]
    assert outputs[-1].finish_reason == "stop"
    assert outputs[-1].stop_reason == (stop_id if stop == "stop_token_ids" else None)
    assert [o.new_logprobs for o in outputs] == [
        [fake_logprobs(t, 1) for t in o.new_token_ids] for o in outputs]
    _assert_all_blocks_free(core)


@pytest.mark.parametrize("max_tokens, verified_row", [(4, ("a", 10, 13)), (2, ("a", 10, 11))])
def test_max_tokens_caps_the_proposals(max_tokens: int, verified_row: tuple[str, int, int]
                                       ) -> None:
    """After one token, max_tokens 4 leaves room for 2 proposals and the token after them;
    max_tokens 2 for none (a plain decode row)."""
    core, runner, _ = scripted_core(ScriptedProposer(4))
    run = _run(core, [_request("a", PROMPT, max_tokens=max_tokens)])
    assert runner.passes == [[("a", 0, 10)], [verified_row]]
    assert run.tokens("a") == greedy_tokens(PROMPT, max_tokens)
    assert run.outputs("a")[-1].finish_reason == "length"
    _assert_all_blocks_free(core)


def _stop_string(tokens: list[int], index: int) -> str:
    """The text of tokens[index], checked to occur first where that token puts it."""
    decode = tokenizer().decode
    piece = decode(tokens[index:index + 1])
    assert piece and decode(tokens).find(piece) == len(decode(tokens[:index]))
    return piece


def test_a_stop_string_inside_verified_tokens_cuts_text_and_tokens() -> None:
    expected = greedy_tokens(PROMPT, 8)
    stop = _stop_string(expected, 2)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop=[stop],
                            logprobs=1)
    plain, _ = fake_llm_engine()
    [want] = run_requests(plain, [(PROMPT, params)])
    engine, runner = fake_llm_engine(speculative_config=ngram_config())
    engine.core.proposer = ScriptedProposer(4)
    [got] = run_requests(engine, [(PROMPT, params)])
    assert [rows for rows in runner.passes] == [[("0", 0, 10)], [("0", 10, 15)]]
    assert got.token_ids == want.token_ids == expected[:3]  # the stop's token is the last
    assert got.text == want.text == tokenizer().decode(expected[:2])  # the stop is not
    assert (got.finish_reason, got.stop_reason) == (want.finish_reason, want.stop_reason) == (
        "stop", stop)
    assert got.logprobs is not None and len(got.logprobs) == 3
    assert not engine.has_unfinished_requests()
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_logprobs_come_one_per_kept_token() -> None:
    core, runner, tally = scripted_core(ScriptedProposer(4, wrong_at=2))
    run = _run(core, [_request("a", PROMPT, max_tokens=10, logprobs=2)])
    outputs = run.outputs("a")
    # each pass after the first keeps 2 proposals and the token drawn where the third was
    assert [len(o.new_token_ids) for o in outputs] == [1, 3, 3, 3]
    assert [s.num_accepted_tokens for s in tally.per_step if s is not None] == [0, 2, 2, 2]
    assert run.tokens("a") == greedy_tokens(PROMPT, 10)
    for output in outputs:
        assert output.new_logprobs == [fake_logprobs(t, 2) for t in output.new_token_ids]
    _assert_all_blocks_free(core)


def test_rows_with_and_without_proposals_share_a_step() -> None:
    other_prompt = [60, 61, 62, 63, 64, 65]
    core, runner, tally = scripted_core(ScriptedProposer(3, only={"a"}))
    run = _run(core, [_request("a", PROMPT, max_tokens=7), _request("b", other_prompt,
                                                                    max_tokens=7)])
    assert runner.passes[1] == [("a", 10, 14), ("b", 6, 7)]
    second = tally.per_step[1]
    assert second is not None
    assert (second.num_drafts, second.num_draft_tokens, second.num_accepted_tokens) == (1, 3, 3)
    assert run.tokens("a") == greedy_tokens(PROMPT, 7)
    assert run.tokens("b") == greedy_tokens(other_prompt, 7)
    _assert_all_blocks_free(core)


def test_a_failing_verification_pass_fails_its_culprit_alone() -> None:
    culprit = "r2"
    baseline = _run(fake_core()[0], _mixed_requests(
        {rid: p for rid, p in NORMAL_PROMPTS.items() if rid != culprit}))
    core, runner, tally = scripted_core(ScriptedProposer(3, wrong_at=2))
    runner.fail_when = _after_tokens([culprit], 2)
    run = _run(core, _mixed_requests(NORMAL_PROMPTS))
    assert list(run.failed) == [culprit]
    assert len(run.tokens(culprit)) == 4  # its prefill token, then 2 accepted and 1 more
    for rid in NORMAL_PROMPTS.keys() - {culprit}:
        assert run.tokens(rid) == baseline.tokens(rid), f"{rid} was disturbed"
    assert tally.total.num_accepted_tokens > 0
    _assert_all_blocks_free(core)


def test_an_abort_during_verification_frees_every_block() -> None:
    engine, runner = fake_async_engine(speculative_config=ngram_config())
    engine.llm_engine.core.proposer = ScriptedProposer(4, wrong_at=1)
    runner.hold(after_passes=1)  # the prefill runs; the pass verifying proposals waits
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)

    async def run() -> None:
        async with running(engine, runner):
            stream = engine.generate("a", PROMPT, params)
            first = await anext(stream)
            assert first.outputs[0].token_ids == greedy_tokens(PROMPT, 1)
            assert await asyncio.to_thread(runner.held.wait, GUARD_S)
            assert runner.passes[-1] == [("a", 10, 15)]  # 1 + 4 slots, in 4 blocks
            assert engine.num_total_blocks - engine.num_free_blocks == 4
            await stream.aclose()  # type: ignore[attr-defined]  # the client leaves: abort
            runner.release_hold()
            await until(lambda: all_blocks_free(engine), "the aborted sequence's blocks free")

    asyncio.run(run())
    assert engine.llm_engine.stats().num_unfinished_requests == 0


# ---- the n-gram proposer in the core: who gets proposals -------------------------------------


def every_text_token() -> list[int]:
    """A prompt holding every token the fake generates: a one-token lookup always finds
    the last token earlier, so every decoding sequence gets proposals."""
    return list(text_token_ids())


def _widths(passes: list[list[tuple[str, int, int]]], sequence_id: str) -> list[int]:
    """The sequence's row widths (tokens computed) in each pass it was in, after its first."""
    return [end - start for rows in passes for sid, start, end in rows if sid == sequence_id][1:]


def test_speculation_pauses_while_more_sequences_run_than_disable_by_batch_size() -> None:
    core, runner = fake_core(speculative_config=ngram_config(
        disable_by_batch_size=2, prompt_lookup_min=1, prompt_lookup_max=1))
    tally = SpecTally(core)
    prompt = every_text_token()
    run = _run(core, [_request("short", prompt, max_tokens=3),
                      _request("long-1", prompt, max_tokens=12),
                      _request("long-2", prompt, max_tokens=12)])
    assert [len(rows) for rows in runner.passes[:3]] == [3, 3, 3]  # a prefill, 2 decodes
    assert all(end - start == 1 for rows in runner.passes[1:3] for _, start, end in rows)
    assert all(spec is not None and spec.num_drafts == 0 for spec in tally.per_step[:3])
    # with two left, both verify proposals (a one-token lookup always finds some), but in
    # the last step, where max_tokens leaves no room for any
    *verifying, last = runner.passes[3:]
    assert all(len(rows) == 2 for rows in runner.passes[3:])
    assert all(end - start > 1 for rows in verifying for _, start, end in rows)
    assert all(end - start == 1 for _, start, end in last)
    assert tally.total.num_drafts == 2 * len(verifying)
    for sequence_id, num_tokens in [("short", 3), ("long-1", 12), ("long-2", 12)]:
        assert run.tokens(sequence_id) == greedy_tokens(prompt, num_tokens)
    _assert_all_blocks_free(core)


class StubGrammar:
    """A constraint that allows anything and records the tokens it was advanced by."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def accept(self, token_id: int) -> bool:
        self.accepted.append(token_id)
        return True

    @property
    def is_finished(self) -> bool:
        return False

    @property
    def is_broken(self) -> bool:
        return False


def test_constrained_sequences_get_no_proposals() -> None:
    core, runner = fake_core(speculative_config=ngram_config(prompt_lookup_min=1,
                                                             prompt_lookup_max=1))
    prompt = every_text_token()
    constrained = _request("constrained", prompt, max_tokens=8)
    grammar = StubGrammar()
    constrained.grammar = grammar
    run = _run(core, [constrained, _request("free", prompt, max_tokens=8)])
    assert set(_widths(runner.passes, "constrained")) == {1}
    # the free twin verifies proposals, but in its last step (max_tokens leaves no room)
    *verifying, last = _widths(runner.passes, "free")
    assert all(width > 1 for width in verifying) and last == 1
    assert run.tokens("constrained") == run.tokens("free") == greedy_tokens(prompt, 8)
    assert grammar.accepted == run.tokens("constrained")  # advanced on kept tokens only
    _assert_all_blocks_free(core)

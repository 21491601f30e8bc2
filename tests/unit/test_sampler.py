"""Sampler tests: each processing step against a hand-written reference, sampling against the
softmax it should follow, seeded rows against themselves in other batches."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import (
    SamplingMetadata,
    apply_frequency_penalty,
    apply_min_p,
    apply_presence_penalty,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    bad_words_banned_ids,
    process_logits,
    sample,
    token_counts,
)
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
NEG_INF = float("-inf")


def build(params: list[SamplingParams], vocab_size: int, *,
          prompts: list[list[int]] | None = None, outputs: list[list[int]] | None = None,
          generators: list[torch.Generator | None] | None = None,
          banned: list[list[int]] | None = None) -> SamplingMetadata:
    num_seqs = len(params)
    return SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[] for _ in range(num_seqs)],
        outputs if outputs is not None else [[] for _ in range(num_seqs)],
        generators if generators is not None else [None] * num_seqs,
        banned if banned is not None else [[] for _ in range(num_seqs)],
        vocab_size, CPU,
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_logits(num_seqs: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_seqs, vocab_size, generator=seeded(seed)) * 2.0


def empirical(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab_size).float() / tokens.numel()


# ---- metadata -------------------------------------------------------------------------------

def test_build_leaves_unused_features_none() -> None:
    metadata = build([SamplingParams(temperature=0.0), SamplingParams()], vocab_size=10)
    assert metadata.top_k is None and metadata.top_p is None and metadata.min_p is None
    assert metadata.repetition_penalties is None and metadata.presence_penalties is None
    assert metadata.frequency_penalties is None
    assert metadata.prompt_token_ids is None and metadata.output_token_ids is None
    assert metadata.logit_bias is None and metadata.banned_token_ids is None
    assert metadata.max_num_logprobs is None
    assert not metadata.all_greedy and not metadata.all_random
    assert metadata.temperature.tolist() == [0.0, 1.0]


def test_greedy_metadata_samples_as_build_does_for_plain_greedy_rows() -> None:
    """The runner's shortcut for all-plain-greedy steps: what sample reads of it is what build
    gives for those params, seeds and sampling knobs that greedy ignores included."""
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, seed=7, top_k=3,
                                                              top_p=0.5, min_p=0.2)]
    assert all(p.is_plain_greedy for p in params)
    built = build(params, vocab_size=50, outputs=[[1, 2, 3], [4]],
                  generators=[None, seeded(7)])
    shortcut = SamplingMetadata.greedy(2, CPU)
    for name in ("repetition_penalties", "presence_penalties", "frequency_penalties",
                 "logit_bias", "allowed_token_ids", "banned_token_ids", "grammar_bitmask",
                 "max_num_logprobs", "all_greedy", "all_random", "generators"):
        assert getattr(shortcut, name) == getattr(built, name), name
    assert torch.equal(shortcut.temperature, built.temperature)
    logits = random_logits(2, 50)
    assert torch.equal(sample(logits, shortcut).sampled_token_ids,
                       sample(logits, built).sampled_token_ids)


@pytest.mark.parametrize("settings", [
    {"temperature": 0.5}, {"repetition_penalty": 1.1}, {"presence_penalty": 0.5},
    {"frequency_penalty": -0.5}, {"logit_bias": {3: 5.0}}, {"allowed_token_ids": [1, 2]},
    {"bad_words_token_ids": ((5, 6),)}, {"min_tokens": 2}, {"logprobs": 0}])
def test_anything_that_touches_the_logits_is_not_plain_greedy(settings: dict[str, object]
                                                               ) -> None:
    params = SamplingParams(**{"temperature": 0.0, **settings})  # type: ignore[arg-type]
    assert not params.is_plain_greedy


def test_build_fills_used_features() -> None:
    params = [SamplingParams(top_k=3, repetition_penalty=1.5, logprobs=2, seed=1),
              SamplingParams(top_k=-1, top_p=0.5, logprobs=5, temperature=0.0),
              SamplingParams(top_k=0, min_p=0.1, logit_bias={4: 1.0})]
    generators = [seeded(1), seeded(2), None]
    metadata = build(params, vocab_size=10, prompts=[[1, 2], [3], []],
                     outputs=[[5], [], [6, 7, 8]], generators=generators,
                     banned=[[], [9], []])
    assert metadata.top_k is not None and metadata.top_k.tolist() == [3, 10, 10]
    assert metadata.top_p is not None and metadata.top_p.tolist() == [1.0, 0.5, 1.0]
    assert metadata.min_p is not None and metadata.min_p.tolist() == pytest.approx([0, 0, 0.1])
    assert metadata.prompt_token_ids is not None
    assert metadata.prompt_token_ids.tolist() == [[1, 2], [3, 10], [10, 10]]
    assert metadata.output_token_ids is not None
    assert metadata.output_token_ids.tolist() == [[5, 10, 10], [10, 10, 10], [6, 7, 8]]
    assert metadata.presence_penalties is None and metadata.frequency_penalties is None
    assert metadata.logit_bias == [None, None, {4: 1.0}]
    assert metadata.banned_token_ids == [[], [9], []]
    assert metadata.generators == {0: generators[0]}  # the greedy row's generator is unused
    assert metadata.max_num_logprobs == 5
    assert metadata.prompt_token_ids.dtype == torch.int64


# ---- greedy ---------------------------------------------------------------------------------

def test_greedy_is_argmax() -> None:
    logits = random_logits(8, 50)
    metadata = build([SamplingParams(temperature=0.0)] * 8, 50)
    assert metadata.all_greedy
    assert torch.equal(sample(logits, metadata).sampled_token_ids, logits.argmax(dim=-1))


def test_greedy_rows_in_mixed_batch_are_argmax() -> None:
    logits = random_logits(6, 50)
    params = [SamplingParams(temperature=0.0 if row % 2 else 1.5) for row in range(6)]
    tokens = sample(logits, build(params, 50)).sampled_token_ids
    assert torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))


def test_top_k_one_is_greedy() -> None:
    logits = random_logits(8, 50, seed=3)
    metadata = build([SamplingParams(temperature=1.0, top_k=1)] * 8, 50)
    for _ in range(5):
        assert torch.equal(sample(logits, metadata).sampled_token_ids, logits.argmax(dim=-1))


# ---- random sampling follows the distribution -----------------------------------------------

def test_temperature_sampling_matches_softmax() -> None:
    torch.manual_seed(0)
    vocab_size, num_draws, temperature = 6, 40_000, 0.7
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -3.0])
    logits = row.expand(num_draws, vocab_size).contiguous()
    metadata = build([SamplingParams(temperature=temperature)] * num_draws, vocab_size)
    tokens = sample(logits, metadata).sampled_token_ids
    expected = torch.softmax(row / temperature, dim=-1)
    # std of each frequency is below sqrt(0.25 / 40000) = 0.0025; allow 4 sigma
    assert torch.allclose(empirical(tokens, vocab_size), expected, atol=0.01)


def test_seeded_sampling_matches_softmax() -> None:
    vocab_size, num_draws = 5, 4000
    row = torch.tensor([0.2, 1.0, -1.0, 0.0, 0.7])
    logits = row.expand(num_draws, vocab_size).contiguous()
    metadata = build([SamplingParams(seed=i) for i in range(num_draws)], vocab_size,
                     generators=[seeded(i) for i in range(num_draws)])
    tokens = sample(logits, metadata).sampled_token_ids
    # std of each frequency is below sqrt(0.25 / 4000) = 0.008; allow 4 sigma
    assert torch.allclose(empirical(tokens, vocab_size), torch.softmax(row, dim=-1), atol=0.032)


def test_filtered_sampling_follows_renormalised_distribution() -> None:
    torch.manual_seed(1)
    vocab_size, num_draws = 6, 30_000
    row = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.0, -1.0])
    logits = row.expand(num_draws, vocab_size).contiguous()
    metadata = build([SamplingParams(top_k=3)] * num_draws, vocab_size)
    tokens = sample(logits, metadata).sampled_token_ids
    expected = torch.zeros(vocab_size)
    expected[:3] = torch.softmax(row[:3], dim=-1)
    assert torch.allclose(empirical(tokens, vocab_size), expected, atol=0.012)


# ---- filters against hand-computed references -----------------------------------------------

def test_top_k_keeps_k_largest_per_row() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 1.0, 3.0]])
    filtered = apply_top_k(logits, torch.tensor([2, 5]))
    assert torch.isinf(filtered[0, [0, 2, 4]]).all()
    assert filtered[0, [1, 3]].tolist() == [5.0, 4.0]
    assert torch.equal(filtered[1], logits[1])  # k == vocab_size keeps everything


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    # 0.5 + 0.2 = 0.7 < 0.75, so the nucleus needs the third token too
    kept = ~torch.isinf(apply_top_p(logits, torch.tensor([0.75])))
    assert kept.tolist() == [[True, True, True, False, False]]
    kept = ~torch.isinf(apply_top_p(logits, torch.tensor([0.5])))
    assert kept.tolist() == [[True, False, False, False, False]]
    assert torch.equal(apply_top_p(logits, torch.tensor([1.0])), logits)


def test_tiny_top_p_samples_only_the_top_token() -> None:
    logits = random_logits(16, 100, seed=4)
    metadata = build([SamplingParams(top_p=1e-6)] * 16, 100)
    for _ in range(5):
        assert torch.equal(sample(logits, metadata).sampled_token_ids, logits.argmax(dim=-1))


def test_min_p_drops_tokens_below_scaled_top_probability() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]])
    # threshold 0.3 * 0.4 = 0.12: keep 0.4, 0.3, 0.15
    kept = ~torch.isinf(apply_min_p(probs.log(), torch.tensor([0.3])))
    assert kept.tolist() == [[True, True, True, False, False]]


def test_min_p_sampling_never_picks_dropped_tokens() -> None:
    torch.manual_seed(2)
    row = torch.tensor([2.0, 1.9, 0.0, -0.5, 1.0])
    logits = row.expand(5000, 5).contiguous()
    tokens = sample(logits, build([SamplingParams(min_p=0.3)] * 5000, 5)).sampled_token_ids
    probs = torch.softmax(row, dim=-1)
    allowed = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    assert set(tokens.tolist()) == allowed


# ---- penalties, bias, bans ------------------------------------------------------------------

def test_repetition_penalty_matches_reference() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0], [1.0, 1.0, -1.0, -1.0, 0.0]])
    prompts, outputs, penalties = [[0, 1], [4]], [[1, 3], []], [2.0, 0.5]
    expected = logits.clone()
    for row, penalty in enumerate(penalties):
        for token in set(prompts[row]) | set(outputs[row]):
            value = logits[row, token].item()
            expected[row, token] = value / penalty if value > 0 else value * penalty
    metadata = build([SamplingParams(repetition_penalty=p) for p in penalties], 5,
                     prompts=prompts, outputs=outputs)
    assert metadata.prompt_token_ids is not None and metadata.output_token_ids is not None
    result = apply_repetition_penalty(logits, torch.tensor(penalties),
                                      metadata.prompt_token_ids, metadata.output_token_ids)
    assert torch.allclose(result, expected)


def test_frequency_and_presence_penalties_match_openai_formula() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    outputs = [[1, 1, 1, 3], [0, 2, 2]]
    frequency, presence = [0.5, -1.0], [1.0, 0.25]
    expected = logits.clone()
    for row, tokens in enumerate(outputs):
        for token in set(tokens):
            expected[row, token] -= tokens.count(token) * frequency[row] + presence[row]
    params = [SamplingParams(frequency_penalty=f, presence_penalty=p)
              for f, p in zip(frequency, presence, strict=True)]
    metadata = build(params, 4, prompts=[[0, 0], [1]], outputs=outputs)
    assert metadata.output_token_ids is not None
    counts = token_counts(metadata.output_token_ids, 4)
    result = apply_presence_penalty(
        apply_frequency_penalty(logits, torch.tensor(frequency), counts),
        torch.tensor(presence), counts)
    assert torch.allclose(result, expected)
    # through sample(): greedy picks the argmax of the penalised logits (prompt tokens ignored)
    greedy = [SamplingParams(temperature=0.0, frequency_penalty=f, presence_penalty=p)
              for f, p in zip(frequency, presence, strict=True)]
    metadata = build(greedy, 4, prompts=[[0, 0], [1]], outputs=outputs)
    assert sample(logits, metadata).sampled_token_ids.tolist() == expected.argmax(-1).tolist()


def test_penalties_in_sample_change_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    plain = build([SamplingParams(temperature=0.0)], 3, prompts=[[0]], outputs=[[]])
    assert sample(logits, plain).sampled_token_ids.tolist() == [0]
    penalised = build([SamplingParams(temperature=0.0, repetition_penalty=1.2)], 3,
                      prompts=[[0]], outputs=[[]])
    assert sample(logits, penalised).sampled_token_ids.tolist() == [1]  # 3.0 / 1.2 = 2.5


def test_logit_bias_forces_a_token() -> None:
    logits = random_logits(3, 40, seed=5)
    params = [SamplingParams(logit_bias={17: 100.0}), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logit_bias={int(logits[2].argmax()): -100.0})]
    metadata = build(params, 40)
    for _ in range(10):
        tokens = sample(logits, metadata).sampled_token_ids.tolist()
        assert tokens[0] == 17
        assert tokens[1] == int(logits[1].argmax())
        assert tokens[2] == int(logits[2].topk(2).indices[1])  # the runner-up wins


def test_banned_tokens_are_never_sampled() -> None:
    torch.manual_seed(3)
    row = torch.tensor([5.0, 4.0, 0.0, 0.0, 3.0])
    logits = row.expand(2000, 5).contiguous()
    params = [SamplingParams(temperature=1.0 if i % 2 else 0.0) for i in range(2000)]
    tokens = sample(logits, build(params, 5, banned=[[0, 4]] * 2000)).sampled_token_ids
    assert not set(tokens.tolist()) & {0, 4}
    assert set(tokens[0::2].tolist()) == {1}  # greedy rows take the best allowed token


# ---- allowed tokens and bad words -----------------------------------------------------------

def test_allowed_token_ids_mask_other_tokens_and_leave_other_rows() -> None:
    logits = random_logits(3, 12, seed=11)
    allowed = (2, 5, 9)
    params = [SamplingParams(allowed_token_ids=allowed),
              SamplingParams(temperature=0.0, allowed_token_ids=allowed),
              SamplingParams(temperature=0.0)]
    metadata = build(params, 12)
    assert metadata.allowed_token_ids == [allowed, allowed, None]
    processed = process_logits(logits, metadata)
    outside = [t for t in range(12) if t not in allowed]
    assert torch.isinf(processed[:2, outside]).all()
    assert torch.equal(processed[:2, list(allowed)], logits[:2, list(allowed)])
    assert torch.equal(processed[2], logits[2])
    assert build([SamplingParams()] * 2, 12).allowed_token_ids is None  # no cost when unused


def test_allowed_token_ids_bound_every_draw_and_keep_raw_logprobs() -> None:
    logits = random_logits(1, 50, seed=12).expand(400, 50).contiguous()
    allowed = (3, 17, 41)
    params = [SamplingParams(temperature=2.0 if i % 2 else 0.0, allowed_token_ids=allowed,
                             logprobs=2, logit_bias={0: 100.0}) for i in range(400)]
    out = sample(logits, build(params, 50))
    assert set(out.sampled_token_ids.tolist()) <= set(allowed)
    assert len(set(out.sampled_token_ids[1::2].tolist())) > 1  # random rows still vary
    # the bias on a forbidden token cannot bring it back; logprobs describe the raw logits
    raw = torch.log_softmax(logits[0], dim=-1)
    assert out.logprobs is not None and out.logprob_token_ids is not None
    assert out.logprob_token_ids[0, 1:].tolist() == raw.topk(2).indices.tolist()
    token = int(out.sampled_token_ids[0])
    assert math.isclose(out.logprobs[0, 0].item(), raw[token].item(), abs_tol=1e-6)


def test_bad_words_ban_single_tokens_always() -> None:
    words = [(7,), (3,)]
    assert bad_words_banned_ids(words, []) == [7, 3]
    assert bad_words_banned_ids(words, [1, 2, 3]) == [7, 3]


def test_bad_words_ban_the_last_token_only_after_the_rest_of_the_word() -> None:
    words = [(4, 5, 6), (9, 6)]
    assert bad_words_banned_ids(words, []) == []
    assert bad_words_banned_ids(words, [4]) == []
    assert bad_words_banned_ids(words, [1, 4, 5]) == [6]
    assert bad_words_banned_ids(words, [4, 5, 9]) == [6]  # the other word's prefix
    # the prefix must end the output: earlier occurrences do not count
    assert bad_words_banned_ids(words, [4, 5, 1]) == []
    assert bad_words_banned_ids(words, [9, 4]) == []
    assert bad_words_banned_ids(words, [5]) == []  # a partial prefix is no prefix


# ---- seeded generators ----------------------------------------------------------------------

def run_seeded(seed: int, row: int, num_seqs: int, logits_row: torch.Tensor,
               num_steps: int) -> list[int]:
    """Sample `num_steps` times with a request seeded `seed` placed at `row` among other
    random rows (some seeded, some not); return that request's tokens."""
    generator = seeded(seed)
    others = [seeded(1000 + i) for i in range(num_seqs)]
    tokens = []
    for step in range(num_steps):
        logits = random_logits(num_seqs, logits_row.shape[0], seed=step + 50)
        logits[row] = logits_row
        generators: list[torch.Generator | None] = [
            others[i] if i % 2 else None for i in range(num_seqs)]
        generators[row] = generator
        params = [SamplingParams(temperature=0.9, top_p=0.95) for _ in range(num_seqs)]
        params[row] = SamplingParams(temperature=1.0, seed=seed)
        metadata = build(params, logits_row.shape[0], generators=generators)
        tokens.append(int(sample(logits, metadata).sampled_token_ids[row]))
    return tokens


def test_seeded_row_ignores_batch_and_position() -> None:
    logits_row = torch.zeros(200)  # uniform: every draw is pure generator randomness
    alone = run_seeded(7, row=0, num_seqs=1, logits_row=logits_row, num_steps=20)
    assert run_seeded(7, row=3, num_seqs=6, logits_row=logits_row, num_steps=20) == alone
    assert run_seeded(7, row=1, num_seqs=2, logits_row=logits_row, num_steps=20) == alone
    assert run_seeded(8, row=0, num_seqs=1, logits_row=logits_row, num_steps=20) != alone


def test_unseeded_rows_draw_from_the_given_generator() -> None:
    logits = torch.zeros(4, 200)  # uniform: every draw is pure generator randomness
    params = [SamplingParams(temperature=1.0)] * 4

    def draw(generator_seed: int, global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)  # the global generator must not matter
        metadata = SamplingMetadata.build(params, [[]] * 4, [[]] * 4, [None] * 4, [[]] * 4,
                                          200, CPU, unseeded_generator=seeded(generator_seed))
        return sample(logits, metadata).sampled_token_ids.tolist()

    assert draw(5, global_seed=1) == draw(5, global_seed=2)
    assert draw(5, global_seed=1) != draw(6, global_seed=1)


# ---- logprobs -------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_sorted_top_k_and_ranks() -> None:
    logits = random_logits(4, 30, seed=6)
    params = [SamplingParams(logprobs=3, temperature=0.5, repetition_penalty=1.3),
              SamplingParams(logprobs=0, temperature=0.0, logit_bias={0: 50.0}),
              SamplingParams(temperature=1.2, top_k=5),
              SamplingParams(logprobs=5, presence_penalty=1.0)]
    metadata = build(params, 30, prompts=[[1, 2], [], [], [3]], outputs=[[4], [], [], [5]])
    out = sample(logits, metadata)
    assert out.logprobs is not None and out.logprob_token_ids is not None
    assert out.sampled_token_ranks is not None
    assert out.logprobs.shape == (4, 6) and out.logprob_token_ids.shape == (4, 6)
    reference = torch.log_softmax(logits, dim=-1)
    for row in range(4):
        token = int(out.sampled_token_ids[row])
        assert int(out.logprob_token_ids[row, 0]) == token
        assert math.isclose(out.logprobs[row, 0].item(), reference[row, token].item(),
                            abs_tol=1e-6)
        order = reference[row].argsort(descending=True, stable=True).tolist()
        assert out.logprob_token_ids[row, 1:].tolist() == order[:5]
        assert torch.allclose(out.logprobs[row, 1:], reference[row, order[:5]])
        assert int(out.sampled_token_ranks[row]) == order.index(token) + 1
    assert int(out.sampled_token_ids[1]) == 0  # the bias decided, logprobs stayed raw


def test_no_logprobs_when_none_asked() -> None:
    out = sample(random_logits(2, 10), build([SamplingParams()] * 2, 10))
    assert out.logprobs is None and out.logprob_token_ids is None
    assert out.sampled_token_ranks is None


# ---- numerics -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 0.05, 1.0, 2.0])
def test_single_finite_token_is_sampled_without_nan(temperature: float) -> None:
    logits = torch.full((3, 20), NEG_INF)
    logits[torch.arange(3), torch.tensor([4, 11, 19])] = torch.tensor([-50.0, 0.0, 80.0])
    params = [SamplingParams(temperature=temperature, top_p=0.3, top_k=3, min_p=0.5,
                             logprobs=2, seed=row) for row in range(3)]
    metadata = build(params, 20, generators=[seeded(row) for row in range(3)])
    for _ in range(5):
        out = sample(logits, metadata)
        assert out.sampled_token_ids.tolist() == [4, 11, 19]
        assert out.logprobs is not None and not torch.isnan(out.logprobs).any()
        assert out.logprobs[:, 0].tolist() == [0.0, 0.0, 0.0]
        assert out.sampled_token_ranks is not None
        assert out.sampled_token_ranks.tolist() == [1, 1, 1]


def test_sample_does_not_modify_logits() -> None:
    logits = random_logits(3, 10, seed=9)
    before = logits.clone()
    params = [SamplingParams(top_k=2, top_p=0.5, min_p=0.1, repetition_penalty=2.0,
                             frequency_penalty=1.0, logit_bias={1: 3.0})] * 3
    sample(logits, build(params, 10, prompts=[[1]] * 3, outputs=[[2]] * 3,
                         banned=[[0]] * 3))
    assert torch.equal(logits, before)


def test_top_p_always_keeps_the_top_token() -> None:
    # in float32, 1 - 1e-9 == 1.0 and the cumulative sum reaches (or rounds below) 1.0, so a
    # tiny top_p would drop every token without the explicit keep-the-most-likely rule
    logits = torch.cat([random_logits(3, 1000, seed=0), torch.full((1, 1000), NEG_INF)])
    logits[3, 123] = 0.0
    filtered = apply_top_p(logits, torch.full((4,), 1e-9))
    assert torch.isfinite(filtered).sum(dim=-1).tolist() == [1, 1, 1, 1]
    assert torch.equal(filtered.argmax(dim=-1), logits.argmax(dim=-1))

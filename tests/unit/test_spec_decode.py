"""engine/spec_decode: n-gram proposals (prompt lookup) and the rejection sampler, whose output
must be distributed exactly as sampling from the target: checked by exact enumeration on a
small vocabulary, and by drawing."""

from __future__ import annotations

import pytest
import torch

from engine.config import SpeculativeConfig
from engine.errors import InvalidRequestError
from engine.spec_decode.ngram import propose_ngram
from engine.spec_decode.rejection import (
    acceptance_probs,
    residual_probs,
    verify_greedy_row,
    verify_row,
)

VOCAB_SIZE = 5


# ---- n-gram proposals ------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, expected", [
    ([1, 2, 3, 4, 9, 1, 2], [3, 4, 9, 1, 2]),  # the suffix [1, 2] occurred at 0
    ([1, 2, 3, 7, 2, 3, 8, 1, 2, 3], [7, 2, 3, 8, 1]),  # [1, 2, 3] (at 0) beats [2, 3] (at 4)
    ([5, 6, 7, 5, 6, 8, 5, 6], [8, 5, 6]),  # latest occurrence of [5, 6] wins
    ([1, 2, 3], []), ([4, 4], []), ([1, 2, 3, 4], []),
])
def test_ngram_proposals(tokens: list[int], expected: list[int]) -> None:
    assert propose_ngram(tokens, 5, min_n=2, max_n=4) == expected


def test_longer_suffixes_win_and_proposals_are_capped() -> None:
    # [2, 3] last occurred at 5 (followed by 9), but [1, 2, 3] only at 0 (followed by 4)
    tokens = [1, 2, 3, 4, 0, 2, 3, 9, 1, 2, 3]
    assert propose_ngram(tokens, 3, min_n=2, max_n=3) == [
        4, 0, 2]
    assert propose_ngram(tokens, 3, min_n=2, max_n=2) == [
        9, 1, 2]


def test_matches_never_straddle_token_boundaries() -> None:
    # as int32 bytes, 256 = 00 01 00 00 and 1 = 01 00 00 00: [256, 0] holds the bytes of [1]
    # at an odd offset; only whole tokens may match
    tokens = [256, 0, 7, 5, 1, 0]
    assert propose_ngram(tokens, 2, min_n=2, max_n=2) == []
    assert propose_ngram([300_000, 9, 300_000], 2, min_n=1, max_n=1) == [9, 300_000]


def test_speculative_config_is_checked() -> None:
    with pytest.raises(InvalidRequestError, match="prompt_lookup_min"):
        SpeculativeConfig.from_dict({"method": "ngram", "prompt_lookup_min": 3,
                                     "prompt_lookup_max": 2})
    with pytest.raises(InvalidRequestError, match="num_speculative_tokens"):
        SpeculativeConfig.from_dict({"num_speculative_tokens": 0})
    with pytest.raises(InvalidRequestError, match="unknown keys"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_lookahead": 3})
    with pytest.raises(InvalidRequestError, match="needs `model`"):
        SpeculativeConfig.from_dict({"method": "draft_model"})
    # vLLM's shorthand: a model without a method is a draft model
    assert SpeculativeConfig.from_dict({"model": "/m", "num_speculative_tokens": 4}).method == (
        "draft_model")


# ---- the rejection sampler -------------------------------------------------------------------

def _distributions(num: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(num, VOCAB_SIZE, generator=generator) * 1.5, dim=-1).double()


def _first_token_law(p: torch.Tensor, q: torch.Tensor | None, draft: int | None) -> torch.Tensor:
    """The exact law of the first emitted token: over every proposal x (drawn from q, or the
    fixed n-gram `draft`), x with probability a(x), else a draw from the residual."""
    law = torch.zeros(VOCAB_SIZE, dtype=torch.float64)
    proposals = range(VOCAB_SIZE) if draft is None else [draft]
    for x in proposals:
        weight = 1.0 if q is None else float(q[x])
        ids = torch.tensor([x])
        accept = float(acceptance_probs(p.unsqueeze(0), None if q is None else q.unsqueeze(0),
                                        ids)[0])
        residual = residual_probs(p.unsqueeze(0), None if q is None else q.unsqueeze(0), ids)[0]
        law += weight * (1 - accept) * residual
        law[x] += weight * accept
    return law


@pytest.mark.parametrize("seed", range(6))
def test_exact_enumeration_keeps_the_target_distribution(seed: int) -> None:
    p, q = _distributions(2, seed)
    assert torch.allclose(_first_token_law(p, q, None), p, atol=1e-12)  # a draft model
    for draft in range(VOCAB_SIZE):  # n-gram: q is one-hot at the proposal
        assert torch.allclose(_first_token_law(p, None, draft), p, atol=1e-12)


def test_a_draft_that_covers_the_target_is_always_accepted() -> None:
    p = _distributions(1, 0)
    assert torch.allclose(acceptance_probs(p, p, torch.tensor([2])), torch.ones(1, dtype=p.dtype))
    # residual of a perfect draft is empty: the row falls back to p, still a distribution
    assert torch.allclose(residual_probs(p, p, torch.tensor([2])).sum(), torch.tensor(1.0,
                                                                                     dtype=p.dtype))


@pytest.mark.parametrize("use_draft_probs", [True, False])
def test_drawn_tokens_follow_the_target(use_draft_probs: bool) -> None:
    """20k draws of (first token, second token when the first proposal was accepted)."""
    target = _distributions(3, 7).float()
    draft_probs = _distributions(2, 8).float() if use_draft_probs else None
    generator = torch.Generator().manual_seed(0)
    proposals = torch.tensor([1, 3])
    counts = torch.zeros(VOCAB_SIZE)
    num_draws = 20_000
    for _ in range(num_draws):
        if draft_probs is not None:
            proposals = torch.multinomial(draft_probs, 1, generator=generator).flatten()
        tokens = verify_row(target, draft_probs, proposals, generator)
        assert 1 <= len(tokens) <= 3
        counts[tokens[0]] += 1
    expected = target[0] * num_draws
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 18.47, (counts, expected)  # df 4, p = 0.001


def test_greedy_verification_is_greedy_decoding() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    assert verify_greedy_row(logits, torch.tensor([1, 0])) == [1, 0, 2]  # all accepted + bonus
    assert verify_greedy_row(logits, torch.tensor([1, 2])) == [1, 0]  # second rejected
    assert verify_greedy_row(logits, torch.tensor([2, 0])) == [1]  # first rejected

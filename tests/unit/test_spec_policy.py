"""engine/spec_decode/policy.py: how many proposals a sequence verifies, from its acceptance
history and the cost of a verified token."""

from __future__ import annotations

import random

import pytest

from engine.spec_decode.policy import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    ProposalBudget,
    best_num_proposals,
)

COST = 0.12


def _expected_gain(acceptance: float, k: int, cost: float) -> float:
    return sum(acceptance ** i for i in range(k + 1)) / (1.0 + cost * k)


@pytest.mark.parametrize("acceptance", [0.0, 0.05, 0.1, 0.2, 0.5, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("cost", [0.03, 0.12, 0.5])
def test_best_num_proposals_maximises_tokens_per_cost(acceptance: float, cost: float) -> None:
    k = best_num_proposals(acceptance, 5, cost)
    gains = [_expected_gain(acceptance, n, cost) for n in range(6)]
    assert gains[k] == pytest.approx(max(gains))
    # below the break-even rate (one more token for `cost` more work) nothing pays
    if acceptance <= cost:
        assert k == 0
    if acceptance == 1.0:
        assert k == 5


def _run(budget: ProposalBudget, acceptance: float, steps: int, seed: int = 0) -> list[int]:
    """Drive one sequence for `steps` steps; each proposal is accepted with `acceptance`
    until the first rejection. Returns the proposals asked for at each step."""
    rng = random.Random(seed)
    asked = []
    for _ in range(steps):
        k = budget.num_proposals("s")
        asked.append(k)
        if k:
            accepted = 0
            while accepted < k and rng.random() < acceptance:
                accepted += 1
            budget.observe("s", k, accepted)
    return asked


def test_high_acceptance_gets_the_full_count() -> None:
    asked = _run(ProposalBudget(5, COST), acceptance=0.95, steps=60)
    assert asked[-40:].count(5) >= 36


def test_zero_acceptance_stops_and_probes_ever_more_rarely() -> None:
    asked = _run(ProposalBudget(5, COST), acceptance=0.0, steps=400)
    probes = [step for step, k in enumerate(asked) if k]
    # a few verifications to learn, then probes of one token with doubling waits: 5 + 6
    # probes up to the longest wait, then one per MAX_BACKOFF + 1 steps
    assert probes[5] > 5 and len(probes) <= 6 + 6 + 400 // (MAX_BACKOFF + 1)
    assert all(asked[step] == 1 for step in probes[-5:])
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps[-1] == MAX_BACKOFF + 1 and max(gaps) == MAX_BACKOFF + 1
    assert FIRST_BACKOFF + 1 in gaps
    # over the last 300 steps the wasted verifications cost under 1% of a step each
    assert sum(asked[100:]) * COST / 300 < 0.01


def test_a_successful_probe_resumes_speculation() -> None:
    budget = ProposalBudget(5, COST)
    _run(budget, acceptance=0.0, steps=200)
    asked = _run(budget, acceptance=1.0, steps=MAX_BACKOFF + 30)
    assert asked[-1] == 5


def test_not_adaptive_always_asks_the_full_count() -> None:
    assert set(_run(ProposalBudget(4, COST, adaptive=False), acceptance=0.0, steps=50)) == {4}


def test_estimates_of_finished_sequences_are_dropped() -> None:
    budget = ProposalBudget(5, COST)
    budget.observe("a", 3, 0)
    budget.observe("b", 3, 3)
    budget.forget_all_but({"b"})
    assert budget.num_proposals("a") == best_num_proposals(0.5, 5, COST)  # back to the prior

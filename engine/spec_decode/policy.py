"""When to speculate, and how far: each sequence's proposals are sized to what its recent
verifications accepted, against what verifying a token costs.

With per-token acceptance rate a, a row verifying k proposals yields 1 + a + ... + a^k tokens
on average, for a pass that costs 1 + c k one-token steps (c: the marginal cost of one more
verified token, measured at startup: near 0 where a decode step is bound by reading the
weights, as on GPUs; 0.1 to 0.8 on CPUs, whose matmuls turn compute-bound after a few rows,
depending on the dtype and the instruction set: bench/spec_policy.py). The policy picks the
k (0 .. the configured most) that maximises tokens per unit of cost: none where acceptance is
poor (plain chat under n-gram lookup), the full count where it is high (edits that copy their
prompt) and verification is cheap.

The acceptance estimate is a decaying count of accepted and rejected proposals, starting from a
neutral prior. A sequence whose estimate says "do not speculate" still probes with one proposal
now and then, after a wait that doubles with each failed probe (4, 8, ... 64 steps), so an
answer that starts quoting its prompt halfway is caught, at a cost near nothing where
acceptance stays poor.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIOR_ACCEPTANCE = 0.5
PRIOR_WEIGHT = 1.0  # the prior counts as this many proposals
# per verification: about ten verifications of memory, so that a sequence that keeps failing
# gets an estimate below the break-even rate (the prior alone would keep it above)
DECAY = 0.9
FIRST_BACKOFF, MAX_BACKOFF = 4, 64  # steps between probes of a sequence that does not pay


@dataclass(slots=True)
class _Estimate:
    accepted: float = 0.0
    rejected: float = 0.0
    wait: int = 0  # steps until the next probe
    backoff: int = FIRST_BACKOFF  # the wait after the next failed probe

    @property
    def rate(self) -> float:
        return ((self.accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT)
                / (self.accepted + self.rejected + PRIOR_WEIGHT))



def best_num_proposals(acceptance: float, max_proposals: int, token_cost: float) -> int:
    """The k in 0 .. max_proposals with the most expected tokens per unit of pass cost."""
    best, best_gain = 0, 1.0
    expected = 1.0  # tokens a row yields with k proposals: 1 + a + ... + a^k
    for k in range(1, max_proposals + 1):
        expected += acceptance ** k
        gain = expected / (1.0 + token_cost * k)
        if gain > best_gain:
            best, best_gain = k, gain
    return best


class ProposalBudget:
    """Per running sequence, how many proposals its next row should verify."""

    def __init__(self, max_proposals: int, token_cost: float, adaptive: bool = True) -> None:
        self.max_proposals = max_proposals
        self.token_cost = token_cost
        self.adaptive = adaptive
        self._estimates: dict[str, _Estimate] = {}

    def num_proposals(self, sequence_id: str) -> int:
        if not self.adaptive:
            return self.max_proposals
        estimate = self._estimates.setdefault(sequence_id, _Estimate())
        num = best_num_proposals(estimate.rate, self.max_proposals, self.token_cost)
        if num > 0:
            return num
        if estimate.wait > 0:
            estimate.wait -= 1
            return 0
        estimate.wait, estimate.backoff = estimate.backoff, min(2 * estimate.backoff,
                                                                MAX_BACKOFF)
        return 1  # a probe

    def observe(self, sequence_id: str, num_proposals: int, num_accepted: int) -> None:
        """A verification: the first num_accepted of num_proposals were accepted."""
        estimate = self._estimates.setdefault(sequence_id, _Estimate())
        estimate.accepted = DECAY * estimate.accepted + num_accepted
        estimate.rejected = DECAY * estimate.rejected + (num_accepted < num_proposals)
        if num_accepted:
            estimate.backoff = FIRST_BACKOFF

    def forget_all_but(self, sequence_ids: set[str]) -> None:
        """Drop the estimates of sequences no longer running."""
        for sequence_id in self._estimates.keys() - sequence_ids:
            del self._estimates[sequence_id]

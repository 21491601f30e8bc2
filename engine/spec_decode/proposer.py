"""Proposers: before each step, offer the running sequences tokens to verify, and the figures
of what the verifications accepted."""

from __future__ import annotations

from collections.abc import Sequence as Sequences
from dataclasses import dataclass, field
from typing import Protocol

from engine.config import SpeculativeConfig
from engine.scheduler import ScheduledRow
from engine.sequence import Sequence
from engine.spec_decode.ngram import propose_ngram


class Proposer(Protocol):
    def propose(self, running: Sequences[Sequence]) -> None:
        """Set every running sequence's spec_token_ids ([] for none) for the next step."""


class NgramProposer:
    """Prompt lookup for each decoding sequence, while the batch is small enough that verifying
    k more tokens per row is nearly free (disable_by_batch_size). Constrained sequences
    (structured outputs) get none: their grammar advances only on committed tokens."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    def propose(self, running: Sequences[Sequence]) -> None:
        config = self.config
        enabled = (config.disable_by_batch_size is None
                   or len(running) <= config.disable_by_batch_size)
        for sequence in running:
            if enabled and sequence.is_decoding and sequence.grammar is None:
                sequence.spec_token_ids = propose_ngram(
                    sequence.all_token_ids, config.num_speculative_tokens,
                    config.prompt_lookup_min, config.prompt_lookup_max)
            else:
                sequence.spec_token_ids = []


def build_proposer(config: SpeculativeConfig | None) -> Proposer | None:
    if config is None:
        return None
    if config.method == "ngram":
        return NgramProposer(config)
    raise NotImplementedError(f"speculative method {config.method!r}")


@dataclass(slots=True)
class SpecDecodeStats:
    """One step's verifications, as vLLM counts them: rows that verified proposals (drafts),
    proposals, accepted proposals, and accepted proposals by position (0: the first)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @classmethod
    def of_step(cls, rows: Sequences[ScheduledRow],
                sampled_token_ids: dict[str, list[int]]) -> SpecDecodeStats:
        """From the step's plan and the runner's tokens (before stops cut them)."""
        stats = cls()
        for row in rows:
            token_ids = sampled_token_ids.get(row.sequence.sequence_id)
            if not row.spec_token_ids or token_ids is None:
                continue  # no proposals, or a pass that failed
            num_accepted = len(token_ids) - 1
            stats.num_drafts += 1
            stats.num_draft_tokens += len(row.spec_token_ids)
            stats.num_accepted_tokens += num_accepted
            if len(stats.accepted_per_position) < len(row.spec_token_ids):
                stats.accepted_per_position += [0] * (
                    len(row.spec_token_ids) - len(stats.accepted_per_position))
            for position in range(num_accepted):
                stats.accepted_per_position[position] += 1
        return stats

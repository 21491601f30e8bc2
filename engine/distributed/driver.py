"""Rank 0's model in a parallel group: every call that reaches a collective is announced to the
workers first (engine/distributed/messages.py), then run on rank 0's own shard. The model
runner holds it in place of the model and needs no other change."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from engine.attention.base import AttentionMetadata
from engine.distributed.messages import Channel, ComputeLogits, ForwardStep
from engine.errors import WorkerGroupError
from engine.models.base import CausalLM, KVCaches

T = TypeVar("T")


class DriverModel:
    """Stands in for the CausalLM on rank 0 (attributes pass through to it)."""

    def __init__(self, model: CausalLM, channel: Channel, kv_caches: KVCaches) -> None:
        self.model = model
        self.channel = channel
        self.kv_caches = kv_caches  # the runner's: any other cache is a scratch one

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                 metadata: AttentionMetadata) -> torch.Tensor:
        scratch = kv_caches is not self.kv_caches
        return self._together(lambda: ForwardStep.of(input_ids, positions, metadata, scratch),
                              lambda: self.model(input_ids, positions, kv_caches, metadata))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        def run() -> torch.Tensor:
            rows = hidden_states.contiguous()
            self.model.parallel.broadcast_from_first(rows)
            return self.model.compute_logits(rows)

        return self._together(lambda: ComputeLogits(hidden_states.shape[0]), run)

    def _together(self, message: Callable[[], ForwardStep | ComputeLogits],
                  run: Callable[[], T]) -> T:
        """Send the message, then run the same call here. Any failure once the workers are
        in it leaves the group out of step: it is the group's end, not a sequence's."""
        try:
            self.channel.send(message())
            return run()
        except WorkerGroupError:
            raise
        except Exception as exc:
            raise WorkerGroupError(f"the parallel group failed during a step: {exc!r}") from exc

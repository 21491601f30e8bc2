"""One rank's place in a tensor x pipeline parallel group, and the collectives the model layers
call. World rank = pp_rank * tp_size + tp_rank: the TP group of a stage is consecutive ranks,
so on one machine a stage's ranks share its fastest links. With one process every collective
is the identity and nothing here touches torch.distributed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.errors import UnsupportedModelError


@dataclass(frozen=True, slots=True)
class Parallel:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    expert_parallel: bool = False  # MoE: whole experts per TP rank instead of split experts
    # the process groups (None with one process): the stage's TP ranks for the layers'
    # collectives, and every rank for the hidden states passed from stage to stage
    tp_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    stage_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)
    # every rank over gloo with no practical timeout: the step messages (idle workers wait
    # on it) and host-side agreements
    control_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    # ---- what this rank holds ---------------------------------------------------------------

    def split(self, size: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's even share of `size` items (heads, intermediate
        rows); an error naming `what` when the TP size does not divide it."""
        if size % self.tp_size:
            raise UnsupportedModelError(
                f"tensor parallel size {self.tp_size} does not divide the model's {what} "
                f"({size})")
        length = size // self.tp_size
        return self.tp_rank * length, length

    def kv_heads(self, num_kv_heads: int, num_heads: int) -> tuple[int, int]:
        """(first, count) of the KV heads this rank keeps: an even share when the TP size
        divides them, else the one head its query heads read (replicated on tp_size /
        num_kv_heads ranks)."""
        if num_kv_heads >= self.tp_size:
            return self.split(num_kv_heads, "number of key/value heads")
        if self.tp_size % num_kv_heads:
            raise UnsupportedModelError(
                f"tensor parallel size {self.tp_size} is neither a divisor nor a multiple of "
                f"the model's {num_kv_heads} key/value heads")
        first_query_head, _ = self.split(num_heads, "number of attention heads")
        return first_query_head // (num_heads // num_kv_heads), 1

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """(start, length) of this rank's vocabulary rows: ceil(vocab / tp) each, the last rank
        padded (its rows past the vocabulary hold zeros and their logits are cut off)."""
        length = -(-vocab_size // self.tp_size)
        return self.tp_rank * length, length

    def stage_layers(self, num_layers: int) -> range:
        """The contiguous layers of this pipeline stage: an even split, the first stages
        taking one more where it does not divide."""
        if num_layers < self.pp_size:
            raise UnsupportedModelError(
                f"pipeline parallel size {self.pp_size} exceeds the model's {num_layers} layers")
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return range(start, start + base + (self.pp_rank < extra))

    # ---- collectives --------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the stage's TP ranks, in place (the partial sums of a row-parallel
        matmul)."""
        if self.tp_size > 1:
            dist.all_reduce(tensor, group=self.tp_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The TP ranks' tensors concatenated along the last dimension, in rank order (the
        vocabulary slices of the logits)."""
        if self.tp_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.tp_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    def broadcast_from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """The TP group's first rank's `tensor`, in place on the others."""
        if self.tp_size > 1:
            dist.broadcast(tensor, src=self._world_rank(self.pp_rank, 0), group=self.tp_group)
        return tensor

    def min_over_world(self, value: int) -> int:
        """The smallest of every rank's `value` (the KV blocks each rank's memory allows)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(tensor.item())

    def send_hidden(self, hidden_states: torch.Tensor) -> None:
        """Hand this stage's output to the next stage's rank of the same TP rank; the last
        stage hands it back to the first, which holds the final norm and the LM head."""
        destination = self._world_rank((self.pp_rank + 1) % self.pp_size, self.tp_rank)
        dist.send(hidden_states.contiguous(), dst=destination, group=self.stage_group)

    def recv_hidden(self, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
        """The previous stage's output [num_tokens, hidden_size] (the first stage receives
        the last stage's)."""
        source = self._world_rank((self.pp_rank - 1) % self.pp_size, self.tp_rank)
        hidden_states = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)
        dist.recv(hidden_states, src=source, group=self.stage_group)
        return hidden_states

    def finish_stage(self, hidden_states: torch.Tensor, num_rows: int) -> torch.Tensor | None:
        """After this stage's layers: the first stage gets the whole stack's output back (the
        final norm and the LM head are its), `num_rows` rows of it (the last layer may keep
        only the rows that are read); the others pass theirs on and get None. With one stage,
        `hidden_states` itself."""
        if self.pp_size == 1:
            return hidden_states
        if num_rows or not self.is_last_stage:  # when no row is read, nothing comes back
            self.send_hidden(hidden_states)
        if not self.is_first_stage:
            return None
        if not num_rows:
            return hidden_states[:0]
        return self.recv_hidden(num_rows, hidden_states.shape[1], hidden_states.dtype,
                                hidden_states.device)

    def _world_rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank


SINGLE = Parallel()  # one process: the whole model, no collectives

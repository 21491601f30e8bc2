"""What rank 0 tells the workers, one message per collective call of the model: plain data
(lists of ints), broadcast over the control group. The workers mirror rank 0's calls exactly,
so every rank reaches every collective in the same order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.attention.base import AttentionMetadata


@dataclass(frozen=True, slots=True)
class ForwardStep:
    """One forward pass over a flattened batch: the tokens, their positions and cache slots,
    and each sequence's query length, context length and block table (attention metadata
    as the runner built it). `scratch`: on a one-block scratch cache (the probe)."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    scratch: bool = False

    @classmethod
    def of(cls, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
           scratch: bool) -> ForwardStep:
        return cls(input_ids=input_ids.tolist(), positions=positions.tolist(),
                   slot_mapping=metadata.slot_mapping.tolist(),
                   query_lens=list(metadata.query_lens_cpu), seq_lens=list(metadata.seq_lens_cpu),
                   block_tables=metadata.block_tables.tolist(), scratch=scratch)

    def metadata(self, device: torch.device) -> AttentionMetadata:
        """The attention metadata rank 0 built for this pass (without its decode plan)."""
        cu_seqlens_q = torch.zeros(len(self.query_lens) + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(self.query_lens, dtype=torch.int32), dim=0,
                     out=cu_seqlens_q[1:])
        return AttentionMetadata(
            slot_mapping=torch.tensor(self.slot_mapping, dtype=torch.long, device=device),
            cu_seqlens_q=cu_seqlens_q.to(device),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(self.block_tables, dtype=torch.int32, device=device),
            max_seqlen_q=max(self.query_lens), max_seqlen_k=max(self.seq_lens),
            query_lens_cpu=list(self.query_lens), seq_lens_cpu=list(self.seq_lens))


@dataclass(frozen=True, slots=True)
class ComputeLogits:
    """The LM head over `num_rows` hidden-state rows, which rank 0 then broadcasts to the
    first stage's TP ranks (vocabulary-parallel head: each computes its slice)."""

    num_rows: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Leave the loop and the process group: the engine is stopping."""


Message = ForwardStep | ComputeLogits | Shutdown


class Channel:
    """Rank 0's messages to every other rank: broadcast_object_list over the control group
    (gloo, so a message never waits on a device)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group

    def send(self, message: Message) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self) -> Message:
        box: list[object] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        message = box[0]
        assert isinstance(message, (ForwardStep, ComputeLogits, Shutdown)), message
        return message

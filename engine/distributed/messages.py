"""What rank 0 tells the workers, one message per collective call of the model: plain data
(lists of ints), broadcast over the control group. The workers mirror rank 0's calls exactly,
so every rank reaches every collective in the same order."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import timedelta

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
    output_rows: list[int] | None = None
    scratch: bool = False

    @classmethod
    def of(cls, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
           scratch: bool) -> ForwardStep:
        return cls(input_ids=input_ids.tolist(), positions=positions.tolist(),
                   slot_mapping=metadata.slot_mapping.tolist(),
                   query_lens=list(metadata.query_lens_cpu), seq_lens=list(metadata.seq_lens_cpu),
                   block_tables=metadata.block_tables.tolist(),
                   output_rows=(None if metadata.output_rows is None
                                else metadata.output_rows.tolist()),
                   scratch=scratch)

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
            query_lens_cpu=list(self.query_lens), seq_lens_cpu=list(self.seq_lens),
            output_rows=(None if self.output_rows is None
                         else torch.tensor(self.output_rows, dtype=torch.long, device=device)))


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
    """Rank 0's messages to every other rank: pickled and broadcast over the control group
    (gloo, so a message never waits on a device). The workers wait for the next message
    without limit (an idle server sends none); rank 0 gives up on a send after `timeout_s`
    (a hung worker), which breaks the group."""

    def __init__(self, group: dist.ProcessGroup | None, timeout_s: float) -> None:
        self.group = group
        self.timeout = timedelta(seconds=timeout_s)

    def send(self, message: Message) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
        self._broadcast(torch.tensor([payload.numel()], dtype=torch.int64), self.timeout)
        self._broadcast(payload, self.timeout)

    def receive(self) -> Message:
        size = torch.empty(1, dtype=torch.int64)
        self._broadcast(size)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._broadcast(payload)
        message = pickle.loads(payload.numpy().tobytes())
        assert isinstance(message, (ForwardStep, ComputeLogits, Shutdown)), message
        return message

    def _broadcast(self, tensor: torch.Tensor, timeout: timedelta | None = None) -> None:
        work = dist.broadcast(tensor, src=0, group=self.group, async_op=True)
        if timeout is None:
            work.wait()
        elif not work.wait(timeout):
            raise TimeoutError(f"a rank did not take a step message within {timeout}")

"""CUDA graphs for decode steps: the model's forward captured once per batch size of a ladder,
replayed with the step's inputs copied into static buffers.

A decode step launches a few hundred small kernels; at small batches on a fast GPU their launch
cost, not the math, sets the pace. A graph launches them all at once. Batches are padded up to
the next captured size: padding rows carry slot -1 (their K/V are not stored) and context length
0 (attention gives them zeros), and their outputs are dropped. The graph covers the decoder
only; the LM head, on the sampling rows, and the sampler run eagerly after it.

`DecodeGraphs(..., capture=False)` keeps the static buffers and the padding but runs the model
eagerly: that is how CPU tests check the padding with the Triton kernels under the interpreter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from engine.attention.base import AttentionMetadata
from engine.progress import stage

logger = logging.getLogger(__name__)

SMALL_BATCH_SIZES = (1, 2, 4, 8)
BATCH_SIZE_STEP = 16  # above the small sizes, one graph every 16 sequences
MAX_CAPTURED_BATCH = 512

Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to max_num_seqs (itself included, capped)."""
    limit = min(max_num_seqs, MAX_CAPTURED_BATCH)
    sizes = [s for s in SMALL_BATCH_SIZES if s <= limit]
    sizes += range(BATCH_SIZE_STEP, limit + 1, BATCH_SIZE_STEP)
    if sizes[-1] != limit:
        sizes.append(limit)
    return sorted(set(sizes))


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds num_seqs, or None when none does."""
    for size in sizes:
        if size >= num_seqs:
            return size
    return None


class DecodeGraphs:
    """Static inputs sized for the largest batch, and one graph (or, uncaptured, one eager
    call) per size. `max_blocks_per_seq` fixes the block-table width: every graph reads the
    same [max_size, max_blocks_per_seq] table."""

    def __init__(self, forward: Forward, max_num_seqs: int, max_blocks_per_seq: int,
                 max_model_len: int, device: torch.device, capture: bool = True) -> None:
        self.forward = forward
        self.sizes = capture_sizes(max_num_seqs)
        self.max_model_len = max_model_len
        self.device = device
        self.capture_enabled = capture
        size = self.sizes[-1]
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32,
                                        device=device)
        self.cu_seqlens_q = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def _metadata(self, size: int) -> AttentionMetadata:
        # host-side values are those of the worst case, so anything a backend derives from
        # them at capture (the decode kernel's split count) holds for every replay. No decode
        # plan: the buffers are refilled in place for each step, and only backends that read
        # lengths from them on the device (no host plan) run here, as can_run holds
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], cu_seqlens_q=self.cu_seqlens_q[:size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
            max_seqlen_q=1, max_seqlen_k=self.max_model_len, query_lens_cpu=[1] * size,
            seq_lens_cpu=[self.max_model_len] * size)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up, then capture, every size, largest first so the smaller graphs draw on
        the memory pool the largest one set up."""
        if not self.capture_enabled:
            return
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self._pad_from(0)  # all rows padding: capture writes no K/V anywhere
        with stage("capturing CUDA graphs", total=len(self.sizes), unit="graph") as progress:
            for size in reversed(self.sizes):
                metadata = self._metadata(size)
                for _ in range(2):  # compiles Triton kernels, sets up cuBLAS workspaces
                    self.forward(self.input_ids[:size], self.positions[:size], metadata)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.forward(self.input_ids[:size],
                                                      self.positions[:size], metadata)
                self.graphs[size] = graph
                progress.advance()
            torch.cuda.synchronize(self.device)
        logger.info("CUDA graphs: decode captured for %d batch sizes (1..%d) in %.1f s",
                    len(self.sizes), self.max_size, time.perf_counter() - started)

    def can_run(self, metadata: AttentionMetadata) -> bool:
        # a step with a decode plan has a backend that plans on the host: its plan would be
        # captured with the graph and replayed stale, the static buffers refilled around it;
        # a graph returns every row's hidden states
        return (metadata.is_decode_only and metadata.decode_plan is None
                and metadata.output_rows is None
                and metadata.num_seqs <= self.max_size
                and metadata.block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            metadata: AttentionMetadata) -> torch.Tensor:
        """Hidden states [num_seqs, hidden_size] of one decode step (`can_run` holds)."""
        num_seqs = metadata.num_seqs
        size = padded_size(num_seqs, self.sizes)
        assert size is not None
        width = metadata.block_tables.shape[1]
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(metadata.slot_mapping, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(metadata.seq_lens, non_blocking=True)
        # columns past a sequence's blocks are never read: its seq_len bounds every lookup
        self.block_tables[:num_seqs, :width].copy_(metadata.block_tables, non_blocking=True)
        self._pad_from(num_seqs, size)
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
            return self.outputs[size][:num_seqs]
        out = self.forward(self.input_ids[:size], self.positions[:size], self._metadata(size))
        return out[:num_seqs]

    def _pad_from(self, start: int, end: int | None = None) -> None:
        self.slot_mapping[start:end].fill_(-1)
        self.seq_lens[start:end].zero_()

"""The attention backend interface: metadata for one flattened batch and the forward contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(slots=True)
class DecodePlan:
    """Where the decode rows (one query token each) of one step find their context, for a
    backend that plans on the host (the torch reference): built once per step, shared by
    every layer. A layer with a sliding window that cuts some context reads a windowed copy
    (`windowed`), derived from this plan by the first such layer of the step."""

    block_size: int  # of the cache it indexes
    num_kv_heads: int
    rows: torch.Tensor | None  # [num_decode] query rows; None: every row (decode-only step)
    max_len: int  # the longest context, bucketed: the gathered length of the matmul path
    block_tables: torch.Tensor  # [num_decode, width] int32, contiguous (the native kernel)
    lens: torch.Tensor  # [num_decode] int32
    max_seq_len: int  # the longest context, unpadded: whether a window cuts any context
    # sliding window -> this plan over each context's last `window` positions only
    windowed: dict[int, DecodePlan] = field(default_factory=dict)
    # the batched-matmul path's gather, made by its first layer of the step (the native
    # kernel reads block_tables and lens alone): rows of cache.view(-1, dim) ordered [seq,
    # kv_head, position], [num_decode * num_kv_heads * max_len], and which of them lie past
    # each seq_len, [num_decode, 1, 1, max_len] bool
    cache_rows: torch.Tensor | None = None
    is_padding: torch.Tensor | None = None


@dataclass(slots=True)
class AttentionMetadata:
    """Describes one flattened (varlen) batch to attention; built by the model runner per step.

    Query rows of sequence i are [cu_seqlens_q[i], cu_seqlens_q[i+1]). Its context, cached
    tokens plus the new ones, has seq_lens[i] tokens whose K/V live in the blocks listed in
    block_tables[i]; the new tokens are the last query_len positions of that context.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot of each new token's K/V
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including the new tokens
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks_per_seq] int32, padded with 0
    max_seqlen_q: int
    max_seqlen_k: int
    query_lens_cpu: list[int]  # host copies so CPU paths never sync on the device
    seq_lens_cpu: list[int]
    # the step's decode plan, from the backend's plan_decode, built with the rest of the
    # metadata: attention keeps nothing between calls. None: no decode rows, a backend that
    # plans nothing, or metadata built by hand (a host-planning backend then plans per call)
    decode_plan: DecodePlan | None = None
    # the rows whose final hidden states the caller reads (int64, ascending), None: all. The
    # last layer runs past attention for these rows alone and the model returns just them: a
    # prefill chunk that samples nothing only fills the last layer's cache
    output_rows: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def num_output_rows(self) -> int:
        """How many rows of hidden states the model returns."""
        rows = self.output_rows if self.output_rows is not None else self.slot_mapping
        return rows.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_seqlen_q == 1


class AttentionBackend(Protocol):
    """Writes the new tokens' K/V into the paged cache, then attends over each sequence's
    whole context with causal masking, or, for a layer with a sliding window, over the last
    `sliding_window` positions up to each query, itself included: query position i sees keys
    (i - sliding_window, i], transformers' rule. The cache always keeps every token.
    Implementations: torch reference (CPU), CUDA."""

    def plan_decode(self, metadata: AttentionMetadata,
                    k_cache: torch.Tensor) -> DecodePlan | None:
        """The plan `forward` reads for this step's decode rows, or None when it reads none.
        `k_cache` is any layer's cache (all share one shape, dtype and device)."""
        ...

    def write_cache(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, metadata: AttentionMetadata) -> None:
        """Only the first half of `forward`: the new tokens' K/V into the paged cache."""
        ...

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,  # None: full causal attention
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...

"""The attention backend interface: metadata for one flattened batch and the forward contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_seqlen_q == 1


class AttentionBackend(Protocol):
    """Writes the new tokens' K/V into the paged cache, then attends over each sequence's
    whole context with causal masking. Implementations: torch reference (CPU), CUDA."""

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...

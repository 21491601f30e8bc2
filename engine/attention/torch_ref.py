"""The reference attention backend: paged K/V writes and SDPA over gathered blocks, in plain
torch. Correct everywhere, reasonably fast on CPU; the CUDA backends are checked against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionMetadata


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store each new token's K/V [num_tokens, num_kv_heads, head_dim] at its cache slot
    (slot = block_id * block_size + offset). The caches must be contiguous: a silent copy
    from reshape would drop the write."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_slots = k_cache.view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, ...]
    v_slots = v_cache.view(-1, num_kv_heads, head_dim)
    k_slots.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_slots.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor,
                   max_seq_len: int) -> torch.Tensor:
    """The first max_seq_len cached tokens of each sequence, in order:
    [num_seqs, max_seq_len, num_kv_heads, head_dim] from block_tables [num_seqs, >= blocks]."""
    block_size = cache.shape[1]
    num_blocks = -(-max_seq_len // block_size)
    table = block_tables[:, :num_blocks].long()  # [num_seqs, num_blocks]
    blocks = cache[table]  # [num_seqs, num_blocks, block_size, num_kv_heads, head_dim]
    return blocks.flatten(1, 2)[:, :max_seq_len]


class TorchAttentionBackend:
    """Writes the new K/V into the paged cache, then attends causally over each sequence's
    whole context. Decode rows (one query token) of all sequences share one batched SDPA call
    with a padding mask; sequences with several query tokens get one SDPA call each."""

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
        write_kv(key, value, k_cache, v_cache, metadata.slot_mapping)
        if metadata.is_decode_only:
            return _decode_attention(query, k_cache, v_cache, metadata.block_tables,
                                     metadata.seq_lens, metadata.max_seqlen_k, scale)
        return _mixed_attention(query, key, value, k_cache, v_cache, metadata, scale)


def _decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
                      scale: float) -> torch.Tensor:
    """One query token per sequence (query [num_seqs, num_heads, head_dim]) attending to its
    whole context, which ends at that token, so only padding needs masking."""
    keys = gather_context(k_cache, block_tables, max_seq_len).transpose(1, 2)
    values = gather_context(v_cache, block_tables, max_seq_len).transpose(1, 2)
    positions = torch.arange(max_seq_len, device=query.device)
    is_valid = positions[None, :] < seq_lens[:, None].to(query.device)  # [num_seqs, max_len]
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2), keys, values, attn_mask=is_valid[:, None, None, :], scale=scale,
        enable_gqa=query.shape[1] != keys.shape[1],
    )  # [num_seqs, num_heads, 1, head_dim]
    return out.squeeze(2)


def _mixed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """Decode rows batched together as in a decode-only step; each prefill chunk alone."""
    out = torch.empty_like(query)  # [num_tokens, num_heads, head_dim]
    starts, start = [], 0
    for query_len in metadata.query_lens_cpu:
        starts.append(start)
        start += query_len
    decode_seqs = [i for i, q_len in enumerate(metadata.query_lens_cpu) if q_len == 1]
    if decode_seqs:
        rows = torch.tensor([starts[i] for i in decode_seqs], device=query.device)
        seq_ids = torch.tensor(decode_seqs, device=query.device)
        max_seq_len = max(metadata.seq_lens_cpu[i] for i in decode_seqs)
        out[rows] = _decode_attention(query[rows], k_cache, v_cache,
                                      metadata.block_tables[seq_ids], metadata.seq_lens[seq_ids],
                                      max_seq_len, scale)
    for i, (query_len, seq_len) in enumerate(zip(metadata.query_lens_cpu,
                                                 metadata.seq_lens_cpu, strict=True)):
        if query_len > 1:
            rows_slice = slice(starts[i], starts[i] + query_len)
            out[rows_slice] = _prefill_attention(
                query[rows_slice], key[rows_slice], value[rows_slice], k_cache, v_cache,
                metadata.block_tables[i : i + 1], seq_len, scale)
    return out


def _prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_len: int, scale: float) -> torch.Tensor:
    """One sequence's query_len new tokens, the last ones of its seq_len-token context: query
    i sits at absolute position seq_len - query_len + i and sees keys [0, that position]."""
    query_len = query.shape[0]
    if query_len == seq_len:  # nothing cached: the fresh K/V are the whole context
        keys, values, mask = key, value, None
    else:
        keys = gather_context(k_cache, block_table, seq_len)[0]  # [seq_len, kv_heads, dim]
        values = gather_context(v_cache, block_table, seq_len)[0]
        mask = torch.ones(query_len, seq_len, dtype=torch.bool, device=query.device)
        mask = mask.tril(diagonal=seq_len - query_len)  # [query_len, seq_len]
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask,
        is_causal=mask is None, scale=scale, enable_gqa=query.shape[1] != keys.shape[1],
    )  # [num_heads, query_len, head_dim]
    return out.transpose(0, 1)

"""Triton kernels of the CUDA attention backend: K/V writes into the paged cache, varlen
prefill over the paged cache, and split-K paged decode. Every kernel reads K/V through the
block tables, so cached prefix blocks and freshly written tokens are the same to it. A
sliding window is a compile-time flag (full-attention layers run the same code as without
it) plus the window itself; the kernels then skip the key tiles outside every window.

Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors,
which is how CI checks them against the reference backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# read the way triton.jit reads it when it decorates the kernels below (older Tritons have
# no triton.knobs, so the variable itself is the portable source)
IS_INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on",
                                                                          "yes")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_DECODE_SPLITS = 16
_LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) == exp2(x * log2(e))


@dataclass(frozen=True, slots=True)
class TileConfig:
    """Tile sizes and launch options of one kernel for one dtype."""

    block_m: int  # query rows per program (decode: the least rows for one KV head's group)
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 must stay fp32: TF32 would break the fp32 greedy-equality checks against transformers
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dim >= 16


def _prefill_tiles(dtype: torch.dtype, head_dim: int) -> TileConfig:
    if IS_INTERPRETED:  # numpy executes each program; small tiles keep CPU tests fast
        return TileConfig(16, 16, 1, 1)
    if dtype == torch.float32 or head_dim > 128:
        return TileConfig(32, 32, 4, 2)
    return TileConfig(64, 64, 4, 2)


def _decode_tiles(dtype: torch.dtype, head_dim: int) -> TileConfig:
    if IS_INTERPRETED:
        return TileConfig(16, 16, 1, 1)
    return TileConfig(16, 32 if dtype == torch.float32 or head_dim > 128 else 64, 4, 2)


# ---- K/V writes ---------------------------------------------------------------------------


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    block_size, num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    # a negative slot marks a padding row (CUDA-graph batches): no head to store
    num_stored_heads = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (offs_h < num_stored_heads) & (offs_d < head_dim)
    dst = ((slot // block_size) * stride_cb + (slot % block_size) * stride_cs
           + offs_h * stride_ch + offs_d * stride_cd)
    key = tl.load(key_ptr + token * stride_kt + offs_h * stride_kh + offs_d * stride_kd, mask=mask)
    tl.store(k_cache_ptr + dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    value = tl.load(value_ptr + token * stride_vt + offs_h * stride_vh + offs_d * stride_vd,
                    mask=mask)
    tl.store(v_cache_ptr + dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store each new token's K/V [num_tokens, num_kv_heads, head_dim] at its cache slot
    (slot = block_id * block_size + offset); slots < 0 are skipped."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert k_cache.stride() == v_cache.stride(), "K and V caches must share a layout"
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride(),
        k_cache.shape[1], num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


# ---- shared: one tile of keys/values gathered through the block table -------------------


@triton.jit
def _load_kv_tile(cache_ptr, block_table_ptr, offs_n, n_valid, offs_d, d_valid, kv_head,
                  block_size, stride_cb, stride_cs, stride_ch, stride_cd,
                  TRANSPOSE: tl.constexpr):
    """Context positions offs_n of one sequence -> [BLOCK_N, BLOCK_D] (or its transpose);
    rows outside n_valid read as zeros and never touch the block table past its end."""
    block_ids = tl.load(block_table_ptr + offs_n // block_size, mask=n_valid, other=0)
    row = (block_ids.to(tl.int64) * stride_cb + (offs_n % block_size) * stride_cs
           + kv_head * stride_ch)
    if TRANSPOSE:
        ptrs = cache_ptr + row[None, :] + offs_d[:, None] * stride_cd
        return tl.load(ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
    ptrs = cache_ptr + row[:, None] + offs_d[None, :] * stride_cd
    return tl.load(ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)


# ---- varlen prefill -----------------------------------------------------------------------


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr,
    qk_scale, window,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
    stride_cb, stride_cs, stride_ch, stride_cd, stride_bt,
    block_size, head_dim, num_queries_per_kv,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, IS_SLIDING: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    # the new tokens are the last query_len of the context: query i sits at num_cached + i
    num_cached = seq_len - query_len
    kv_head = head // num_queries_per_kv
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < query_len
    d_valid = offs_d < head_dim
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh
                + offs_d[None, :] * stride_qd, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    q_pos = num_cached + offs_m
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # keys past this tile's last query are causally masked for all its rows: stop there
    end = tl.minimum(seq_len, num_cached + (m_block + 1) * BLOCK_M)
    if IS_SLIDING:
        # and keys before its first query's window are outside every row's: start there
        start = tl.maximum(num_cached + m_block * BLOCK_M - window + 1, 0)
        start = start // BLOCK_N * BLOCK_N
    else:
        start = 0
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        k = _load_kv_tile(k_cache_ptr, block_table_ptr, offs_n, n_valid, offs_d, d_valid,
                          kv_head, block_size, stride_cb, stride_cs, stride_ch, stride_cd,
                          TRANSPOSE=True)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base 2
        is_visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        if IS_SLIDING:
            is_visible = is_visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(is_visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # full attention: key 0 is visible to every row, so each row's running max is finite
        # after tile 0. A window may begin past this tile for some row, which has then seen
        # only -inf, and exp2(-inf - -inf) is NaN: it subtracts a finite stand-in (p and alpha
        # are 0 for it) while its running max stays -inf, so later tiles never see the stand-in
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new) if IS_SLIDING else m_new
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        v = _load_kv_tile(v_cache_ptr, block_table_ptr, offs_n, n_valid, offs_d, d_valid,
                          kv_head, block_size, stride_cb, stride_cs, stride_ch, stride_cd,
                          TRANSPOSE=False)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    if IS_SLIDING:
        # rows past query_len (never stored) may have seen no key: keep them out of 0/0
        l_i = tl.maximum(l_i, 1e-30)
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh
             + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])


def paged_prefill_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            seq_lens: torch.Tensor, max_seqlen_q: int, scale: float,
                            sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (query [num_tokens, num_heads,
    head_dim], rows split by cu_seqlens_q) over its whole context in the paged cache, which
    must already hold the new tokens' K/V; with a sliding window, query position p over keys
    (p - sliding_window, p]. Any mix of query lengths, decode rows included."""
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(query)  # [num_tokens, num_heads, head_dim]
    if num_tokens == 0:
        return out
    tiles = _prefill_tiles(query.dtype, head_dim)
    grid = (triton.cdiv(max_seqlen_q, tiles.block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens, scale * _LOG2E,
        sliding_window or 0, *query.stride(), *out.stride(), *k_cache.stride(),
        block_tables.stride(0), k_cache.shape[1], head_dim, num_heads // k_cache.shape[2],
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=_block_d(head_dim),
        PRECISION=_dot_precision(query.dtype), IS_SLIDING=sliding_window is not None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


# ---- split-K paged decode -----------------------------------------------------------------


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    block_tables_ptr, seq_lens_ptr, qk_scale, window,
    stride_qt, stride_qh, stride_qd, stride_ot, stride_oh, stride_od,
    stride_cb, stride_cs, stride_ch, stride_cd, stride_bt,
    block_size, head_dim, num_heads, num_queries_per_kv,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr, IS_SLIDING: tl.constexpr,
):
    """One program: one sequence, the query heads of one KV head (read once for all of them),
    one of NUM_SPLITS contiguous slices of the context (with a sliding window, of its last
    `window` positions: the query, at seq_len - 1, sees nothing before them)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    first = tl.maximum(seq_len - window, 0) if IS_SLIDING else 0
    # slices are sized per sequence from seq_lens, so the grid never depends on the lengths
    split_len = tl.cdiv(tl.cdiv(seq_len - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * split_len
    end = tl.minimum(start + split_len, seq_len)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_valid = offs_g < num_queries_per_kv
    d_valid = offs_d < head_dim
    heads = kv_head * num_queries_per_kv + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=g_valid[:, None] & d_valid[None, :],
                other=0.0)  # [BLOCK_G, BLOCK_D]
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < end
        k = _load_kv_tile(k_cache_ptr, block_table_ptr, offs_n, n_valid, offs_d, d_valid,
                          kv_head, block_size, stride_cb, stride_cs, stride_ch, stride_cd,
                          TRANSPOSE=True)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N], base 2
        s = tl.where(n_valid[None, :], s, float("-inf"))  # start_n < end: one key is valid
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = _load_kv_tile(v_cache_ptr, block_table_ptr, offs_n, n_valid, offs_d, d_valid,
                          kv_head, block_size, stride_cb, stride_cs, stride_ch, stride_cd,
                          TRANSPOSE=False)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    mask = g_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        # an empty context (a padding row, seq_len 0) yields zeros rather than 0/0
        out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
        tl.store(out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh
                 + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # partials laid out [num_seqs, num_heads, NUM_SPLITS(, BLOCK_D)], contiguous
        part = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_max_ptr + part, m_i, mask=g_valid)
        tl.store(part_sum_ptr + part, l_i, mask=g_valid)
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    stride_ot, stride_oh, stride_od, head_dim, num_heads,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits' partial softmaxes of one (sequence, head): rescale each to the
    global max and renormalise. Empty splits carry max -inf and sum 0 and drop out."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < NUM_SPLITS
    part = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + offs_s  # [BLOCK_S]
    m = tl.load(part_max_ptr + part, mask=s_valid, other=float("-inf"))
    l_sum = tl.load(part_sum_ptr + part, mask=s_valid, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all empty: keep exp2 finite
    weight = tl.exp2(m - m_max)  # [BLOCK_S]; exp2(-inf) == 0 for empty splits
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
                  mask=s_valid[:, None], other=0.0)  # [BLOCK_S, BLOCK_D]
    total = tl.sum(weight * l_sum, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.maximum(total, 1e-30)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


def _decode_partials(num_seqs: int, num_heads: int, num_splits: int, block_d: int,
                     out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-split accumulators, softmax maxima and sums (float32); unused with one split, when
    `out` stands in for all three."""
    if num_splits == 1:
        return out, out, out
    shape = (num_seqs, num_heads, num_splits)
    return (torch.empty((*shape, block_d), dtype=torch.float32, device=out.device),
            torch.empty(shape, dtype=torch.float32, device=out.device),
            torch.empty(shape, dtype=torch.float32, device=out.device))


def default_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int,
                       num_sms: int, block_n: int = 64) -> int:
    """Enough splits to give every SM about two programs, but never a split shorter than
    four key tiles: short contexts or large batches already fill the device without them."""
    wanted = triton.cdiv(2 * num_sms, max(1, num_seqs * num_kv_heads))
    by_length = triton.cdiv(max_seq_len, 4 * block_n)
    return max(1, min(wanted, by_length, MAX_DECODE_SPLITS))


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int = 1,
                           sliding_window: int | None = None) -> torch.Tensor:
    """One query token per sequence (query [num_seqs, num_heads, head_dim]) attending to its
    whole context (seq_lens[i] tokens through block_tables[i]), or to its last
    sliding_window tokens. The grid depends only on
    the shapes and num_splits, never on the lengths, so a CUDA graph can capture it; a
    sequence of length 0 (a padding row) yields zeros."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(query)  # [num_seqs, num_heads, head_dim]
    if num_seqs == 0:
        return out
    assert 1 <= num_splits <= MAX_DECODE_SPLITS, num_splits
    tiles, block_d = _decode_tiles(query.dtype, head_dim), _block_d(head_dim)
    part_acc, part_max, part_sum = _decode_partials(num_seqs, num_heads, num_splits, block_d,
                                                    out)
    num_queries_per_kv = num_heads // num_kv_heads
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, k_cache, v_cache, out, part_acc, part_max, part_sum, block_tables, seq_lens,
        scale * _LOG2E, sliding_window or 0, *query.stride(), *out.stride(), *k_cache.stride(),
        block_tables.stride(0), k_cache.shape[1], head_dim, num_heads, num_queries_per_kv,
        BLOCK_G=max(tiles.block_m, triton.next_power_of_2(num_queries_per_kv)),
        BLOCK_N=tiles.block_n, BLOCK_D=block_d, NUM_SPLITS=num_splits,
        PRECISION=_dot_precision(query.dtype), IS_SLIDING=sliding_window is not None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_max, part_sum, *out.stride(), head_dim, num_heads,
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out

"""The reference attention backend: paged K/V writes, then attention over gathered context in
plain torch. Correct everywhere and the CPU fast path; the CUDA backends are checked against it."""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionMetadata, DecodePlan
from engine.kernels.native import (
    has_bf16_dot_products,
    loaded_library,
    native_library,
    takes_bf16,
)
from engine.kernels.portable import portable_library, takes_f32


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store each new token's K/V [num_tokens, num_kv_heads, head_dim] at its cache slot
    (slot = block_id * block_size + offset). The caches must be contiguous: a silent copy
    from reshape would drop the write."""
    if _write_kv_native(key, value, k_cache, v_cache, slot_mapping):
        return
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_slots = k_cache.view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, ...]
    v_slots = v_cache.view(-1, num_kv_heads, head_dim)
    k_slots.index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_slots.index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _write_kv_native(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """write_kv in one portable-kernel call (cpu_portable.c: kv_cache_write) where it can:
    CPU caches, K/V rows already in the cache dtype with each token's heads contiguous (views
    of the fused qkv output are), int64 slots. Against the two index_copy_: the same at one
    row (~4.8 us, mostly these checks), 1.26x faster at 16 rows, 2.9x at a 1,024-token
    prefill chunk (19.6 against 57.1 us). False: the caller copies in torch."""
    library = portable_library()
    if (library is None or not k_cache.is_cpu or not slot_mapping.is_cpu
            or slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous()
            or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
        return False
    head_dim = k_cache.shape[3]
    for rows, cache in ((key, k_cache), (value, v_cache)):
        if (rows.dtype != cache.dtype or not rows.is_cpu or rows.stride(-1) != 1
                or rows.stride(-2) != head_dim or rows.shape[1:] != cache.shape[2:]):
            return False
    row_bytes = k_cache.shape[2] * head_dim * k_cache.element_size()
    status = library.kv_cache_write(
        key.data_ptr(), key.stride(0) * key.element_size(), value.data_ptr(),
        value.stride(0) * value.element_size(), k_cache.data_ptr(), v_cache.data_ptr(),
        slot_mapping.data_ptr(), slot_mapping.shape[0], row_bytes,
        k_cache.shape[0] * k_cache.shape[1])
    if status != 0:
        raise IndexError(f"a cache slot is outside the cache's {k_cache.shape[0]} blocks of "
                         f"{k_cache.shape[1]}")
    return True


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor,
                   max_seq_len: int) -> torch.Tensor:
    """The first max_seq_len cached tokens of each sequence, in order:
    [num_seqs, max_seq_len, num_kv_heads, head_dim] from block_tables [num_seqs, >= blocks]."""
    num_seqs, block_size = block_tables.shape[0], cache.shape[1]
    num_blocks = -(-max_seq_len // block_size)
    # whole blocks as rows: one index_select copies contiguous rows, ~5x faster on CPU than
    # advanced indexing into the 4-d cache
    rows = cache.view(cache.shape[0], -1)  # [num_blocks, block_size * num_kv_heads * head_dim]
    blocks = rows.index_select(0, block_tables[:, :num_blocks].reshape(-1))
    context = blocks.view(num_seqs, num_blocks * block_size, *cache.shape[2:])
    return context[:, :max_seq_len]


# decode contexts are padded to a multiple of this many positions: oneDNN builds a kernel for
# each new matmul shape (~0.6 ms a shape, twice a layer), so a length growing by one token a
# step would pay that every step; a bucket pays it once per 32 steps, for <= 31 masked columns
CONTEXT_BUCKET = 32


def plan_decode_rows(metadata: AttentionMetadata, block_size: int,
                     num_kv_heads: int) -> DecodePlan | None:
    """The plan of the step's decode rows (None: it has none)."""
    seq_ids = [i for i, query_len in enumerate(metadata.query_lens_cpu) if query_len == 1]
    if not seq_ids:
        return None
    return build_decode_plan(metadata, seq_ids, block_size, num_kv_heads)


def build_decode_plan(metadata: AttentionMetadata, seq_ids: list[int], block_size: int,
                      num_kv_heads: int) -> DecodePlan:
    """Cache rows for the contexts of the sequences `seq_ids`, ordered [seq, kv_head, position]
    so one index_select yields K (or V) as [num_decode, num_kv_heads, max_len, head_dim]."""
    device = metadata.block_tables.device
    seq_lens = [metadata.seq_lens_cpu[i] for i in seq_ids]
    is_all = len(seq_ids) == metadata.num_seqs
    ids = None if is_all else torch.tensor(seq_ids, device=device)
    tables = metadata.block_tables if ids is None else metadata.block_tables[ids]
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    rows = None
    if not is_all:
        starts = [0]
        for query_len in metadata.query_lens_cpu:
            starts.append(starts[-1] + query_len)
        rows = torch.tensor([starts[i] for i in seq_ids], device=device)
    return DecodePlan(block_size, num_kv_heads, rows, _bucketed(max(seq_lens)),
                      tables.to(torch.int32).contiguous(), lens, max(seq_lens))


def matmul_gather(plan: DecodePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's (cache_rows, is_padding) for the batched-matmul path, made once per plan:
    the native kernel never reads them, and building them cost ~60 us a step."""
    if plan.cache_rows is None or plan.is_padding is None:
        positions = torch.arange(plan.max_len, device=plan.lens.device)
        tables = plan.block_tables
        # past a table's end (bucket padding) read its last entry: any valid block, masked
        block_index = (positions // plan.block_size).clamp_(max=tables.shape[1] - 1)
        slots = tables[:, block_index].long() * plan.block_size + positions % plan.block_size
        plan.cache_rows = _cache_rows(slots, plan.num_kv_heads)
        plan.is_padding = (positions[None, :] >= plan.lens[:, None])[:, None, None, :]
    return plan.cache_rows, plan.is_padding


def windowed_plan(plan: DecodePlan, window: int) -> DecodePlan:
    """`plan` over each context's last `window` positions, [max(0, len - window), len), the
    keys a sliding-window layer's query (at position len - 1) sees. Built once per step and
    window, by the first layer that needs it. Its block_tables and lens still describe the
    whole contexts: it is for the batched-matmul path only, never the native kernel."""
    if window not in plan.windowed:
        device = plan.lens.device
        max_len = _bucketed(min(plan.max_seq_len, window))
        first = (plan.lens.long() - window).clamp_(min=0)  # [num_decode]
        positions = first[:, None] + torch.arange(max_len, device=device)  # [num_decode, len]
        tables = plan.block_tables
        block_index = (positions // plan.block_size).clamp_(max=tables.shape[1] - 1)
        slots = (tables.gather(1, block_index).long() * plan.block_size
                 + positions % plan.block_size)
        is_padding = (positions >= plan.lens[:, None])[:, None, None, :]  # [seqs, 1, 1, len]
        plan.windowed[window] = replace(
            plan, cache_rows=_cache_rows(slots, plan.num_kv_heads), is_padding=is_padding,
            max_len=max_len, max_seq_len=min(plan.max_seq_len, window), windowed={})
    return plan.windowed[window]


def _bucketed(length: int) -> int:
    return -(-length // CONTEXT_BUCKET) * CONTEXT_BUCKET


def _cache_rows(slots: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """slots [num_decode, len] -> rows of cache.view(-1, head_dim), [seq, kv_head, position]."""
    heads = torch.arange(num_kv_heads, device=slots.device)
    return (slots[:, None, :] * num_kv_heads + heads[None, :, None]).reshape(-1)


class TorchAttentionBackend:
    """Writes the new K/V into the paged cache, then attends causally over each sequence's
    whole context (a sliding-window layer: over the window of it). Decode rows (one query
    token) of all sequences are batched together over a context gathered once per layer;
    sequences with several query tokens (prefill chunks) get one SDPA call each. One instance
    serves every layer and keeps nothing between calls: the decode rows' plan comes in the
    metadata, built once per step with it."""

    def plan_decode(self, metadata: AttentionMetadata,
                    k_cache: torch.Tensor) -> DecodePlan | None:
        return plan_decode_rows(metadata, k_cache.shape[1], k_cache.shape[2])

    def write_cache(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, metadata: AttentionMetadata) -> None:
        write_kv(key, value, k_cache, v_cache, metadata.slot_mapping)

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        write_kv(key, value, k_cache, v_cache, metadata.slot_mapping)
        plan = self._step_plan(metadata, k_cache)
        if metadata.is_decode_only:
            assert plan is not None
            return decode_attention(query, k_cache, v_cache, plan, scale, sliding_window)
        out = torch.empty_like(query)  # [num_tokens, num_heads, head_dim]
        if plan is not None:  # some sequences decode: their rows of a mixed batch
            assert plan.rows is not None
            out[plan.rows] = decode_attention(query[plan.rows], k_cache, v_cache, plan, scale,
                                              sliding_window)
        _prefill_chunks(query, key, value, k_cache, v_cache, metadata, scale, sliding_window,
                        out)
        return out

    def _step_plan(self, metadata: AttentionMetadata,
                   k_cache: torch.Tensor) -> DecodePlan | None:
        plan = metadata.decode_plan
        if plan is None:  # no decode rows, or metadata built by hand: plan for this call only
            return self.plan_decode(metadata, k_cache)
        assert (plan.block_size, plan.num_kv_heads) == k_cache.shape[1:3], "plan of another cache"
        return plan


def decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     plan: DecodePlan, scale: float,
                     sliding_window: int | None = None) -> torch.Tensor:
    """One query token per sequence (query [num_seqs, num_heads, head_dim]) attending to its
    whole context (or its last sliding_window tokens), which ends at that token, so only
    padding needs masking. Numerics follow transformers' eager attention: scores in the model
    dtype, softmax in float32. bf16 on a CPU with the native kernels: one call per layer;
    otherwise batched matmuls."""
    if sliding_window is not None and plan.max_seq_len > sliding_window:
        # the native kernel attends over [0, len) and takes no window (not changed blind: it
        # needs AVX-512 to test), so a window that cuts some context takes the matmul path,
        # over a gather of the windows alone
        return decode_attention_matmul(query, k_cache, v_cache,
                                       windowed_plan(plan, sliding_window), scale)
    if query.dtype == torch.bfloat16 and takes_bf16(k_cache, v_cache):
        return decode_attention_native(query, k_cache, v_cache, plan, scale)
    if query.dtype == torch.float32 and takes_f32(k_cache, v_cache):
        return decode_attention_native_f32(query, k_cache, v_cache, plan, scale)
    return decode_attention_matmul(query, k_cache, v_cache, plan, scale)


def decode_attention_matmul(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            plan: DecodePlan, scale: float) -> torch.Tensor:
    """decode_attention in torch ops, for every dtype and device: two batched matmuls around a
    float32 softmax, the query heads of each KV head folded into one matrix (GQA without
    repeating K/V), over K/V gathered straight into [num_seqs, num_kv_heads, max_len,
    head_dim]. On CPU this is 5-10x faster than SDPA with a padding mask."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    shape = (num_seqs, num_kv_heads, plan.max_len, head_dim)
    cache_rows, is_padding = matmul_gather(plan)
    keys = k_cache.view(-1, head_dim).index_select(0, cache_rows).view(shape)
    values = v_cache.view(-1, head_dim).index_select(0, cache_rows).view(shape)
    grouped = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(2, 3)).float()  # [seqs, kv_heads, group, len]
    # masked_fill, not adding -inf: whatever stale values padding reads (even inf) drop out
    scores.mul_(scale).masked_fill_(is_padding, float("-inf"))
    probs = scores.softmax(dim=-1).to(query.dtype)
    out = torch.matmul(probs, values)  # [num_seqs, num_kv_heads, group, head_dim]
    return out.view(num_seqs, num_heads, head_dim)


def decode_attention_native(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            plan: DecodePlan, scale: float) -> torch.Tensor:
    """decode_attention's arithmetic in one native call per layer (bf16 on CPU): the context
    is read in place through the block tables, not gathered, and the dozen torch ops of the
    batched-matmul path become one. Per layer, 300-400-token contexts: 27 vs 170 us at one
    sequence, 373 vs 438 us at 16, 1.0 vs 1.5 ms at 32."""
    query = query.contiguous()
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(query)
    status = loaded_library().paged_decode_attention_bf16(
        query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), plan.block_tables.data_ptr(),
        plan.lens.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_size,
        plan.block_tables.shape[1], scale, out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("paged_decode_attention_bf16 could not allocate its scratch")
    return out


def decode_attention_native_f32(query: torch.Tensor, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, plan: DecodePlan,
                                scale: float) -> torch.Tensor:
    """decode_attention in float32 through the portable kernel (any CPU with a C compiler):
    each context is read in place through its block table instead of gathered into a fresh
    copy per layer and step."""
    query = query.contiguous()
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(query)
    library = portable_library()
    assert library is not None
    status = library.paged_decode_attention_f32(
        query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), plan.block_tables.data_ptr(),
        plan.lens.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, block_size,
        plan.block_tables.shape[1], scale, out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("paged_decode_attention_f32 could not allocate its scratch")
    return out


def _prefill_chunks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata,
                    scale: float, sliding_window: int | None, out: torch.Tensor) -> None:
    """Attention for every sequence with several query tokens, one SDPA call each, into out."""
    start = 0
    for i, (query_len, seq_len) in enumerate(zip(metadata.query_lens_cpu,
                                                 metadata.seq_lens_cpu, strict=True)):
        if query_len > 1:
            rows = slice(start, start + query_len)
            out[rows] = _prefill_attention(query[rows], key[rows], value[rows], k_cache,
                                           v_cache, metadata.block_tables[i : i + 1], seq_len,
                                           scale, sliding_window)
        start += query_len


def _prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                       seq_len: int, scale: float,
                       sliding_window: int | None = None) -> torch.Tensor:
    """One sequence's query_len new tokens, the last ones of its seq_len-token context: query
    i sits at absolute position p = seq_len - query_len + i and sees keys [0, p], or with a
    sliding window (p - sliding_window, p]."""
    query_len = query.shape[0]
    if sliding_window is not None and sliding_window < seq_len:
        keys, values, mask = _windowed_context(key, value, k_cache, v_cache, block_table,
                                               seq_len, sliding_window)
    elif native_prefill_works(query, k_cache, v_cache):
        return prefill_attention_native(query, k_cache, v_cache, block_table, seq_len, scale)
    elif query_len == seq_len:  # nothing cached: the fresh K/V are the whole context
        keys, values, mask = key, value, None
    elif _split_prefill_works(query):
        return _prefill_after_prefix(query, key, value, k_cache, v_cache, block_table,
                                     seq_len - query_len, scale)
    else:
        keys = gather_context(k_cache, block_table, seq_len)[0]  # [seq_len, kv_heads, dim]
        values = gather_context(v_cache, block_table, seq_len)[0]
        mask = torch.ones(query_len, seq_len, dtype=torch.bool, device=query.device)
        mask = mask.tril(diagonal=seq_len - query_len)  # [query_len, seq_len]
    return _sdpa(query, keys, values, mask, scale)


def native_prefill_works(query: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor) -> bool:
    """Whether prefill_attention_native serves these tensors: bf16 (`native_prefill_serves`)."""
    return (native_prefill_serves(query.shape[-1]) and takes_bf16(k_cache, v_cache)
            and query.dtype == torch.bfloat16)


def native_prefill_serves(head_dim: int) -> bool:
    """Whether prefill_attention_native runs on this CPU for this head size: AVX512-BF16 (and
    the native library), head size 64 or 128."""
    return head_dim in (64, 128) and has_bf16_dot_products() and native_library() is not None


def prefill_attention_native(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_table: torch.Tensor, seq_len: int,
                             scale: float) -> torch.Tensor:
    """_prefill_attention in one native call: the chunk's K/V must already be in the cache
    (forward writes them first), and the whole context is read from it through the block
    table, tiled with an online softmax on AVX512-BF16 dot products. A 512-token chunk, 14
    query heads over 2 KV heads, 2 threads (Zen 5), against the two flash calls: 19.1 vs
    94.9 ms a layer at an 8k context (762 vs 153 GFLOP/s), 2.2 vs 12.5 ms at 1k."""
    query = query.contiguous()
    query_len, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    table = block_table.reshape(-1).to(torch.int32).contiguous()
    out = torch.empty_like(query)
    status = loaded_library().paged_prefill_attention_bf16(
        query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), table.data_ptr(), seq_len,
        query_len, num_heads, num_kv_heads, head_dim, block_size, scale, out.data_ptr(),
        torch.get_num_threads())
    if status != 0:
        raise MemoryError("paged_prefill_attention_bf16 could not allocate its scratch")
    return out


def _sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
          mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """SDPA of query [query_len, heads, dim] over keys/values [len, kv_heads, dim]: causal
    (top-left aligned) without a mask, else `mask` [query_len, len] (True: attend)."""
    # a leading batch dim: 3-d inputs send CPU SDPA to its math path, 2-4x slower than flash
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=query.shape[1] != keys.shape[1],
    )  # [1, num_heads, query_len, head_dim]
    return out[0].transpose(0, 1)


# torch's CPU flash attention with its log-sum-exp (torch >= 2.3); what F.sdpa calls inside
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _split_prefill_works(query: torch.Tensor) -> bool:
    return _CPU_FLASH is not None and query.device.type == "cpu"


def _prefill_after_prefix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_table: torch.Tensor, num_cached: int,
                          scale: float) -> torch.Tensor:
    """A chunk after num_cached cached tokens, on CPU, as two flash-attention calls merged by
    their log-sum-exps: the chunk over the cached prefix (no mask: every query sees all of
    it) and over itself (causal). Each KV head's query heads are folded into one long query
    ([kv_heads, group * query_len, dim]), so every K/V tile is read once for the whole group
    and the prefix part runs as matmuls of group * query_len rows. Against one masked SDPA
    over the whole context (the path CUDA keeps): an 8k context, 512-token chunk, 14 query
    heads over 2 KV heads, fp32: 113 vs 135 ms a layer, the prefix part alone at the square
    GEMM's rate (140 vs 145 GFLOP/s)."""
    query_len, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    # [query_len, kv_heads * group, dim] -> [1, kv_heads, group * query_len, dim]
    folded = (query.view(query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
              .reshape(1, num_kv_heads, group * query_len, head_dim))
    prefix_k = gather_context(k_cache, block_table, num_cached)[0].transpose(0, 1)[None]
    prefix_v = gather_context(v_cache, block_table, num_cached)[0].transpose(0, 1)[None]
    assert _CPU_FLASH is not None
    out_prefix, lse_prefix = _CPU_FLASH(folded, prefix_k.to(query.dtype),
                                        prefix_v.to(query.dtype), scale=scale)[:2]
    out_chunk, lse_chunk = _CPU_FLASH(
        folded, key.transpose(0, 1)[None], value.transpose(0, 1)[None],
        attn_mask=_folded_causal_mask(query_len, group, query.dtype, query.device),
        scale=scale)[:2]
    # softmax over both parts = each part's softmax weighted by its share of the exp-sum
    lse = torch.logaddexp(lse_prefix, lse_chunk)  # [1, kv_heads, group * query_len], fp32
    out = (out_prefix.float() * (lse_prefix - lse).exp_().unsqueeze(-1)
           + out_chunk.float() * (lse_chunk - lse).exp_().unsqueeze(-1))
    # [1, kv_heads, group * query_len, dim] -> [query_len, kv_heads * group, dim]
    return (out.to(query.dtype).view(num_kv_heads, group, query_len, head_dim)
            .permute(2, 0, 1, 3).reshape(query_len, num_heads, head_dim))


@functools.lru_cache(maxsize=16)
def _folded_causal_mask(query_len: int, group: int, dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
    """Additive causal mask [group * query_len, query_len] of a chunk over itself, its rows
    repeating for each query head of a KV group (the flash kernel takes a mask of the
    query's dtype, not bool). A dozen distinct chunk lengths at most: cached."""
    causal = torch.ones(query_len, query_len, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(query_len, query_len, dtype=dtype, device=device)
    mask.masked_fill_(~causal, float("-inf"))
    return mask.repeat(group, 1)


def _windowed_context(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                      window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values and mask [query_len, seq_len - first] of a sliding-window chunk: only
    positions [first, seq_len) are read, `first` the oldest key its first query sees."""
    query_len = key.shape[0]
    num_cached = seq_len - query_len
    first = max(0, num_cached - window + 1)
    if num_cached == 0:  # nothing cached: the fresh K/V are the whole context
        keys, values = key, value
    else:  # from the block holding `first` on
        skip = first // k_cache.shape[1]
        offset, length = first - skip * k_cache.shape[1], seq_len - skip * k_cache.shape[1]
        keys = gather_context(k_cache, block_table[:, skip:], length)[0, offset:]
        values = gather_context(v_cache, block_table[:, skip:], length)[0, offset:]
    # query i (position num_cached + i) sees key j (position first + j) when
    # num_cached + i - window < first + j <= num_cached + i
    mask = torch.ones(query_len, seq_len - first, dtype=torch.bool, device=key.device)
    diagonal = num_cached - first
    return keys, values, mask.tril(diagonal).triu(diagonal - window + 1)

"""The torch reference attention backend against naive float64 causal attention per sequence:
mixed prefill + decode batches, GQA/MQA, shuffled block tables, cached prefixes, sliding
windows."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from engine.attention import TorchAttentionBackend, get_attention_backend, torch_ref, write_kv
from engine.attention.base import AttentionMetadata

HEAD_DIM = 8


@dataclass(slots=True)
class SeqData:
    num_cached: int
    query_len: int
    block_ids: list[int]
    keys: torch.Tensor  # [seq_len, num_kv_heads, head_dim] float64: prefix + new tokens
    values: torch.Tensor
    queries: torch.Tensor  # [query_len, num_heads, head_dim] float64

    @property
    def seq_len(self) -> int:
        return self.num_cached + self.query_len

    def slot(self, position: int, block_size: int) -> int:
        return self.block_ids[position // block_size] * block_size + position % block_size


def make_sequences(shapes: Sequence[tuple[int, int]], num_heads: int, num_kv_heads: int,
                   block_size: int, seed: int,
                   head_dim: int = HEAD_DIM) -> tuple[list[SeqData], int]:
    """(num_cached, query_len) per sequence -> sequences with random data and blocks drawn
    from a shuffled pool (with spares), plus the pool size."""
    gen = torch.Generator().manual_seed(seed)
    needs = [-(-(cached + q_len) // block_size) for cached, q_len in shapes]
    pool = list(range(sum(needs) + 4))
    random.Random(seed).shuffle(pool)
    seqs = []
    for (cached, q_len), need in zip(shapes, needs, strict=True):
        block_ids, pool = pool[:need], pool[need:]
        seq_len = cached + q_len
        seqs.append(SeqData(
            cached, q_len, block_ids,
            keys=torch.randn(seq_len, num_kv_heads, head_dim, generator=gen, dtype=torch.float64),
            values=torch.randn(seq_len, num_kv_heads, head_dim, generator=gen,
                               dtype=torch.float64),
            queries=torch.randn(q_len, num_heads, head_dim, generator=gen, dtype=torch.float64),
        ))
    return seqs, sum(needs) + 4


def naive_attention(seq: SeqData, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """softmax(QK^T * scale) V in float64; query i at position p = num_cached + i sees keys
    [0, p], or (p - sliding_window, p]."""
    num_heads, num_kv_heads = seq.queries.shape[1], seq.keys.shape[1]
    group = num_heads // num_kv_heads
    keys = seq.keys.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
    values = seq.values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", seq.queries, keys) * scale
    query_pos = torch.arange(seq.num_cached, seq.seq_len)[:, None]
    key_pos = torch.arange(seq.seq_len)[None, :]
    is_hidden = key_pos > query_pos
    if sliding_window is not None:
        is_hidden |= key_pos <= query_pos - sliding_window
    scores = scores.masked_fill(is_hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values)


def build_metadata(seqs: Sequence[SeqData], block_size: int) -> AttentionMetadata:
    slots = [seq.slot(p, block_size) for seq in seqs for p in range(seq.num_cached, seq.seq_len)]
    max_blocks = max(len(seq.block_ids) for seq in seqs)
    tables = [seq.block_ids + [0] * (max_blocks - len(seq.block_ids)) for seq in seqs]
    query_lens = [seq.query_len for seq in seqs]
    seq_lens = [seq.seq_len for seq in seqs]
    cu = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64), cu_seqlens_q=cu,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32), max_seqlen_q=max(query_lens),
        max_seqlen_k=max(seq_lens), query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)


def run_backend(seqs: list[SeqData], num_blocks: int, block_size: int, scale: float,
                dtype: torch.dtype = torch.float32,
                sliding_window: int | None = None) -> tuple[torch.Tensor, ...]:
    """Fill a garbage cache with each prefix's K/V, run one step of the new tokens."""
    num_kv_heads, head_dim = seqs[0].keys.shape[1:]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = (torch.randn(shape) * 100).to(dtype)  # garbage, so a stray read shows
    v_cache = (torch.randn(shape) * 100).to(dtype)
    for seq in seqs:
        for position in range(seq.num_cached):
            slot = seq.slot(position, block_size)
            k_cache.view(-1, num_kv_heads, head_dim)[slot] = seq.keys[position].to(dtype)
            v_cache.view(-1, num_kv_heads, head_dim)[slot] = seq.values[position].to(dtype)
    new = [slice(seq.num_cached, seq.seq_len) for seq in seqs]
    query = torch.cat([seq.queries for seq in seqs]).to(dtype)
    key = torch.cat([seq.keys[s] for seq, s in zip(seqs, new, strict=True)]).to(dtype)
    value = torch.cat([seq.values[s] for seq, s in zip(seqs, new, strict=True)]).to(dtype)
    out = get_attention_backend(torch.device("cpu")).forward(
        query, key, value, k_cache, v_cache, build_metadata(seqs, block_size), scale,
        sliding_window=sliding_window)
    return out, k_cache, v_cache


MIXED = [(0, 7), (5, 3), (9, 1), (0, 1), (13, 1), (3, 4), (0, 16)]
DECODE_ONLY = [(4, 1), (0, 1), (17, 1), (8, 1), (31, 1)]


@pytest.mark.parametrize("shapes", [MIXED, DECODE_ONLY, [(0, 21)], [(11, 10)]],
                         ids=["mixed", "decode-only", "one-prefill", "one-chunk"])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (6, 2), (4, 1)],
                         ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_backend_matches_naive_attention(shapes: list[tuple[int, int]], num_heads: int,
                                         num_kv_heads: int, block_size: int) -> None:
    seqs, num_blocks = make_sequences(shapes, num_heads, num_kv_heads, block_size, seed=block_size)
    scale = HEAD_DIM**-0.5
    out, _, _ = run_backend(seqs, num_blocks, block_size, scale)
    assert out.shape == (sum(q for _, q in shapes), num_heads, HEAD_DIM)
    expected = torch.cat([naive_attention(seq, scale) for seq in seqs])
    assert (out.double() - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("seed", range(8))
def test_random_batches_match_naive_attention(seed: int) -> None:
    rng = random.Random(seed)
    shapes = [(rng.choice([0, rng.randrange(40)]), rng.choice([1, 1, rng.randrange(1, 20)]))
              for _ in range(rng.randrange(1, 7))]
    block_size = rng.choice([2, 8])
    seqs, num_blocks = make_sequences(shapes, 6, 3, block_size, seed=seed)
    out, _, _ = run_backend(seqs, num_blocks, block_size, scale=0.3)
    expected = torch.cat([naive_attention(seq, 0.3) for seq in seqs])
    assert (out.double() - expected).abs().max().item() < 1e-5


# chunks after a cached prefix: prefixes ending inside and on block boundaries, chunks of
# one block and of several, next to decode rows and fresh prompts
CHUNKS_AFTER_PREFIX = [(16, 16), (37, 23), (5, 64), (64, 1), (0, 9), (100, 2), (3, 3)]


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (14, 2), (4, 1)],
                         ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("split", [True, False], ids=["split-lse", "masked-sdpa"])
def test_chunks_after_a_cached_prefix(num_heads: int, num_kv_heads: int, split: bool,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Both prefill paths against naive attention: on CPU, the prefix and the chunk as two
    flash calls merged by log-sum-exp; elsewhere (forced here), one masked SDPA."""
    if not split:
        monkeypatch.setattr(torch_ref, "_split_prefill_works", lambda query: False)
    elif not torch_ref._split_prefill_works(torch.empty(1)):
        pytest.skip("this torch has no CPU flash attention with log-sum-exp")
    seqs, num_blocks = make_sequences(CHUNKS_AFTER_PREFIX, num_heads, num_kv_heads,
                                      block_size=16, seed=num_heads + num_kv_heads)
    scale = HEAD_DIM**-0.5
    expected = torch.cat([naive_attention(seq, scale) for seq in seqs])
    out, _, _ = run_backend(seqs, num_blocks, 16, scale)
    assert (out.double() - expected).abs().max().item() < 1e-5
    out, _, _ = run_backend(seqs, num_blocks, 16, scale, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected).abs().max().item() < 5e-2


def test_the_split_prefill_path_is_the_one_cpu_takes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk after a cached prefix goes through the two flash calls on CPU (where this torch
    has them), so the tests above check the path that runs."""
    if not torch_ref._split_prefill_works(torch.empty(1)):
        pytest.skip("this torch has no CPU flash attention with log-sum-exp")
    calls: list[int] = []
    real = torch_ref._prefill_after_prefix

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch_ref, "_prefill_after_prefix", counted)
    seqs, num_blocks = make_sequences([(20, 5), (0, 7), (9, 1)], 4, 2, block_size=4, seed=1)
    run_backend(seqs, num_blocks, 4, scale=0.5)
    assert len(calls) == 1  # the (20, 5) chunk; not the fresh prompt, not the decode row


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (14, 2), (4, 1)],
                         ids=["mha", "gqa", "mqa"])
def test_float32_decode_kernel_matches_the_matmul_path(block_size: int, num_heads: int,
                                                       num_kv_heads: int) -> None:
    """The portable float32 decode kernel (contexts read in place through shuffled block
    tables) against the gathered batched-matmul path and naive attention."""
    if torch_ref.portable_library() is None:
        pytest.skip("portable CPU kernels unavailable here")
    shapes = [(c, 1) for c in (0, 7, 300, 16, 95, 1000)]
    seqs, num_blocks = make_sequences(shapes, num_heads, num_kv_heads, block_size, seed=7)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, HEAD_DIM) * 3
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, HEAD_DIM)
    for seq in seqs:
        for position in range(seq.seq_len):
            block, offset = divmod(seq.slot(position, block_size), block_size)
            k_cache[block, offset] = seq.keys[position].float()
            v_cache[block, offset] = seq.values[position].float()
    metadata = build_metadata(seqs, block_size)
    plan = torch_ref.plan_decode_rows(metadata, block_size, num_kv_heads)
    assert plan is not None
    query = torch.cat([seq.queries for seq in seqs]).float()
    native = torch_ref.decode_attention_native_f32(query, k_cache, v_cache, plan, 0.3)
    matmul = torch_ref.decode_attention_matmul(query, k_cache, v_cache, plan, 0.3)
    expected = torch.cat([naive_attention(seq, 0.3) for seq in seqs])
    assert (native.double() - expected).abs().max().item() < 1e-5
    assert (native - matmul).abs().max().item() < 1e-5


def test_float32_decode_takes_the_kernel_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if torch_ref.portable_library() is None:
        pytest.skip("portable CPU kernels unavailable here")
    calls: list[int] = []
    real = torch_ref.decode_attention_native_f32
    monkeypatch.setattr(torch_ref, "decode_attention_native_f32",
                        lambda *args: calls.append(1) or real(*args))
    seqs, num_blocks = make_sequences(DECODE_ONLY, 4, 2, block_size=4, seed=2)
    out, _, _ = run_backend(seqs, num_blocks, 4, scale=0.5)
    expected = torch.cat([naive_attention(seq, 0.5) for seq in seqs])
    assert calls == [1] and (out.double() - expected).abs().max().item() < 1e-5


needs_bf16_prefill_kernel = pytest.mark.skipif(
    not torch_ref.native_prefill_works(torch.empty(1, 1, 64, dtype=torch.bfloat16),
                                       torch.empty(1, dtype=torch.bfloat16),
                                       torch.empty(1, dtype=torch.bfloat16)),
    reason="the bf16 prefill kernel needs AVX-512 VNNI and BF16 and a C compiler")
# fresh prompts and chunks after cached prefixes: lengths on and off the kernel's 64-key
# steps and 6-row tiles, a context of several hundred keys (many online-softmax rescales)
PREFILL_SHAPES = [(0, 37), (16, 16), (37, 23), (5, 64), (100, 2), (0, 2), (700, 90), (31, 33)]


@needs_bf16_prefill_kernel
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (14, 2), (4, 1)],
                         ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("block_size", [16, 5])
def test_bf16_prefill_kernel_matches_naive_attention(head_dim: int, num_heads: int,
                                                     num_kv_heads: int, block_size: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The native bf16 prefill kernel (the whole context read from the cache through shuffled
    block tables) against float64 attention, and against torch's bf16 path on the same
    inputs: each within bf16's error, the kernel no further from the truth than torch."""
    seqs, num_blocks = make_sequences(PREFILL_SHAPES, num_heads, num_kv_heads, block_size,
                                      seed=head_dim + num_heads + block_size, head_dim=head_dim)
    for seq in seqs:  # scores of a few units: sharp rows, so a wrong max or rescale shows
        seq.queries *= 3
    scale = head_dim**-0.5
    expected = torch.cat([naive_attention(seq, scale) for seq in seqs])
    calls: list[int] = []
    real = torch_ref.prefill_attention_native
    monkeypatch.setattr(torch_ref, "prefill_attention_native",
                        lambda *args: calls.append(1) or real(*args))
    native, _, _ = run_backend(seqs, num_blocks, block_size, scale, dtype=torch.bfloat16)
    assert len(calls) == len(seqs)  # every sequence here has several query tokens
    monkeypatch.setattr(torch_ref, "native_prefill_works", lambda *args: False)
    reference, _, _ = run_backend(seqs, num_blocks, block_size, scale, dtype=torch.bfloat16)
    native_error = (native.double() - expected).abs()
    reference_error = (reference.double() - expected).abs()
    assert native_error.max().item() < 5e-2
    assert native_error.mean().item() < 1.5 * reference_error.mean().item()


@needs_bf16_prefill_kernel
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("slope", [1.0, -1.0], ids=["rising", "falling"])
def test_bf16_prefill_kernel_follows_a_moving_max(head_dim: int, slope: float,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores that climb 200 units along the context (the running max passes its lazy
    threshold in block after block) or fall as much (the first block's max holds to the end):
    the kernel's rescaling against float64 attention on the same bf16 inputs, and against
    torch's bf16 path."""
    seqs, num_blocks = make_sequences([(700, 90), (0, 130), (200, 64)], 14, 2, 16, seed=11,
                                      head_dim=head_dim)
    scale = head_dim**-0.5
    for seq in seqs:  # the scaled score's first term: -100 to 100 along the context
        seq.keys[:, :, 0] = torch.linspace(-100, 100, seq.seq_len, dtype=torch.float64)[:, None]
        seq.queries[:, :, 0] = slope / scale
        for data in (seq.keys, seq.queries, seq.values):  # the truth: the same bf16 inputs
            data.copy_(data.to(torch.bfloat16).double())
    expected = torch.cat([naive_attention(seq, scale) for seq in seqs])
    calls: list[int] = []
    real = torch_ref.prefill_attention_native
    monkeypatch.setattr(torch_ref, "prefill_attention_native",
                        lambda *args: calls.append(1) or real(*args))
    native, _, _ = run_backend(seqs, num_blocks, 16, scale, dtype=torch.bfloat16)
    assert len(calls) == len(seqs)
    monkeypatch.setattr(torch_ref, "native_prefill_works", lambda *args: False)
    reference, _, _ = run_backend(seqs, num_blocks, 16, scale, dtype=torch.bfloat16)
    native_error = (native.double() - expected).abs()
    reference_error = (reference.double() - expected).abs()
    assert native_error.max().item() < 5e-2
    assert native_error.mean().item() < 1.5 * reference_error.mean().item()


def test_new_kv_are_written_at_their_slots() -> None:
    seqs, num_blocks = make_sequences(MIXED, 4, 2, block_size=4, seed=3)
    _, k_cache, v_cache = run_backend(seqs, num_blocks, 4, scale=0.5)
    for seq in seqs:
        for position in range(seq.seq_len):  # prefix (pre-filled) and new tokens alike
            block, offset = divmod(seq.slot(position, 4), 4)
            assert torch.equal(k_cache[block, offset], seq.keys[position].float())
            assert torch.equal(v_cache[block, offset], seq.values[position].float())


def test_write_kv_touches_only_the_given_slots() -> None:
    k_cache, v_cache = torch.zeros(5, 4, 2, 3), torch.zeros(5, 4, 2, 3)
    key, value = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    write_kv(key, value, k_cache, v_cache, torch.tensor([17, 2, 8]))
    assert torch.equal(k_cache[4, 1], key[0]) and torch.equal(v_cache[0, 2], value[1])
    assert torch.equal(k_cache[2, 0], key[2])
    assert int((k_cache != 0).any(dim=(2, 3)).sum()) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_takes_views_of_a_fused_qkv_row(dtype: torch.dtype) -> None:
    """K and V as the models pass them (strided views into one [tokens, q + k + v] output)
    land where index_copy_ puts them, in the native write and the torch one alike."""
    torch.manual_seed(0)
    qkv = torch.randn(6, (4 + 2 + 2) * 8).to(dtype)  # 4 query heads, 2 KV heads, head size 8
    key, value = qkv[:, 32:48].view(6, 2, 8), qkv[:, 48:].view(6, 2, 8)
    slots = torch.tensor([5, 0, 31, 12, 13, 7])
    expected_k, expected_v = torch.zeros(4, 8, 2, 8, dtype=dtype), torch.zeros(4, 8, 2, 8,
                                                                               dtype=dtype)
    expected_k.view(-1, 2, 8).index_copy_(0, slots, key)
    expected_v.view(-1, 2, 8).index_copy_(0, slots, value)
    k_cache, v_cache = torch.zeros_like(expected_k), torch.zeros_like(expected_v)
    written = torch_ref._write_kv_native(key, value, k_cache, v_cache, slots)
    assert written == (torch_ref.portable_library() is not None)
    write_kv(key, value, k_cache, v_cache, slots)  # again through the public entry: the same
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_write_kv_refuses_a_slot_outside_the_cache() -> None:
    """An IndexError either way; the native write checks every slot first and so writes
    nothing (torch's index_copy_ may have copied the rows before the bad one)."""
    k_cache, v_cache = torch.zeros(2, 4, 1, 4), torch.zeros(2, 4, 1, 4)
    key, value = torch.ones(2, 1, 4), torch.ones(2, 1, 4)
    with pytest.raises(IndexError):
        write_kv(key, value, k_cache, v_cache, torch.tensor([3, 8]))  # 8 slots: 0..7
    if torch_ref.portable_library() is not None:
        assert not k_cache.any() and not v_cache.any()


def test_bfloat16_caches_and_inputs() -> None:
    seqs, num_blocks = make_sequences(MIXED, 6, 2, block_size=4, seed=5)
    out, _, _ = run_backend(seqs, num_blocks, 4, scale=0.4, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    expected = torch.cat([naive_attention(seq, 0.4) for seq in seqs])
    assert (out.double() - expected).abs().max().item() < 5e-2  # bf16 has ~3 decimal digits


def test_cpu_gets_the_reference_backend() -> None:
    assert isinstance(get_attention_backend(torch.device("cpu")), TorchAttentionBackend)


# sliding windows: contexts well past the window, prefixes cached up to block boundaries and
# not, chunks that start inside and outside the first window, decode rows short and long
WINDOWED = {
    "mixed": [(0, 30), (21, 9), (40, 1), (5, 1), (16, 16), (33, 3), (0, 1), (70, 1)],
    "decode-only": [(c, 1) for c in (3, 90, 11, 12, 47, 130)],
    "one-prefill": [(0, 61)],
    "chunks": [(20, 20), (40, 20), (60, 5)],  # one prompt's chunked prefill, step by step
}


@pytest.mark.parametrize("shapes", list(WINDOWED), ids=list(WINDOWED))
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (6, 2), (4, 1)],
                         ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize(("block_size", "window"), [(4, 12), (16, 16), (8, 1), (1, 33)])
def test_sliding_window_matches_naive_attention(shapes: str, num_heads: int, num_kv_heads: int,
                                                block_size: int, window: int) -> None:
    seqs, num_blocks = make_sequences(WINDOWED[shapes], num_heads, num_kv_heads, block_size,
                                      seed=window)
    scale = HEAD_DIM**-0.5
    out, _, _ = run_backend(seqs, num_blocks, block_size, scale, sliding_window=window)
    expected = torch.cat([naive_attention(seq, scale, window) for seq in seqs])
    assert (out.double() - expected).abs().max().item() < 1e-5
    full = torch.cat([naive_attention(seq, scale) for seq in seqs])
    assert (out.double() - full).abs().max().item() > 1e-2  # the window did cut something


def test_a_window_no_context_reaches_is_full_attention() -> None:
    seqs, num_blocks = make_sequences(MIXED, 6, 2, block_size=4, seed=11)
    out, _, _ = run_backend(seqs, num_blocks, 4, scale=0.3, sliding_window=32)  # seq_len <= 32
    expected = torch.cat([naive_attention(seq, 0.3) for seq in seqs])
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_layers_with_different_windows_share_one_step_plan() -> None:
    """The model runner plans a step once for every layer: full-attention layers and layers
    with different windows all read that plan, each getting its own attention."""
    shapes = [(c, 1) for c in (50, 7, 33, 90)] + [(12, 9)]
    seqs, num_blocks = make_sequences(shapes, 6, 3, block_size=8, seed=12)
    backend = TorchAttentionBackend()
    metadata = build_metadata(seqs, 8)
    k_cache, v_cache = torch.randn(num_blocks, 8, 3, HEAD_DIM), torch.randn(num_blocks, 8, 3,
                                                                            HEAD_DIM)
    metadata.decode_plan = backend.plan_decode(metadata, k_cache)
    for seq in seqs:
        for position in range(seq.seq_len):
            block, offset = divmod(seq.slot(position, 8), 8)
            k_cache[block, offset] = seq.keys[position]
            v_cache[block, offset] = seq.values[position]
    query = torch.cat([seq.queries for seq in seqs]).float()
    new = [(seq.keys[seq.num_cached:], seq.values[seq.num_cached:]) for seq in seqs]
    key, value = (torch.cat([kv[i] for kv in new]).float() for i in (0, 1))
    for window in (None, 20, 5, None, 20):
        out = backend.forward(query, key, value, k_cache, v_cache, metadata, 0.3, window)
        expected = torch.cat([naive_attention(seq, 0.3, window) for seq in seqs])
        assert (out.double() - expected).abs().max().item() < 1e-5
    assert metadata.decode_plan is not None and sorted(metadata.decode_plan.windowed) == [5, 20]


def test_windowed_bfloat16_decode() -> None:
    # bf16 on CPU would take the native kernel, which has no window: a cut context must not
    seqs, num_blocks = make_sequences([(c, 1) for c in (40, 3, 66)], 4, 2, block_size=8, seed=13)
    out, _, _ = run_backend(seqs, num_blocks, 8, scale=0.4, dtype=torch.bfloat16,
                            sliding_window=10)
    expected = torch.cat([naive_attention(seq, 0.4, 10) for seq in seqs])
    assert (out.double() - expected).abs().max().item() < 5e-2

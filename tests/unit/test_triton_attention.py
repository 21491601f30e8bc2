"""The Triton attention kernels and the CUDA backend against the torch reference backend: K/V
writes, varlen prefill with and without cached prefix blocks, paged decode over ragged lengths
and shuffled block tables, split-K, padding rows, and greedy decoding end to end.

On CPU the kernels run under TRITON_INTERPRET=1 (tiny shapes: the interpreter runs each
program in numpy). With PAGEDSERVE_TEST_DEVICE=cuda the same cases run compiled on the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

DEVICE = torch.device(os.environ.get("PAGEDSERVE_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("PAGEDSERVE_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)



def _import_kernels() -> None:
    # triton.jit picks interpreter or compiler when it decorates (Triton's own library
    # functions included), so the variable must be set before Triton is first imported;
    # restored after (the fixture below sets it again around each test of this module)
    saved = os.environ.get("TRITON_INTERPRET")
    if DEVICE.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton", reason="Triton is not installed (pip install triton; "
                                             "wheels exist for x86-64 and aarch64 Linux)")
        import engine.attention.triton_kernels  # noqa: F401
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


_import_kernels()

import numpy  # noqa: E402
import triton  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.attention import (  # noqa: E402
    ATTENTION_BACKEND_ENV,
    TorchAttentionBackend,
    get_attention_backend,
    write_kv,
)
from engine.attention import triton_kernels as kernels  # noqa: E402
from engine.attention.base import AttentionMetadata  # noqa: E402
from engine.attention.cuda import CudaAttentionBackend  # noqa: E402
from engine.errors import InvalidRequestError  # noqa: E402

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
if DEVICE.type == "cpu" and TRITON_VERSION < (3, 7):
    # seen with Triton 3.6 and numpy 2.4: int() of a loaded scalar, a 1-element array, raises
    pytest.skip(f"Triton {triton.__version__}'s interpreter fails on loop bounds loaded from "
                f"memory with numpy {numpy.__version__}; Triton 3.7 and later work "
                "(pip install 'triton>=3.7')", allow_module_level=True)
if DEVICE.type == "cpu" and not kernels.IS_INTERPRETED:
    pytest.skip("Triton was imported in compiled mode before this module could set "
                "TRITON_INTERPRET=1; run this file in its own process", allow_module_level=True)

TOLERANCE = 1e-3  # fp32, against the reference backend


@pytest.fixture(autouse=True)
def _interpreter_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    # Triton also reads the variable while it runs interpreted kernels (lazy imports)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@dataclass(slots=True)
class Batch:
    """One step's inputs: new tokens' Q/K/V, garbage-filled caches whose blocks also serve as
    the cached prefixes, and the metadata the model runner would build."""

    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    metadata: AttentionMetadata


def make_batch(shapes: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, seed: int) -> Batch:
    """(num_cached, query_len) per sequence. Blocks come from a shuffled pool with spares, so
    tables are not contiguous; tables get two extra padding columns; the cache is random and
    large, so a read of a wrong slot shows up in the output."""
    gen = torch.Generator().manual_seed(seed)
    needs = [-(-(cached + q_len) // block_size) for cached, q_len in shapes]
    pool = torch.randperm(sum(needs) + 3, generator=gen).tolist()
    tables, slots = [], []
    for (cached, q_len), need in zip(shapes, needs, strict=True):
        table, pool = pool[:need], pool[need:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(cached, cached + q_len)]
    width = max(needs) + 2
    num_tokens = sum(q_len for _, q_len in shapes)
    cache_shape = (sum(needs) + 3, block_size, num_kv_heads, head_dim)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(DEVICE)

    query_lens = [q_len for _, q_len in shapes]
    seq_lens = [cached + q_len for cached, q_len in shapes]
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        cu_seqlens_q=torch.tensor([0, *query_lens], device=DEVICE).cumsum(0).to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                  dtype=torch.int32, device=DEVICE),
        max_seqlen_q=max(query_lens), max_seqlen_k=max(seq_lens),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
    return Batch(randn(num_tokens, num_heads, head_dim), randn(num_tokens, num_kv_heads, head_dim),
                 randn(num_tokens, num_kv_heads, head_dim), randn(*cache_shape, std=3.0),
                 randn(*cache_shape, std=3.0), metadata)


def reference(batch: Batch, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference backend's output and caches, on copies of the batch's caches."""
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    out = TorchAttentionBackend().forward(batch.query, batch.key, batch.value, k_cache, v_cache,
                                          batch.metadata, scale)
    return out, k_cache, v_cache


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


HEADS = {"gqa": (4, 2, 16), "mha-odd-dim": (2, 2, 12), "mqa": (4, 1, 32)}
PREFILL_CASES = {
    # each sequence's first step: the fresh K/V are its whole context
    "no-prefix": [(0, 21), (0, 5), (0, 1), (0, 9)],
    # prefix blocks already cached, block-aligned and not, mixed with decode rows
    "cached-prefix": [(8, 9), (5, 3), (13, 1), (0, 6), (16, 16), (3, 1)],
}


@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
@pytest.mark.parametrize("case", list(PREFILL_CASES), ids=list(PREFILL_CASES))
def test_prefill_matches_the_reference(case: str, heads: str) -> None:
    block_size = 4 if heads == "gqa" else 8
    seed = 10 * list(PREFILL_CASES).index(case) + list(HEADS).index(heads)  # fresh per case
    batch = make_batch(PREFILL_CASES[case], *HEADS[heads], block_size, seed)
    scale = HEADS[heads][2] ** -0.5
    expected, k_expected, v_expected = reference(batch, scale)
    kernels.reshape_and_cache(batch.key, batch.value, batch.k_cache, batch.v_cache,
                              batch.metadata.slot_mapping)
    assert torch.equal(batch.k_cache, k_expected) and torch.equal(batch.v_cache, v_expected)
    meta = batch.metadata
    out = kernels.paged_prefill_attention(batch.query, batch.k_cache, batch.v_cache,
                                          meta.block_tables, meta.cu_seqlens_q, meta.seq_lens,
                                          meta.max_seqlen_q, scale)
    assert out.shape == expected.shape
    assert max_error(out, expected) < TOLERANCE


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_matches_the_reference_over_ragged_contexts(num_splits: int) -> None:
    # lengths 1..70 over shuffled blocks; more splits than tiles leaves some splits empty
    shapes = [(cached, 1) for cached in (0, 4, 17, 31, 69, 8, 2)]
    batch = make_batch(shapes, 6, 2, 16, block_size=4, seed=100 + num_splits)
    expected, _, _ = reference(batch, scale=0.3)
    kernels.reshape_and_cache(batch.key, batch.value, batch.k_cache, batch.v_cache,
                              batch.metadata.slot_mapping)
    out = kernels.paged_decode_attention(batch.query, batch.k_cache, batch.v_cache,
                                         batch.metadata.block_tables, batch.metadata.seq_lens,
                                         0.3, num_splits)
    assert max_error(out, expected) < TOLERANCE


def test_backend_step_matches_the_reference_for_mixed_and_decode_batches() -> None:
    backend = CudaAttentionBackend()
    for seed, shapes in enumerate([[(6, 10), (0, 1), (20, 1), (0, 13)],
                                   [(c, 1) for c in (40, 3, 0, 77, 15)]]):
        batch = make_batch(shapes, 8, 2, 16, block_size=8, seed=200 + seed)
        expected, k_expected, v_expected = reference(batch, scale=0.25)
        out = backend.forward(batch.query, batch.key, batch.value, batch.k_cache,
                              batch.v_cache, batch.metadata, 0.25)
        assert max_error(out, expected) < TOLERANCE
        assert torch.equal(batch.k_cache, k_expected) and torch.equal(batch.v_cache, v_expected)


def test_write_cache_alone_writes_what_a_step_writes() -> None:
    """`write_cache` (the last layer of a chunk whose rows nobody reads) leaves both caches as
    the reference backend's whole step does, with the kernels and with the fallback (float64
    caches the kernels do not cover)."""
    backend = CudaAttentionBackend()
    for dtype in (torch.float32, torch.float64):
        batch = make_batch([(6, 10), (0, 1), (20, 1), (0, 13)], 8, 2, 16, block_size=8, seed=240)
        key, value = batch.key.to(dtype), batch.value.to(dtype)
        k_cache, v_cache = batch.k_cache.to(dtype), batch.v_cache.to(dtype)
        k_expected, v_expected = k_cache.clone(), v_cache.clone()
        TorchAttentionBackend().forward(batch.query.to(dtype), key, value, k_expected,
                                        v_expected, batch.metadata, 0.25)
        backend.write_cache(key, value, k_cache, v_cache, batch.metadata)
        assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def test_only_the_fallback_gets_a_decode_plan() -> None:
    """The kernels read lengths on the device: no host plan for them (and so CUDA graphs may
    capture the step); a cache they do not cover (float64) gets the torch fallback's plan."""
    backend = CudaAttentionBackend()
    batch = make_batch([(6, 10), (0, 1), (20, 1)], 8, 2, 16, block_size=8, seed=250)
    assert backend.plan_decode(batch.metadata, batch.k_cache) is None
    plan = backend.plan_decode(batch.metadata, batch.k_cache.double())
    assert plan is not None and plan.rows is not None and plan.rows.tolist() == [10, 11]


def test_kv_write_honours_strides_and_skips_padding_slots() -> None:
    # K and V as the model hands them over: column slices of one fused qkv output
    gen = torch.Generator().manual_seed(7)
    num_tokens, num_heads, num_kv_heads, head_dim = 5, 4, 2, 8
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen).to(DEVICE)  # [num_tokens, width]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    key = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    assert not key.is_contiguous()
    slots = torch.tensor([9, -1, 0, 22, -1], device=DEVICE)  # -1: a CUDA-graph padding row
    k_cache = torch.randn(6, 4, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    v_cache = torch.randn(6, 4, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    is_real = slots >= 0
    write_kv(key[is_real], value[is_real], k_expected, v_expected, slots[is_real])
    kernels.reshape_and_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_padding_rows_yield_zeros(num_splits: int) -> None:
    # a CUDA graph pads the batch with rows of seq_len 0; they must not produce NaN
    batch = make_batch([(9, 1), (0, 1)], 4, 2, 16, block_size=4, seed=300 + num_splits)
    seq_lens = torch.tensor([10, 0], dtype=torch.int32, device=DEVICE)
    expected, _, _ = reference(batch, scale=0.5)
    kernels.reshape_and_cache(batch.key, batch.value, batch.k_cache, batch.v_cache,
                              batch.metadata.slot_mapping)
    out = kernels.paged_decode_attention(batch.query, batch.k_cache, batch.v_cache,
                                         batch.metadata.block_tables, seq_lens, 0.5, num_splits)
    assert max_error(out[0], expected[0]) < TOLERANCE
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_default_num_splits_fills_idle_sms_only() -> None:
    assert kernels.default_num_splits(1, 2, 4096, num_sms=132) == kernels.MAX_DECODE_SPLITS
    assert kernels.default_num_splits(1, 2, 100, num_sms=132) == 1  # one tile per split max
    assert kernels.default_num_splits(256, 2, 4096, num_sms=132) == 1  # the batch fills SMs
    assert kernels.default_num_splits(32, 2, 4096, num_sms=132) == 5  # 64 programs -> 320


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ATTENTION_BACKEND_ENV, raising=False)
    cuda = torch.device("cuda")  # selection only; nothing is allocated on it
    assert isinstance(get_attention_backend(torch.device("cpu")), TorchAttentionBackend)
    assert isinstance(get_attention_backend(cuda), CudaAttentionBackend)
    assert isinstance(get_attention_backend(cuda, "torch"), TorchAttentionBackend)
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "torch")
    assert isinstance(get_attention_backend(cuda), TorchAttentionBackend)
    assert isinstance(get_attention_backend(cuda, "triton"), CudaAttentionBackend)
    with pytest.raises(InvalidRequestError, match="attention backend"):
        get_attention_backend(cuda, "flash")


def test_greedy_decoding_with_the_kernels_matches_the_reference_backend(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [[5, 17, 99, 3, 250, 31, 8, 77, 140], list(range(40, 60))]
    params = SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4)
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "torch")
    expected = LLM(str(tiny_llama_dir), dtype="float32", device=DEVICE.type,
                   num_blocks=16, block_size=4).generate(prompts, params)
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    llm = LLM(str(tiny_llama_dir), dtype="float32", device=DEVICE.type, num_blocks=16,
              block_size=4)
    backends = {type(m.attn_backend) for m in llm.llm_engine.loaded.model.modules()
                if hasattr(m, "attn_backend")}
    assert backends == {CudaAttentionBackend}
    outputs = llm.generate(prompts, params)
    assert ([o.outputs[0].token_ids for o in outputs]
            == [o.outputs[0].token_ids for o in expected])


def test_decode_through_graph_inputs_matches_eager(tiny_llama_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps through DecodeGraphs (3 sequences padded to a batch of 4 with slot -1
    and length 0 rows) give the eager run's greedy tokens. On CUDA the graphs are captured
    and replayed; on CPU they run uncaptured on the same padded static inputs."""
    prompts = [[5, 17, 99, 3, 250], list(range(40, 60)), [7, 8, 9]]
    params = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6)
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    engine_args = {"dtype": "float32", "device": DEVICE.type, "num_blocks": 32, "block_size": 4,
                   "max_num_seqs": 8}
    expected = LLM(str(tiny_llama_dir), enforce_eager=True, **engine_args).generate(prompts,
                                                                                   params)
    llm = LLM(str(tiny_llama_dir), **engine_args)
    runner = llm.llm_engine.core.runner
    if DEVICE.type == "cuda":
        assert runner.decode_graphs is not None
        assert sorted(runner.decode_graphs.graphs) == [1, 2, 4, 8]
    else:
        assert runner.decode_graphs is None  # CPU: nothing to capture
        runner.decode_graphs = runner.new_decode_graphs(8, 64, capture=False)
    graphs = runner.decode_graphs
    batch_sizes: list[int] = []
    run = graphs.run

    def counted_run(input_ids: torch.Tensor, positions: torch.Tensor,
                    metadata: AttentionMetadata) -> torch.Tensor:
        batch_sizes.append(metadata.num_seqs)
        return run(input_ids, positions, metadata)

    monkeypatch.setattr(graphs, "run", counted_run)
    outputs = llm.generate(prompts, params)
    assert ([o.outputs[0].token_ids for o in outputs]
            == [o.outputs[0].token_ids for o in expected])
    assert batch_sizes and set(batch_sizes) == {3}  # every decode step went through it
    assert torch.equal(graphs.slot_mapping[3:4].cpu(), torch.tensor([-1]))  # the padding row


def reference_windowed(batch: Batch, scale: float, window: int | None) -> torch.Tensor:
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    return TorchAttentionBackend().forward(batch.query, batch.key, batch.value, k_cache,
                                           v_cache, batch.metadata, scale, window)


# contexts past the window: chunks starting inside and past the first window, cached prefixes
# aligned and not, decode rows of a mixed batch, and a 40-row prefill over several M tiles
# whose rows' windows begin in different key tiles
WINDOWED_PREFILL = [(0, 40), (21, 9), (37, 1), (16, 16), (5, 3), (0, 1)]


@pytest.mark.parametrize("window", [1, 7, 16])
@pytest.mark.parametrize("heads", ["gqa", "mqa"])
def test_windowed_prefill_matches_the_reference(window: int, heads: str) -> None:
    batch = make_batch(WINDOWED_PREFILL, *HEADS[heads], block_size=4, seed=400 + window)
    scale = HEADS[heads][2] ** -0.5
    expected = reference_windowed(batch, scale, window)
    assert max_error(expected, reference_windowed(batch, scale, None)) > 1e-2  # a real cut
    kernels.reshape_and_cache(batch.key, batch.value, batch.k_cache, batch.v_cache,
                              batch.metadata.slot_mapping)
    meta = batch.metadata
    out = kernels.paged_prefill_attention(batch.query, batch.k_cache, batch.v_cache,
                                          meta.block_tables, meta.cu_seqlens_q, meta.seq_lens,
                                          meta.max_seqlen_q, scale, window)
    assert not out.isnan().any()
    assert max_error(out, expected) < TOLERANCE


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [5, 20])
def test_windowed_decode_matches_the_reference(window: int, num_splits: int) -> None:
    shapes = [(cached, 1) for cached in (0, 4, 17, 31, 69, 8, 2)]
    batch = make_batch(shapes, 6, 2, 16, block_size=4, seed=500 + window + num_splits)
    expected = reference_windowed(batch, 0.3, window)
    assert max_error(expected, reference_windowed(batch, 0.3, None)) > 1e-2
    kernels.reshape_and_cache(batch.key, batch.value, batch.k_cache, batch.v_cache,
                              batch.metadata.slot_mapping)
    out = kernels.paged_decode_attention(batch.query, batch.k_cache, batch.v_cache,
                                         batch.metadata.block_tables, batch.metadata.seq_lens,
                                         0.3, num_splits, window)
    assert max_error(out, expected) < TOLERANCE


def test_backend_step_with_a_window_matches_the_reference() -> None:
    backend = CudaAttentionBackend()
    for seed, shapes in enumerate([[(6, 10), (0, 1), (20, 1), (0, 13)],
                                   [(c, 1) for c in (40, 3, 0, 77, 15)]]):
        batch = make_batch(shapes, 8, 2, 16, block_size=8, seed=600 + seed)
        expected = reference_windowed(batch, 0.25, 9)
        out = backend.forward(batch.query, batch.key, batch.value, batch.k_cache,
                              batch.v_cache, batch.metadata, 0.25, sliding_window=9)
        assert max_error(out, expected) < TOLERANCE


def test_greedy_decoding_with_a_window_matches_the_reference_backend(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a Qwen2 with a full layer 0 and a windowed layer 1: prompts, chunks and decode past it
    from tests.tiny_models import save_tiny_model

    model_dir = save_tiny_model("qwen2", tmp_path / "qwen2", seed=5, use_sliding_window=True,
                                sliding_window=8, max_window_layers=1)
    prompts = [list(range(40, 70)), [5, 17, 99, 3, 250, 31, 8, 77, 140]]
    params = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6)
    engine_args = {"dtype": "float32", "device": DEVICE.type, "num_blocks": 32, "block_size": 4,
                   "max_num_batched_tokens": 16}
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "torch")
    expected = LLM(str(model_dir), **engine_args).generate(prompts, params)
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    outputs = LLM(str(model_dir), **engine_args).generate(prompts, params)
    assert ([o.outputs[0].token_ids for o in outputs]
            == [o.outputs[0].token_ids for o in expected])

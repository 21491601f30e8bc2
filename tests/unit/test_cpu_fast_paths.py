"""The CPU fast paths against their plain references: chunked greedy argmax vs torch.argmax,
oneDNN-prepacked linears vs F.linear, a prepacked bf16 model vs the same model unpacked (and
vs transformers' bf16 greedy tokens), decode attention over stale inf/NaN cache slots, the
sliced MLP of long prefills, and setup leaving the intra-op thread count alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers

from engine.attention import TorchAttentionBackend
from engine.attention.base import AttentionMetadata
from engine.kernels.native import native_library
from engine.layers.linear import PREPACK_ENV, Linear, can_prepack
from engine.layers.rotary import RopeSettings, RotaryEmbedding
from engine.loader import load_model
from engine.models.llama import MLP_CHUNK_TOKENS, DecoderOptions, LlamaMLP
from engine.sampler import _argmax_chunk, chunked_argmax, greedy_sample
from tests.devices import cpu_only

CPU = torch.device("cpu")
needs_prepack = pytest.mark.skipif(not can_prepack(torch.bfloat16, CPU),
                                   reason="no oneDNN bf16 on this CPU")
pytestmark = cpu_only  # CPU code paths


# ---- greedy argmax ----------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_size", [151936, 32000, 1000, 50257])
@pytest.mark.parametrize("num_seqs", [1, 3, 16])
def test_chunked_argmax_equals_argmax(vocab_size: int, num_seqs: int) -> None:
    gen = torch.Generator().manual_seed(vocab_size + num_seqs)
    logits = torch.randn(num_seqs, vocab_size, generator=gen)
    logits[0, vocab_size // 3] = logits[0, vocab_size - 1] = 50.0  # a tie: the first wins
    if num_seqs > 1:
        logits[1] = float("-inf")  # a fully banned row: index 0, as argmax says
        logits[1, vocab_size - 1] = 0.0
    chunk = _argmax_chunk(vocab_size)
    assert chunk is not None and vocab_size % chunk == 0
    assert torch.equal(chunked_argmax(logits, chunk), logits.argmax(dim=-1))
    # bf16-rounded values: many exact ties across chunks
    rounded = logits.bfloat16().float()
    assert torch.equal(greedy_sample(rounded), rounded.argmax(dim=-1))


@pytest.mark.skipif(native_library() is None, reason="native kernels unavailable here")
@pytest.mark.parametrize("vocab_size", [1, 5, 16, 17, 97, 1000, 151936])
def test_native_argmax_equals_argmax(vocab_size: int) -> None:
    """argmax_rows_f32, greedy_sample's pick where the kernels run: ties to the first index
    (within one 16-lane step, across lanes, in the scalar tail), rows of -inf, NaN anywhere
    (torch's argmax takes the first NaN), signed zeros."""
    gen = torch.Generator().manual_seed(vocab_size)
    logits = torch.randn(10, vocab_size, generator=gen).bfloat16().float()  # many ties
    last = vocab_size - 1
    logits[1] = float("-inf")
    logits[2, last] = logits[2, 0] = 1e4
    logits[3, last] = float("nan")
    logits[4, vocab_size // 2] = float("nan")
    logits[4, last] = float("nan")
    logits[5] = 0.0
    logits[5, vocab_size // 3] = -0.0
    logits[6] = float("inf")
    logits[7, vocab_size // 2] = float("inf")
    logits[8, :] = 3.0  # every index ties
    logits[9, last] = 1e4  # the maximum in the tail
    assert torch.equal(greedy_sample(logits), logits.argmax(dim=-1))
    tall = torch.randn(64, vocab_size, generator=gen).bfloat16().float()
    assert torch.equal(greedy_sample(tall), tall.argmax(dim=-1))


# ---- RoPE factors ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("settings", [RopeSettings(theta=10000.0),
                                      RopeSettings(theta=1e6, rope_type="yarn", factor=4.0,
                                                   original_max_position_embeddings=256,
                                                   attention_factor=1.2,
                                                   scaled_max_position=1024)])
def test_rope_factors_from_the_host_tables_are_the_per_call_ones(
        dtype: torch.dtype, settings: RopeSettings) -> None:
    """On the host the factors come from tables made once per dtype: the same values and
    shapes as building them from the float32 cos/sin rows per call, and contiguous (the
    native decode stack takes nothing else)."""
    rotary = RotaryEmbedding(64, 512, settings)
    positions = torch.tensor([0, 1, 7, 300, rotary.max_position - 1])
    cos_full, sin_signed = rotary(positions, dtype)
    cos, sin = rotary.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    assert cos_full.shape == sin_signed.shape == (len(positions), 1, 64)
    assert cos_full.dtype == sin_signed.dtype == dtype
    assert torch.equal(cos_full, torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(1))
    assert torch.equal(sin_signed, torch.cat((-sin, sin), dim=-1).to(dtype).unsqueeze(1))
    assert cos_full.is_contiguous() and sin_signed.is_contiguous()
    again = rotary(positions[1:2], dtype)  # the table made on the first call
    assert torch.equal(again[0], cos_full[1:2]) and torch.equal(again[1], sin_signed[1:2])


def test_greedy_sample_falls_back_for_awkward_shapes() -> None:
    logits = torch.randn(4, 97)  # prime vocabulary: no chunking
    assert _argmax_chunk(97) is None
    assert torch.equal(greedy_sample(logits), logits.argmax(dim=-1))
    strided = torch.randn(4, 2000)[:, ::2]  # not contiguous
    assert torch.equal(greedy_sample(strided), strided.argmax(dim=-1))


# ---- prepacked linears ------------------------------------------------------------------------

@needs_prepack
@pytest.mark.parametrize("num_rows", [1, 16, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_linear_matches_f_linear(num_rows: int, bias: bool) -> None:
    torch.manual_seed(num_rows)
    layer = Linear(96, 200, bias=bias).to(torch.bfloat16)
    weight = layer.weight.detach().clone()
    bias_value = None if layer.bias is None else layer.bias.detach().clone()
    x = torch.randn(num_rows, 96).to(torch.bfloat16)
    expected = F.linear(x.float(), weight.float(), None if bias_value is None else
                        bias_value.float())
    layer.prepack()
    assert layer.weight.numel() == 0  # the dense copy is freed
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (num_rows, 200)
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    assert torch.equal(out, F.linear(x, weight, bias_value))  # the same oneDNN kernel


@needs_prepack
def test_packed_tied_head_keeps_the_embedding() -> None:
    embedding = torch.randn(64, 32).to(torch.bfloat16)
    head = Linear.packed_from(embedding)
    x = torch.randn(3, 32).to(torch.bfloat16)
    assert torch.equal(head(x), F.linear(x, embedding))
    assert embedding.numel() == 64 * 32  # untouched: lookups still need it


@needs_prepack
@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_prepacked_bf16_model_matches_unpacked(arch: str, tiny_model_dirs: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bf16 checkpoint with and without prepacking gives the same logits (up to
    bf16 rounding), through prefill and a decode step."""
    model_dir = tiny_model_dirs[arch]
    packed = load_model(str(model_dir), dtype="bfloat16", device="cpu").model
    monkeypatch.setenv(PREPACK_ENV, "0")
    plain = load_model(str(model_dir), dtype="bfloat16", device="cpu").model
    assert any(m.packed_weight is not None for m in packed.modules() if isinstance(m, Linear))
    assert all(m.packed_weight is None for m in plain.modules() if isinstance(m, Linear))
    tokens = [5, 17, 99, 3, 250, 41, 7]
    logits = [_greedy_logits(model, tokens) for model in (packed, plain)]
    torch.testing.assert_close(logits[0], logits[1], atol=0.1, rtol=0.05)


@needs_prepack
def test_prepacked_bf16_greedy_tokens_match_transformers_bf16(
        tiny_model_dirs: dict[str, Path]) -> None:
    from engine import LLM, SamplingParams

    model_dir = tiny_model_dirs["qwen2"]
    prompt = [11, 200, 37, 401, 9, 64, 128, 3]
    llm = LLM(str(model_dir), dtype="bfloat16", num_blocks=64)
    ours = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8,
                                                 ignore_eos=True))[0].outputs[0].token_ids
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                                  dtype=torch.bfloat16)
    input_ids = torch.tensor([prompt])
    expected = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                  do_sample=False, max_new_tokens=8, min_new_tokens=8,
                                  pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == expected


@torch.inference_mode()
def _greedy_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """Logits of a prefill of tokens[:-1] then a decode of tokens[-1], in one 4-block cache."""
    spec_layers = [(torch.zeros(4, 4, *kv), torch.zeros(4, 4, *kv))
                   for kv in [_kv_shape(model)] * _num_layers(model)]
    caches = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in spec_layers]
    prefill, last = tokens[:-1], tokens[-1]
    outs = []
    for ids, start in ((prefill, 0), ([last], len(prefill))):
        n = len(ids)
        seq_len = start + n
        metadata = AttentionMetadata(
            slot_mapping=torch.arange(start, seq_len), cu_seqlens_q=torch.tensor(
                [0, n], dtype=torch.int32), seq_lens=torch.tensor([seq_len], dtype=torch.int32),
            block_tables=torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), max_seqlen_q=n,
            max_seqlen_k=seq_len, query_lens_cpu=[n], seq_lens_cpu=[seq_len])
        hidden = model(torch.tensor(ids), torch.arange(start, seq_len), caches, metadata)
        outs.append(model.compute_logits(hidden))
    return torch.cat(outs)


def _kv_shape(model: torch.nn.Module) -> tuple[int, int]:
    from engine.models import kv_cache_spec

    spec = kv_cache_spec(model.hf_config)
    return spec.num_kv_heads, spec.head_dim


def _num_layers(model: torch.nn.Module) -> int:
    from engine.models import kv_cache_spec

    return kv_cache_spec(model.hf_config).num_layers


# ---- decode attention over stale cache contents --------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_padding_ignores_inf_and_nan_in_stale_slots(dtype: torch.dtype) -> None:
    """Decode contexts are padded to a bucket; the padding reads whatever the cache holds
    there (here inf/NaN in K), and must not leak into any sequence's output."""
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 8, 4
    gen = torch.Generator().manual_seed(0)
    shape = (8, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("inf")).to(dtype)
    k_cache[::2] = float("nan")
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    seq_lens, tables = [5, 3], [[1, 2], [3, 0]]
    for seq_len, table in zip(seq_lens, tables, strict=True):
        for pos in range(seq_len - 1):  # the cached prefix; the last token is new
            block, offset = table[pos // block_size], pos % block_size
            k_cache[block, offset] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
            v_cache[block, offset] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
    query = torch.randn(2, num_heads, head_dim, generator=gen).to(dtype)
    key = torch.randn(2, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(2, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = [t[(n - 1) // block_size] * block_size + (n - 1) % block_size
             for n, t in zip(seq_lens, tables, strict=True)]
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots), cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32), max_seqlen_q=1, max_seqlen_k=5,
        query_lens_cpu=[1, 1], seq_lens_cpu=seq_lens)
    out = TorchAttentionBackend().forward(query, key, value, k_cache, v_cache, metadata, 0.3)
    assert torch.isfinite(out.float()).all()
    for seq, (seq_len, table) in enumerate(zip(seq_lens, tables, strict=True)):
        slots_of = [table[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        keys = k_cache.view(-1, num_kv_heads, head_dim)[slots_of].double()
        values = v_cache.view(-1, num_kv_heads, head_dim)[slots_of].double()
        group = num_heads // num_kv_heads
        scores = torch.einsum("hd,khd->hk", query[seq].double(),
                              keys.repeat_interleave(group, dim=1)) * 0.3
        expected = torch.einsum("hk,khd->hd", scores.softmax(-1),
                                values.repeat_interleave(group, dim=1))
        tolerance = 1e-5 if dtype == torch.float32 else 0.05
        assert (out[seq].double() - expected).abs().max().item() < tolerance


# ---- memory-bounding paths ---------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens", [MLP_CHUNK_TOKENS, MLP_CHUNK_TOKENS + 1, 1100])
def test_long_prefill_mlp_in_slices_matches_whole(num_tokens: int) -> None:
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act="silu")
    torch.manual_seed(num_tokens)
    mlp = LlamaMLP(config, DecoderOptions())
    x = torch.randn(num_tokens, 32)
    with torch.no_grad():
        expected = F.linear(F.silu(F.linear(x, mlp.gate_up_proj.weight[:64]))
                            * F.linear(x, mlp.gate_up_proj.weight[64:]), mlp.down_proj.weight)
        torch.testing.assert_close(mlp(x), expected)


def test_loading_leaves_the_thread_count_as_it_was(tiny_model_dirs: dict[str, Path]) -> None:
    before = torch.get_num_threads()
    load_model(str(tiny_model_dirs["llama"]), dtype="float32", device="cpu")
    assert torch.get_num_threads() == before


def _decode_step() -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor]:
    """Metadata of a two-sequence decode step, and its caches."""
    gen = torch.Generator().manual_seed(1)
    shape = (6, 4, 2, 8)  # [num_blocks, block_size, num_kv_heads, head_dim]
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor([4, 12]), cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32),
        seq_lens=torch.tensor([5, 1], dtype=torch.int32),
        block_tables=torch.tensor([[1, 2], [3, 0]], dtype=torch.int32), max_seqlen_q=1,
        max_seqlen_k=5, query_lens_cpu=[1, 1], seq_lens_cpu=[5, 1])
    return metadata, k_cache, v_cache


def test_the_backend_keeps_no_plan_between_calls() -> None:
    """A caller may refill one metadata object in place for the next step: nothing planned
    for the previous step may outlive it."""
    metadata, k_cache, v_cache = _decode_step()
    gen = torch.Generator().manual_seed(2)
    reused = TorchAttentionBackend()

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (torch.randn(2, heads, 8, generator=gen) for heads in (4, 2, 2))
        ours = reused.forward(q, k, v, k_cache, v_cache, metadata, 0.35)
        fresh = TorchAttentionBackend().forward(q, k, v, k_cache, v_cache, metadata, 0.35)
        return ours, fresh

    step()
    # the next step, written into the same object: both sequences grew by one token
    metadata.slot_mapping = torch.tensor([5, 13])
    metadata.seq_lens = torch.tensor([6, 2], dtype=torch.int32)
    metadata.seq_lens_cpu, metadata.max_seqlen_k = [6, 2], 6
    ours, fresh = step()
    torch.testing.assert_close(ours, fresh)


def test_attention_reads_the_plan_in_the_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the step's plan in the metadata, attention plans nothing itself, and gives what
    planning per call gives."""
    import engine.attention.torch_ref as torch_ref

    metadata, k_cache, v_cache = _decode_step()
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, heads, 8, generator=gen) for heads in (4, 2, 2))
    backend = TorchAttentionBackend()
    per_call = backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), metadata, 0.35)
    metadata.decode_plan = backend.plan_decode(metadata, k_cache)
    assert metadata.decode_plan is not None

    def no_planning(*args: object) -> None:
        raise AssertionError("attention planned although the metadata holds the plan")

    monkeypatch.setattr(torch_ref, "build_decode_plan", no_planning)
    ours = backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), metadata, 0.35)
    torch.testing.assert_close(ours, per_call)


def test_the_runner_plans_decode_once_per_step(tiny_model_dirs: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One plan per step with decode rows, whatever the number of layers; a prefill-only
    step plans none."""
    import engine.attention.torch_ref as torch_ref
    from engine import LLM, SamplingParams

    llm = LLM(str(tiny_model_dirs["llama"]), dtype="float32", num_blocks=32, block_size=4)
    num_plans = 0
    build = torch_ref.build_decode_plan

    def counted(*args: Any) -> torch_ref.DecodePlan:
        nonlocal num_plans
        num_plans += 1
        return build(*args)

    monkeypatch.setattr(torch_ref, "build_decode_plan", counted)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([[5, 17, 99, 3, 250]], params)
    assert num_plans == 3  # one prefill step, then three decode steps


def test_decode_graphs_take_only_steps_without_a_host_plan() -> None:
    """A step whose backend plans on the host stays eager: the graph would replay the plan
    it was captured with, however the static inputs are refilled."""
    from engine.cuda_graphs import DecodeGraphs

    metadata, k_cache, _ = _decode_step()
    graphs = DecodeGraphs(lambda *args: torch.empty(0), max_num_seqs=4, max_blocks_per_seq=4,
                          max_model_len=16, device=CPU, capture=False)
    assert graphs.can_run(metadata)
    metadata.decode_plan = TorchAttentionBackend().plan_decode(metadata, k_cache)
    assert not graphs.can_run(metadata)


# ---- native RMSNorm ----------------------------------------------------------------------------

@pytest.mark.parametrize(("num_rows", "hidden"), [(1, 896), (16, 64), (40, 100), (3, 4864)])
def test_native_rms_norm_matches_the_reference(num_rows: int, hidden: int) -> None:
    from engine.kernels.native import native_library
    from engine.layers.norm import rms_norm_native, rms_norm_reference

    if native_library() is None:
        pytest.skip("native CPU kernels unavailable here")
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(num_rows, hidden, generator=gen) * 3).to(torch.bfloat16)
    x[0, :5] = 0.0
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(torch.bfloat16)
    ours, expected = rms_norm_native(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    # the same two roundings; float32 sums in another order may move a value one bf16 step
    steps = (ours.float() - expected.float()).abs() / expected.float().abs().clamp_min(1e-30)
    assert float(steps.max()) <= 2.0**-7
    assert float((ours != expected).float().mean()) < 0.01
    zeros = torch.zeros(2, hidden, dtype=torch.bfloat16)  # all-zero rows: eps keeps them 0
    assert torch.equal(rms_norm_native(zeros, weight, 1e-6), zeros)


# ---- native paged decode attention --------------------------------------------------------------

@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [
    # head size 64: groups of 7 (4 + 3 heads in registers), 4, 6 (4 + 2) and 1
    (14, 2, 64), (8, 2, 64), (12, 2, 64), (3, 3, 64), (4, 4, 32), (6, 1, 80)])
def test_native_decode_attention_matches_the_matmul_path(num_heads: int, num_kv_heads: int,
                                                         head_dim: int) -> None:
    """Ragged contexts through shuffled, non-contiguous block tables, a mixed batch's decode
    rows among prefill rows, and GQA groups: the native kernel against the torch path."""
    from engine.attention.torch_ref import (
        build_decode_plan,
        decode_attention_matmul,
        decode_attention_native,
    )
    from engine.kernels.native import native_library

    if native_library() is None:
        pytest.skip("native CPU kernels unavailable here")
    gen = torch.Generator().manual_seed(num_heads * head_dim)
    block_size, num_blocks = 4, 40
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(shape, generator=gen).to(torch.bfloat16)
    # sequence 1 is a prefill chunk; 70 keys: four 16-key tiles and a remainder
    query_lens, seq_lens = [1, 5, 1, 1], [9, 12, 1, 70]
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for seq_len in seq_lens:
        need = -(-seq_len // block_size)
        tables.append(pool[:need] + [0] * (20 - need))
        pool = pool[need:]
    cu = [0]
    for query_len in query_lens:
        cu.append(cu[-1] + query_len)
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(cu[-1], dtype=torch.long),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32), max_seqlen_q=5, max_seqlen_k=70,
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
    plan = build_decode_plan(metadata, [0, 2, 3], block_size, num_kv_heads)
    query = torch.randn(3, num_heads, head_dim, generator=gen).to(torch.bfloat16)
    ours = decode_attention_native(query, k_cache, v_cache, plan, head_dim**-0.5)
    expected = decode_attention_matmul(query, k_cache, v_cache, plan, head_dim**-0.5)
    assert ours.dtype == torch.bfloat16 and ours.shape == expected.shape
    # both round scores, probabilities and outputs to bf16 after float32 sums taken in
    # different orders: equal up to a couple of bf16 steps
    torch.testing.assert_close(ours.float(), expected.float(), atol=0.02, rtol=0.02)


# ---- native SwiGLU -----------------------------------------------------------------------------

@pytest.mark.parametrize(("num_rows", "intermediate"), [(1, 4864), (7, 100), (600, 128)])
def test_native_silu_and_mul_matches_the_reference(num_rows: int, intermediate: int) -> None:
    from engine.kernels.native import native_library
    from engine.layers.activation import silu_and_mul_native, silu_and_mul_reference

    if native_library() is None:
        pytest.skip("native CPU kernels unavailable here")
    gen = torch.Generator().manual_seed(intermediate)
    gate_up = (torch.randn(num_rows, 2 * intermediate, generator=gen) * 4).to(torch.bfloat16)
    gate_up[0, :3] = torch.tensor([-200.0, 0.0, 200.0])  # far tails of the sigmoid
    ours, expected = silu_and_mul_native(gate_up), silu_and_mul_reference(gate_up)
    assert ours.dtype == torch.bfloat16 and ours.shape == (num_rows, intermediate)
    steps = (ours.float() - expected.float()).abs() / expected.float().abs().clamp_min(1e-30)
    assert float(steps.max()) <= 2.0**-7  # at most one bf16 step, where exp rounds apart
    assert float((ours != expected).float().mean()) < 0.01


# ---- native RoPE -------------------------------------------------------------------------------

@pytest.mark.parametrize(("num_tokens", "num_heads", "head_dim"),
                         [(1, 16, 64), (37, 16, 64), (300, 6, 128)])
def test_native_rope_matches_the_reference_bit_for_bit(num_tokens: int, num_heads: int,
                                                       head_dim: int) -> None:
    """q and k as a strided view into a wider qkv row, as LlamaAttention passes them: the
    kernel's three bf16 roundings are torch's, so the result is the same to the bit."""
    from engine.kernels.native import native_library
    from engine.layers.rotary import (
        RopeSettings,
        RotaryEmbedding,
        apply_rotary,
        apply_rotary_native,
        apply_rotary_reference,
    )

    if native_library() is None:
        pytest.skip("native CPU kernels unavailable here")
    gen = torch.Generator().manual_seed(num_tokens)
    qkv = (torch.randn(num_tokens, (num_heads + 2) * head_dim, generator=gen) * 4).bfloat16()
    x = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)  # tokens strided
    rope = RotaryEmbedding(head_dim, 4096, RopeSettings(theta=1e6))
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen)
    cos_full, sin_signed = rope(positions, torch.bfloat16)
    expected = apply_rotary_reference(x, cos_full, sin_signed)
    ours = apply_rotary_native(x, cos_full, sin_signed)
    assert ours.dtype == torch.bfloat16 and ours.is_contiguous()
    assert torch.equal(ours, expected)
    assert torch.equal(apply_rotary(x, cos_full, sin_signed), expected)  # the dispatch
    # head sizes whose halves are not whole vectors take the torch ops
    odd = torch.randn(num_tokens, 2, 48, generator=gen).bfloat16()
    small = RotaryEmbedding(48, 4096, RopeSettings(theta=1e6))(positions, torch.bfloat16)
    assert torch.equal(apply_rotary(odd, *small), apply_rotary_reference(odd, *small))

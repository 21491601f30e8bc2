"""Our decoders against transformers on tiny random checkpoints (fp32): dense prefill, paged
batched prefill + decode with shuffled blocks, chunked prefill mixed with decode."""

from __future__ import annotations

import functools
import random
import types
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import transformers

from engine.attention.base import AttentionMetadata
from engine.errors import UnsupportedModelError
from engine.layers.rotary import inverse_frequencies, rope_settings
from engine.loader import load_model
from engine.models import SUPPORTED_ARCHITECTURES, get_model_class, kv_cache_spec
from engine.models.base import CausalLM
from tests.devices import TEST_DEVICE
from tests.tiny_models import ARCHITECTURES, VOCAB_SIZE, build_config, save_tiny_model

ATOL = 1e-4
# One sequence of a batch: (block_ids, num_cached_tokens, new_token_ids).
SeqSpec = tuple[Sequence[int], int, Sequence[int]]
KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def build_batch(seqs: Sequence[SeqSpec],
                block_size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Flattened input_ids, positions and AttentionMetadata for sequences whose first
    num_cached_tokens tokens are already in the cache at their block_ids."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    for block_ids, num_cached, new_ids in seqs:
        for position in range(num_cached, num_cached + len(new_ids)):
            positions.append(position)
            slots.append(block_ids[position // block_size] * block_size + position % block_size)
        input_ids.extend(new_ids)
    query_lens = [len(new_ids) for _, _, new_ids in seqs]
    seq_lens = [num_cached + len(new_ids) for _, num_cached, new_ids in seqs]
    max_blocks = max(len(block_ids) for block_ids, _, _ in seqs)
    tables = [list(block_ids) + [0] * (max_blocks - len(block_ids)) for block_ids, _, _ in seqs]
    cu_seqlens_q = [0]
    for query_len in query_lens:
        cu_seqlens_q.append(cu_seqlens_q[-1] + query_len)
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        cu_seqlens_q=torch.tensor(cu_seqlens_q, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_seqlen_q=max(query_lens), max_seqlen_k=max(seq_lens),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
    )
    metadata = AttentionMetadata(
        slot_mapping=metadata.slot_mapping.to(TEST_DEVICE),
        cu_seqlens_q=metadata.cu_seqlens_q.to(TEST_DEVICE),
        seq_lens=metadata.seq_lens.to(TEST_DEVICE),
        block_tables=metadata.block_tables.to(TEST_DEVICE), max_seqlen_q=metadata.max_seqlen_q,
        max_seqlen_k=metadata.max_seqlen_k, query_lens_cpu=metadata.query_lens_cpu,
        seq_lens_cpu=metadata.seq_lens_cpu)
    return (torch.tensor(input_ids, dtype=torch.int64, device=TEST_DEVICE),
            torch.tensor(positions, dtype=torch.int64, device=TEST_DEVICE), metadata)


@functools.cache
def load_pair(model_dir: Path) -> tuple[CausalLM, transformers.PreTrainedModel]:
    """Our model (through our loader, on the test device) and the transformers reference
    (fp32 on CPU)."""
    ours = load_model(str(model_dir), dtype="float32", device=TEST_DEVICE).model
    assert isinstance(ours, CausalLM)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return ours, reference.eval()


def garbage_kv_caches(model: CausalLM, num_blocks: int, block_size: int) -> KVCaches:
    """Caches full of large random values, so reading an unwritten or masked slot shows."""
    spec = kv_cache_spec(model.hf_config)
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return [((torch.randn(shape) * 100).to(TEST_DEVICE), (torch.randn(shape) * 100).to(TEST_DEVICE))
            for _ in range(spec.num_layers)]


@torch.inference_mode()
def run_step(model: CausalLM, kv_caches: KVCaches, seqs: Sequence[SeqSpec],
             block_size: int) -> list[torch.Tensor]:
    """Logits [query_len, vocab_size] of each sequence's new tokens."""
    input_ids, positions, metadata = build_batch(seqs, block_size)
    logits = model.compute_logits(model(input_ids, positions, kv_caches, metadata)).cpu()
    assert logits.dtype == torch.float32
    return list(logits.split(metadata.query_lens_cpu))


@torch.inference_mode()
def reference_logits(reference: transformers.PreTrainedModel,
                     token_ids: Sequence[int]) -> torch.Tensor:
    return reference(torch.tensor([list(token_ids)])).logits[0].float()  # [len, vocab_size]


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB_SIZE) for _ in range(n)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    error = (actual - expected).abs().max().item()
    assert error < ATOL, f"max abs logits error {error:.2e}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_matches_transformers(arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    ours, reference = load_pair(tiny_model_dirs[arch])
    prompt = random_tokens(random.Random(0), 20)
    kv_caches = garbage_kv_caches(ours, num_blocks=4, block_size=8)
    (logits,) = run_step(ours, kv_caches, [([2, 0, 3], 0, prompt)], block_size=8)
    assert_close(logits, reference_logits(reference, prompt))


class PagedSession:
    """Sequences sharing one KV cache, each with its blocks drawn from a shuffled pool."""

    def __init__(self, model: CausalLM, block_size: int, capacities: list[int], seed: int):
        self.block_size = block_size
        num_needed = [-(-capacity // block_size) for capacity in capacities]
        pool = list(range(sum(num_needed) + 3))  # spare blocks the sequences never own
        random.Random(seed).shuffle(pool)
        self.block_ids = []
        for count in num_needed:
            self.block_ids.append(pool[:count])
            pool = pool[count:]
        self.kv_caches = garbage_kv_caches(model, sum(num_needed) + 3, block_size)

    def step(self, model: CausalLM, batch: list[tuple[int, int, list[int]]]) -> list[torch.Tensor]:
        """batch: (sequence index, num_cached_tokens, new_token_ids)."""
        seqs = [(self.block_ids[i], cached, new) for i, cached, new in batch]
        return run_step(model, self.kv_caches, seqs, self.block_size)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_paged_batch_decode_and_chunked_prefill(arch: str, block_size: int,
                                                tiny_model_dirs: dict[str, Path]) -> None:
    ours, reference = load_pair(tiny_model_dirs[arch])
    rng = random.Random(block_size)
    seqs = [random_tokens(rng, n) for n in (3, 17, 40)]
    chunked_prompt = random_tokens(rng, 30)
    session = PagedSession(ours, block_size, [len(s) + 6 for s in seqs] + [30], seed=block_size)

    # One flattened prefill of all three prompts: every position matches.
    logits = session.step(ours, [(i, 0, seq) for i, seq in enumerate(seqs)])
    for seq, seq_logits in zip(seqs, logits, strict=True):
        assert_close(seq_logits, reference_logits(reference, seq))
        seq.append(int(seq_logits[-1].argmax()))

    for _ in range(5):  # batched greedy decode: positions advance, slots cross block borders
        logits = session.step(ours, [(i, len(seq) - 1, seq[-1:]) for i, seq in enumerate(seqs)])
        for seq, seq_logits in zip(seqs, logits, strict=True):
            assert_close(seq_logits[-1], reference_logits(reference, seq)[-1])
            seq.append(int(seq_logits[-1].argmax()))

    # Chunked prefill: chunk 1 alone, chunk 2 (attending to chunk 1's cached K/V) in one
    # mixed batch with another decode step of the other sequences.
    session.step(ours, [(3, 0, chunked_prompt[:12])])
    batch = [(3, 12, chunked_prompt[12:])] + [(i, len(s) - 1, s[-1:]) for i, s in enumerate(seqs)]
    chunk_logits, *decode_logits = session.step(ours, batch)
    assert_close(chunk_logits, reference_logits(reference, chunked_prompt)[12:])
    for seq, seq_logits in zip(seqs, decode_logits, strict=True):
        assert_close(seq_logits[-1], reference_logits(reference, seq)[-1])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.inference_mode()
def test_output_rows_skip_the_rest_of_the_last_layer(arch: str,
                                                     tiny_model_dirs: dict[str, Path]) -> None:
    """With metadata.output_rows the model returns those rows alone, as a full pass computes
    them, and every row's K/V still reaches every layer's cache: a chunk that samples
    nothing (no output rows) fills the cache exactly as a full pass does."""
    ours, reference = load_pair(tiny_model_dirs[arch])
    rng = random.Random(3)
    prompt, other = random_tokens(rng, 30), random_tokens(rng, 9)
    full, pruned = (PagedSession(ours, 4, [30, 10], seed=5) for _ in range(2))
    pruned.kv_caches = [(k.clone(), v.clone()) for k, v in full.kv_caches]  # the same garbage

    def chunk_one(session: PagedSession, output_rows: list[int] | None) -> torch.Tensor:
        seqs = [(session.block_ids[0], 0, prompt[:12]), (session.block_ids[1], 0, other)]
        input_ids, positions, metadata = build_batch(seqs, 4)
        if output_rows is not None:
            metadata.output_rows = torch.tensor(output_rows, dtype=torch.long,
                                                device=TEST_DEVICE)
        return ours(input_ids, positions, session.kv_caches, metadata)

    assert chunk_one(full, None).shape[0] == 21
    assert chunk_one(pruned, []).shape[0] == 0
    for (k_full, v_full), (k_pruned, v_pruned) in zip(full.kv_caches, pruned.kv_caches,
                                                      strict=True):
        assert torch.equal(k_full, k_pruned) and torch.equal(v_full, v_pruned)

    # the second chunk with the other sequence's next token: only each one's last row is read
    seqs = [(full.block_ids[0], 12, prompt[12:]), (full.block_ids[1], 9, [7])]
    input_ids, positions, metadata = build_batch(seqs, 4)
    all_rows = ours.compute_logits(ours(input_ids, positions, full.kv_caches, metadata))
    metadata.output_rows = torch.tensor([17, 18], dtype=torch.long, device=TEST_DEVICE)
    read = ours.compute_logits(ours(input_ids, positions, pruned.kv_caches, metadata))
    assert read.shape[0] == 2
    assert_close(read.cpu(), all_rows[[17, 18]].cpu())
    assert_close(read[0].cpu(), reference_logits(reference, prompt)[-1])
    assert_close(read[1].cpu(), reference_logits(reference, other + [7])[-1])


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

VARIANTS = {
    # llama3 RoPE bands, tied head, biases everywhere, MQA
    "llama-llama3-tied-bias-mqa": ("llama", dict(
        rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, num_key_value_heads=1)),
    # head_dim != hidden_size / num_heads, o_proj bias
    "qwen3-wide-heads-bias": ("qwen3", dict(head_dim=32, attention_bias=True)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "gpt2-inverse-layer-scale": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
    "gpt2-untied-gelu": ("gpt2", dict(tie_word_embeddings=False, activation_function="gelu")),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_match_transformers(variant: str, tmp_path: Path) -> None:
    arch, overrides = VARIANTS[variant]
    ours, reference = load_pair(save_tiny_model(arch, tmp_path / variant, seed=7, **overrides))
    prompt = random_tokens(random.Random(1), 40)
    session = PagedSession(ours, block_size=4, capacities=[41], seed=1)
    (prefill,) = session.step(ours, [(0, 0, prompt[:25])])
    (chunk,) = session.step(ours, [(0, 25, prompt[25:])])
    expected = reference_logits(reference, prompt)
    assert_close(torch.cat([prefill, chunk]), expected)


def test_llama3_inverse_frequencies_match_transformers() -> None:
    config = build_config("llama", rope_parameters=dict(LLAMA3_ROPE))
    expected, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    actual = inverse_frequencies(16, rope_settings(config))
    assert torch.equal(actual, expected)
    # A transformers 4 style config (rope_theta + rope_scaling) gives the same settings.
    legacy = types.SimpleNamespace(rope_theta=500000.0, max_position_embeddings=512,
                                   rope_scaling={"type": "llama3", **{
                                       k: v for k, v in LLAMA3_ROPE.items()
                                       if k not in ("rope_type", "rope_theta")}})
    assert rope_settings(legacy) == rope_settings(config)  # type: ignore[arg-type]


def test_unsupported_rope_type_is_rejected() -> None:
    config = build_config("llama", rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 32,
        "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    with pytest.raises(UnsupportedModelError, match="longrope"):
        rope_settings(config)


def test_registry_and_kv_cache_spec() -> None:
    assert set(SUPPORTED_ARCHITECTURES) == {"LlamaForCausalLM", "MistralForCausalLM",
                                            "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                            "GPT2LMHeadModel", "MixtralForCausalLM",
                                            "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"}
    config = build_config("qwen3", head_dim=32, architectures=["Qwen3ForCausalLM"])
    assert get_model_class(config).__name__ == "Qwen3ForCausalLM"
    spec = kv_cache_spec(config)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (2, 2, 32)
    gpt2 = build_config("gpt2", architectures=["GPT2LMHeadModel"])
    assert kv_cache_spec(gpt2) == type(spec)(num_layers=2, num_kv_heads=4, head_dim=16)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        get_model_class(build_config("llama", architectures=["MambaForCausalLM"]))


def test_missing_and_mismatched_weights_are_errors(tiny_model_dirs: dict[str, Path]) -> None:
    ours, reference = load_pair(tiny_model_dirs["qwen2"])
    state = reference.state_dict()
    model = type(ours)(ours.hf_config, ours.attn_backend)
    dropped = "model.layers.1.self_attn.k_proj.bias"
    incomplete = {name: tensor for name, tensor in state.items() if name != dropped}
    with pytest.raises(UnsupportedModelError, match=r"qkv_proj.bias\[k\]"):
        model.load_weights(incomplete.items())
    wrong_shape = dict(state, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(UnsupportedModelError, match="shape"):
        model.load_weights(wrong_shape.items())

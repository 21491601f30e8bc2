"""`--quantization int4` and GPTQ/AWQ checkpoints: group-wise int4 quantization, the torch
matmul against its oracle and the float matmul, the checkpoint packings against known values,
and whole models: GPTQ (with and without act-order, v1 zero offset) and AWQ checkpoints written
here from a known int4 quantization give exactly the logits of that quantization."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import engine.models.base
from engine import LLM, SamplingParams
from engine.errors import InvalidRequestError, UnsupportedModelError
from engine.kernels import w4a16, w8a8
from engine.layers.linear import PREPACK_ENV, Linear
from engine.loader import load_model
from engine.models.moe import StackedExperts
from engine.quantized_checkpoint import (
    CheckpointQuantization,
    convert_weights,
    pack_int32,
    unpack_int32,
)
from tests.devices import cpu_only
from tests.tiny_models import save_tiny_model
from tests.unit.test_cpu_fast_paths import _greedy_logits

pytestmark = cpu_only  # CPU code paths

TOKENS = [5, 17, 99, 3, 250, 41, 7]
WIDE = dict(hidden_size=128, intermediate_size=256)  # every in_features a multiple of 128


# ---- quantization and matmul -------------------------------------------------------------------

def test_quantization_round_trips_within_half_a_step() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 256, generator=gen) * torch.logspace(-3, 1, 24)[:, None]
    weight[3] = 0.0  # an all-zero row must not divide by zero
    weight[5, :128] = weight[5, :128].abs()  # a group of one sign
    quantized = w4a16.quantize_weight(weight)
    assert quantized.packed.shape == (24, 128) and quantized.packed.dtype == torch.uint8
    assert quantized.scales.shape == (24, 2) and quantized.zeros.shape == (24, 2)
    # two values per byte: half of int8's weight bytes
    assert quantized.packed.nbytes * 2 == w8a8.quantize_weight(weight).data.nbytes
    assert int(quantized.zeros.max()) <= 15
    error = (quantized.dequantize() - weight).abs().reshape(24, 2, 128)
    step = quantized.scales.float()[..., None]
    assert bool((error <= step / 2 * (1 + 1e-3) + 1e-7).all())
    assert torch.equal(quantized.dequantize()[3], torch.zeros(256))


def test_nibbles_pack_low_first() -> None:
    values = torch.tensor([[1, 2, 15, 0]])
    assert w4a16.pack_nibbles(values).tolist() == [[0x21, 0x0F]]
    assert torch.equal(w4a16.unpack_nibbles(w4a16.pack_nibbles(values)), values.byte())


def test_in_features_must_fill_whole_groups() -> None:
    assert w4a16.can_quantize(128) and not w4a16.can_quantize(64)
    with pytest.raises(ValueError, match="multiple of 128"):
        w4a16.quantize_weight(torch.randn(4, 192))
    layer = Linear(64, 8, bias=False)
    assert not layer.quantize_int4() and layer.weight.numel() == 64 * 8  # left as it was


@pytest.mark.parametrize("num_rows", [1, 9, 130])
def test_reference_matches_its_oracle_and_the_float_matmul(num_rows: int) -> None:
    gen = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(96, 512, generator=gen) * 0.05
    bias = torch.randn(96, generator=gen)
    x = torch.randn(num_rows, 512, generator=gen)
    quantized = w4a16.quantize_weight(weight)
    out = w4a16.reference_linear(x, quantized, bias)
    assert torch.equal(out, F.linear(x, quantized.dequantize(), bias))  # the same arithmetic
    expected = F.linear(x, weight, bias)
    assert float((out - expected).norm() / expected.norm()) < 0.15  # 4-bit: ~0.1 here
    # what layers call: for decode-sized batches where it runs, the kernel with int8
    # activations (whose oracle quantizes them the same way), else this reference
    oracle = (w4a16.reference_linear_q8(x, quantized, bias)
              if w4a16.takes_kernel(x, quantized) else out)
    torch.testing.assert_close(w4a16.linear(x, quantized, bias), oracle, rtol=1e-5, atol=1e-5)
    bf16 = w4a16.linear(x.bfloat16(), quantized, bias)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), out, rtol=0.05, atol=0.05)


def test_group_index_reorders_groups() -> None:
    weight = w4a16.quantize_weight(torch.randn(4, 256))
    swapped = w4a16.Int4Weight(weight.packed, weight.scales.flip(1), weight.zeros.flip(1), 128,
                               group_index=(torch.arange(256) < 128).long())
    assert torch.equal(swapped.dequantize(), weight.dequantize())


# ---- checkpoint packings -----------------------------------------------------------------------

def test_int32_packings_match_known_words() -> None:
    word = torch.tensor([[0x76543210]], dtype=torch.int32)  # value i in bits [4i, 4i + 4)
    assert unpack_int32(word, awq_order=False).tolist() == [list(range(8))]
    # AWQ: value i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i]
    assert unpack_int32(word, awq_order=True).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]
    high = torch.tensor([[15, 15, 15, 15, 15, 15, 15, 15]])  # the sign bit set: -1 as int32
    assert pack_int32(high, awq_order=False).tolist() == [[-1]]
    assert unpack_int32(pack_int32(high, awq_order=True), awq_order=True).tolist() == \
        high.tolist()


@pytest.mark.parametrize(("offset", "expected"), [(1, [1, 16, 8]), (0, [0, 15, 7])])
def test_gptq_zero_points_carry_the_v1_offset(offset: int, expected: list[int]) -> None:
    stored = pack_int32(torch.tensor([[0, 15, 7, 0, 0, 0, 0, 0]]), awq_order=False)
    quantization = CheckpointQuantization("gptq", 128, zero_offset=offset, act_order=False)
    [(name, zeros)] = list(convert_weights(iter([("l.qzeros", stored)]), quantization, {}))
    assert name == "l.int4_zeros" and zeros.shape == (8, 1)
    assert zeros[:3, 0].tolist() == expected


# ---- GPTQ and AWQ checkpoints -------------------------------------------------------------------

def _quantize_grouped(weight: torch.Tensor, group_size: int,
                      order: torch.Tensor | None) -> tuple[w4a16.Int4Weight, torch.Tensor]:
    """Our int4 quantization of `weight`, its groups taken over columns in `order` (act-order):
    the Int4Weight over the original columns and its per-column group index."""
    in_features = weight.shape[1]
    if order is None:
        return w4a16.quantize_weight(weight, group_size), torch.arange(in_features) // group_size
    permuted = w4a16.quantize_weight(weight[:, order], group_size)
    values = torch.empty(weight.shape[0], in_features, dtype=torch.uint8)
    values[:, order] = w4a16.unpack_nibbles(permuted.packed)
    index = torch.empty(in_features, dtype=torch.int64)
    index[order] = torch.arange(in_features) // group_size
    return w4a16.Int4Weight(w4a16.pack_nibbles(values), permuted.scales, permuted.zeros,
                            group_size, index), index


def _packed_tensors(method: str, prefix: str, weight: w4a16.Int4Weight,
                    index: torch.Tensor) -> dict[str, torch.Tensor]:
    values = w4a16.unpack_nibbles(weight.packed)  # [N, K]
    if method == "awq":
        return {f"{prefix}.qweight": pack_int32(values.t(), awq_order=True),
                f"{prefix}.qzeros": pack_int32(weight.zeros.t(), awq_order=True),
                f"{prefix}.scales": weight.scales.t().contiguous()}
    assert int(weight.zeros.min()) >= 1  # v1 stores zero - 1: a zero of 0 cannot be written
    return {f"{prefix}.qweight": pack_int32(values, awq_order=False).t().contiguous(),
            f"{prefix}.qzeros": pack_int32(weight.zeros.t() - 1, awq_order=False),
            f"{prefix}.scales": weight.scales.t().contiguous(),
            f"{prefix}.g_idx": index.to(torch.int32)}


def _write_quantized(source: Path, target: Path, method: str, group_size: int,
                     act_order: bool = False) -> Path:
    """`source`'s checkpoint as a GPTQ or AWQ one of our int4 quantization of its matmul
    weights (act-order: groups over one random column order per input width), and beside it
    a float32 checkpoint of exactly the dequantized weights."""
    gen = torch.Generator().manual_seed(1)
    tensors = load_file(source / "model.safetensors")
    quantized, dequantized = {}, dict(tensors)
    orders: dict[int, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not name.endswith(("_proj.weight", "lm_head.weight")):
            quantized[name] = tensor
            continue
        in_features = tensor.shape[1]
        order = (orders.setdefault(in_features, torch.randperm(in_features, generator=gen))
                 if act_order else None)
        # from the weights as `--quantization int4` sees them loaded in bf16
        weight, index = _quantize_grouped(tensor.bfloat16(), group_size, order)
        quantized.update(_packed_tensors(method, name.removesuffix(".weight"), weight, index))
        dequantized[name] = weight.dequantize()
    target.mkdir()
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            (target / path.name).write_bytes(path.read_bytes())
    save_file(quantized, target / "model.safetensors")
    save_file(dequantized, target.parent / f"{target.name}.dense.safetensors")
    config = {"quant_method": method, "bits": 4, "group_size": group_size}
    config.update({"desc_act": act_order, "sym": False} if method == "gptq"
                  else {"zero_point": True, "version": "gemm"})
    _set_quantization_config(target, config)
    return target


def _set_quantization_config(model_dir: Path, config: dict[str, object]) -> None:
    config_path = model_dir / "config.json"
    values = json.loads(config_path.read_text())
    values["quantization_config"] = config
    config_path.write_text(json.dumps(values))


def _dense_copy(model_dir: Path) -> Path:
    """A float checkpoint of the dequantized weights `_write_quantized` left beside it."""
    dense = model_dir.parent / f"{model_dir.name}-dense"
    dense.mkdir()
    for path in model_dir.iterdir():
        if path.suffix != ".safetensors":
            (dense / path.name).write_bytes(path.read_bytes())
    values = json.loads((dense / "config.json").read_text())
    values.pop("quantization_config")
    (dense / "config.json").write_text(json.dumps(values))
    (dense / "model.safetensors").write_bytes(
        (model_dir.parent / f"{model_dir.name}.dense.safetensors").read_bytes())
    return dense


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("qwen2", tmp_path_factory.mktemp("wide") / "qwen2", **WIDE)


def _int4_linears(model: torch.nn.Module) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear) and m.int4_weight is not None]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_checkpoint_gives_the_logits_of_the_same_int4_quantization(
        method: str, wide_llama: Path, tmp_path: Path) -> None:
    """Packed from `--quantization int4`'s own quantization of the float weights, the
    checkpoint must load into the very same int4 weights: identical logits."""
    packed = _write_quantized(wide_llama, tmp_path / method, method, w4a16.GROUP_SIZE)
    loaded = load_model(str(packed), dtype="bfloat16", device="cpu").model
    reference = load_model(str(wide_llama), dtype="bfloat16", device="cpu",
                           quantization="int4").model
    assert len(_int4_linears(loaded)) == len(_int4_linears(reference)) == 9  # 2 x 4 + head
    assert torch.equal(_greedy_logits(loaded, TOKENS), _greedy_logits(reference, TOKENS))


@pytest.mark.parametrize(("method", "act_order"), [("gptq", False), ("gptq", True),
                                                   ("awq", False)])
def test_checkpoint_matches_its_dequantized_weights(method: str, act_order: bool,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Groups of 32 (the default tiny model's 64 columns), act-order's permuted groups: the
    logits are those of a model holding the dequantized weights and the same int8 embedding
    rows (on F.linear, as int4's reference path runs; the decode kernel has tests of its own
    in test_int4_kernel.py)."""
    monkeypatch.setenv(PREPACK_ENV, "0")
    monkeypatch.setattr(w4a16, "takes_kernel", lambda x, weight: False)
    monkeypatch.setattr(w4a16, "takes_columns_kernel", lambda x, weight: False)
    source = save_tiny_model("llama", tmp_path / "llama")
    packed = _write_quantized(source, tmp_path / method, method, 32, act_order)
    loaded = load_model(str(packed), dtype="bfloat16", device="cpu").model
    indices = [m.int4_weight.group_index for m in _int4_linears(loaded) if m.int4_weight]
    assert all((index is not None) == act_order for index in indices)
    dense = load_model(str(_dense_copy(packed)), dtype="bfloat16", device="cpu").model
    assert dense.quantize_embeddings() == 1  # as a quantized model holds its table
    torch.testing.assert_close(_greedy_logits(loaded, TOKENS), _greedy_logits(dense, TOKENS),
                               rtol=1e-5, atol=1e-5)


def test_gptq_engine_greedy_matches_int4(wide_llama: Path, tmp_path: Path) -> None:
    """Through the whole engine, the checkpoint generates what `--quantization int4` of the
    bf16 weights it was packed from does (and runs in float32 too)."""
    packed = _write_quantized(wide_llama, tmp_path / "gptq", "gptq", w4a16.GROUP_SIZE)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[11, 200, 37, 401, 9], [64, 128, 3]]

    def generate(model_dir: Path, **kwargs: object) -> list[list[int]]:
        llm = LLM(str(model_dir), device="cpu", num_blocks=64, **kwargs)
        return [output.outputs[0].token_ids for output in llm.generate(prompts, params)]

    ours = generate(packed, dtype="bfloat16")
    assert ours == generate(wide_llama, dtype="bfloat16", quantization="int4")
    assert all(len(tokens) == 6 for tokens in generate(packed, dtype="float32",
                                                        quantization="int4"))


@pytest.mark.parametrize(("config", "message"), [
    ({"quant_method": "bitsandbytes"}, "'bitsandbytes' is not supported"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "GPTQ checkpoints with 8 bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "format 'marlin'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
     "AWQ version 'gemv'"),
])
def test_unsupported_checkpoint_formats_fail_by_name(config: dict[str, object], message: str,
                                                     tmp_path: Path) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "llama")
    _set_quantization_config(model_dir, config)
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(str(model_dir), dtype="float32", device="cpu")


def test_quantized_checkpoint_refuses_int8(wide_llama: Path, tmp_path: Path) -> None:
    packed = _write_quantized(wide_llama, tmp_path / "awq", "awq", w4a16.GROUP_SIZE)
    with pytest.raises(InvalidRequestError, match="already AWQ 4-bit"):
        load_model(str(packed), dtype="float32", device="cpu", quantization="int8")


# ---- --quantization int4 on whole models -------------------------------------------------------

def test_int4_quantizes_moe_experts_and_keeps_narrow_layers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = save_tiny_model("mixtral", tmp_path / "mixtral", **WIDE)
    int4 = load_model(str(model_dir), dtype="bfloat16", device="cpu", quantization="int4").model
    # the reference keeps its dense expert stacks (a bf16-capable CPU would prepack them)
    monkeypatch.setenv(PREPACK_ENV, "0")
    plain = load_model(str(model_dir), dtype="bfloat16", device="cpu").model
    monkeypatch.undo()
    experts = [m for m in int4.modules() if isinstance(m, StackedExperts)]
    assert experts and all(e.expert_layers is not None for e in experts)
    expert_linears = [m for e in experts for m in e.modules() if isinstance(m, Linear)]
    assert len(expert_linears) == 2 * 2 * 4  # layers x (gate_up, down) x experts
    assert all(m.int4_weight is not None for m in expert_linears)
    plain_experts = [m for m in plain.modules() if isinstance(m, StackedExperts)]
    for ours, theirs in zip(experts, plain_experts, strict=True):
        assert ours.expert_layers is not None
        for expert, layers in enumerate(ours.expert_layers):
            for layer, stack in zip(layers, (theirs.gate_up_proj, theirs.down_proj), strict=True):
                assert isinstance(layer, Linear) and layer.int4_weight is not None
                dense = stack[expert].float()
                error = layer.int4_weight.dequantize() - dense
                assert float(error.norm() / dense.norm()) < 0.15
    # random tiny models amplify 4-bit error (int8 keeps cosine > 0.99 here): a loose bound
    ours_logits, reference = _greedy_logits(int4, TOKENS), _greedy_logits(plain, TOKENS)
    assert float(F.cosine_similarity(ours_logits, reference, dim=-1).mean()) > 0.8
    # the default tiny model's 64-wide layers stay in the model dtype
    narrow = load_model(str(save_tiny_model("llama", tmp_path / "llama")), dtype="bfloat16",
                        device="cpu", quantization="int4").model
    kept = [m for m in narrow.modules() if isinstance(m, Linear) and m.int4_weight is None]
    assert kept and all(m.in_features == 64 for m in kept)


def test_int4_quantizes_a_tied_head(tmp_path: Path) -> None:
    model_dir = save_tiny_model("qwen2", tmp_path / "tied", tie_word_embeddings=True, **WIDE)
    model = load_model(str(model_dir), dtype="bfloat16", device="cpu",
                       quantization="int4").model
    assert model.output_head() is None
    assert model.tied_output_head is not None and model.tied_output_head.int4_weight is not None


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantization_holds_the_token_embedding_as_int8_rows(quantization: str,
                                                              tmp_path: Path) -> None:
    """The table goes to int8 rows (a quarter of float32's bytes) within half a step of the
    float ones, and a lookup returns those rows in the model dtype; a tied head keeps its own
    quantized copy."""
    source = save_tiny_model("qwen2", tmp_path / "qwen2", **{**WIDE, "tie_word_embeddings": True})
    plain = load_model(str(source), dtype="bfloat16", device="cpu").model
    model = load_model(str(source), dtype="bfloat16", device="cpu",
                       quantization=quantization).model
    embedding, table = model.model.embed_tokens, plain.model.embed_tokens.weight.float()
    assert embedding.int8_rows is not None and embedding.weight.numel() == 0
    assert model.tied_output_head is not None
    rows = embedding.int8_rows.dequantize()
    step = table.abs().amax(dim=1, keepdim=True) / 127
    assert ((rows - table).abs() <= step / 2 * (1 + 1e-5)).all()
    ids = torch.tensor([[0, 5, 5], [7, 1, 2]])
    got = embedding(ids)
    assert got.dtype == torch.bfloat16 and torch.equal(got, rows[ids].bfloat16())
    logits, float_logits = _greedy_logits(model, TOKENS), _greedy_logits(plain, TOKENS)
    assert float(F.cosine_similarity(logits, float_logits, dim=-1).mean()) > 0.8


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_load_quantizes_each_layer_as_soon_as_it_is_written(arch: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--quantization quantizes a layer in the loader's callback, right after the last of its
    tensors (a fused qkv after q, k and v; a bias too), not once the whole float model is
    resident; the result equals quantizing after the load."""
    source = save_tiny_model(arch, tmp_path / arch, **WIDE if arch == "qwen2" else
                             dict(n_embd=128, n_inner=256))
    events: list[str] = []
    real_load = engine.models.base.load_named_weights

    def recording(model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                  map_name: Callable[[str], object],
                  on_module_loaded: Callable[[str], None]) -> None:
        def read(pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in pairs:
                events.append(f"tensor {name}")
                yield name, tensor

        def loaded(module_name: str) -> None:
            module = model.get_submodule(module_name)
            before = isinstance(module, Linear) and module.int4_weight is None
            on_module_loaded(module_name)
            if before and module.int4_weight is not None:
                events.append(f"quantized {module_name}")

        real_load(model, read(weights), map_name, loaded)

    monkeypatch.setattr(engine.models.base, "load_named_weights", recording)
    model = load_model(str(source), dtype="bfloat16", device="cpu", quantization="int4").model
    monkeypatch.undo()
    quantized = [e.removeprefix("quantized ") for e in events if e.startswith("quantized ")]
    layers = [m for m in _int4_linears(model) if m is not model.tied_output_head]
    assert len(quantized) == len(layers) >= 8  # every one during the load (a tied head after)
    first_layer = "model.layers.0" if arch == "qwen2" else "transformer.h.0"
    fused = f"{first_layer}.self_attn.qkv_proj" if arch == "qwen2" else f"{first_layer}.attn.c_attn"
    at = events.index(f"quantized {fused}")
    parts = (("q_proj", "k_proj", "v_proj") if arch == "qwen2" else ("c_attn",))
    for leaf in ("weight", "bias"):
        written = [i for i, e in enumerate(events) if e.startswith(f"tensor {first_layer}.")
                   and any(f".{p}.{leaf}" in e for p in parts)]
        assert len(written) == len(parts) and max(written) < at  # all before, none after
    assert at < max(i for i, e in enumerate(events) if e.startswith("tensor "))
    monkeypatch.setenv(PREPACK_ENV, "0")  # dense weights to quantize (bf16 CPUs prepack them)
    after = load_model(str(source), dtype="bfloat16", device="cpu").model
    after.quantize_weights(4)
    assert torch.equal(_greedy_logits(model, TOKENS), _greedy_logits(after, TOKENS))

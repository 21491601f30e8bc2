"""Tensor and pipeline parallelism inside the decoders: real two-process worlds (gloo) whose
logits match the single-process model's, and the per-rank shapes, names and refusals."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine.attention import get_attention_backend
from engine.distributed.parallel import Parallel
from engine.errors import UnsupportedModelError
from engine.layers.parallel import take_rows
from engine.models import get_model_class, kv_cache_spec
from engine.models.base import KVCacheSpec, WeightTarget
from tests.parallel_world import Case, run_world
from tests.tiny_models import ARCHITECTURES, MOE_ARCHITECTURES, build_config, save_tiny_model

TP2 = {"tp_size": 2}
PP2 = {"pp_size": 2}
EP2 = {"tp_size": 2, "expert_parallel": True}


@pytest.fixture(scope="module")
def world_cases(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    root = tmp_path_factory.mktemp("parallel-models")
    dirs = {arch: str(save_tiny_model(arch, root / arch)) for arch in ARCHITECTURES}
    for arch in ("gpt2", "qwen2"):  # row-parallel (GPT-2) and fused q/k/v biases
        _randomize_biases(Path(dirs[arch]))
    # one KV head for two ranks (replicated), a vocabulary the ranks split unevenly (the
    # last one padded), the head tied to the embedding
    dirs["llama_odd"] = str(save_tiny_model("llama", root / "llama_odd", num_key_value_heads=1,
                                            vocab_size=515, tie_word_embeddings=True))
    # int8 layers built from each rank's slices (in_features multiples of 64 per rank)
    dirs["llama_wide"] = str(save_tiny_model("llama", root / "llama_wide", hidden_size=128,
                                             intermediate_size=256))
    cases = [Case(f"{arch} tp2", dirs[arch], **TP2) for arch in (*ARCHITECTURES, "llama_odd")]
    cases += [Case(f"{arch} pp2", dirs[arch], **PP2) for arch in ARCHITECTURES]
    cases += [Case(f"{arch} ep2", dirs[arch], **EP2) for arch in MOE_ARCHITECTURES]
    # int8 from each rank's slices (row-parallel layers: per-row scales over half rows),
    # against the float32 model: within int8's own error (0.62 for the single model, logits
    # up to 10), far below a wrong slice's
    cases.append(Case("llama_wide tp2 int8", dirs["llama_wide"], quantization="int8",
                      atol=1.0, check_argmax=False, **TP2))
    return cases


def _randomize_biases(model_dir: Path) -> None:
    """transformers initializes biases to zero, which would hide a bias added once per rank
    or cut from the wrong rows."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_file(tensors, path, metadata={"format": "pt"})


def test_parallel_worlds_match_the_single_process_model(world_cases: list[Case]) -> None:
    results = run_world(world_cases)
    assert [result.name for result in results] == [case.name for case in world_cases]
    failed = [result for result in results if not result.passed]
    assert not failed, "\n".join(
        f"{r.name}: max abs logits diff {r.max_abs_diff:.2e} (< {r.atol}), "
        f"same argmax {r.same_argmax}" for r in failed)


_CLASS_NAMES = {"llama": "LlamaForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                "gpt2": "GPT2LMHeadModel"}


def _config(arch: str, **overrides: object) -> transformers.PretrainedConfig:
    return build_config(arch, architectures=[_CLASS_NAMES[arch]], **overrides)


def _empty_model(arch: str, parallel: Parallel, **overrides: object) -> torch.nn.Module:
    config = _config(arch, **overrides)
    with torch.device("meta"):
        return get_model_class(config)(config, get_attention_backend(torch.device("cpu")),
                                       parallel)


def test_kv_cache_spec_is_this_ranks_part() -> None:
    config = _config("llama", num_hidden_layers=3)  # 4 heads, 2 KV heads of 16
    assert kv_cache_spec(config, Parallel(tp_size=2)) == KVCacheSpec(3, 1, 16)
    assert kv_cache_spec(config, Parallel(tp_size=4, tp_rank=3)) == KVCacheSpec(3, 1, 16)
    assert kv_cache_spec(config, Parallel(pp_size=2)) == KVCacheSpec(2, 2, 16)
    assert kv_cache_spec(config, Parallel(pp_size=2, pp_rank=1)) == KVCacheSpec(1, 2, 16)
    gpt2 = _config("gpt2")
    assert kv_cache_spec(gpt2, Parallel(tp_size=2, pp_size=2)) == KVCacheSpec(1, 2, 16)


def test_later_stages_hold_their_layers_renumbered_and_no_embedding() -> None:
    model = _empty_model("qwen2_moe", Parallel(pp_size=2, pp_rank=1))
    assert not any(name.startswith(("model.embed_tokens", "model.norm", "lm_head"))
                   for name, _ in model.named_parameters())
    assert model.map_checkpoint_name("model.layers.0.self_attn.q_proj.weight") is None
    assert model.map_checkpoint_name("model.embed_tokens.weight") is None
    assert model.map_checkpoint_name("model.layers.1.mlp.up_proj.weight") == WeightTarget(
        "model.layers.0.mlp.gate_up_proj.weight", "up")
    gpt2 = _empty_model("gpt2", Parallel(pp_size=2, pp_rank=1))
    assert gpt2.map_checkpoint_name("h.1.attn.c_attn.weight") == WeightTarget(
        "transformer.h.0.attn.c_attn.weight")
    assert gpt2.map_checkpoint_name("wpe.weight") is None


def test_expert_parallel_keeps_its_experts_only() -> None:
    model = _empty_model("qwen3_moe", Parallel(tp_size=2, tp_rank=1, expert_parallel=True))
    experts = model.model.layers[0].mlp.experts
    assert (experts.first_expert, experts.num_experts, experts.intermediate_size) == (4, 4, 32)
    assert model.map_checkpoint_name("model.layers.0.mlp.experts.3.up_proj.weight") is None
    assert model.map_checkpoint_name("model.layers.0.mlp.experts.5.up_proj.weight") == (
        WeightTarget("model.layers.0.mlp.experts.gate_up_proj", "1.up"))


@pytest.mark.parametrize(("arch", "overrides", "parallel", "message"), [
    ("llama", {}, Parallel(tp_size=3), "size 3 does not divide the model's number of attention "
     "heads (4)"),
    ("llama", {"num_attention_heads": 8, "num_key_value_heads": 3}, Parallel(tp_size=2),
     "number of key/value heads (3)"),
    ("llama", {"intermediate_size": 130}, Parallel(tp_size=4), "intermediate size (130)"),
    ("mixtral", {"num_local_experts": 3}, Parallel(tp_size=2, expert_parallel=True),
     "number of experts (3)"),
    ("qwen3_moe", {"moe_intermediate_size": 30}, Parallel(tp_size=4),
     "MoE intermediate size (30)"),
    ("gpt2", {}, Parallel(pp_size=3), "pipeline parallel size 3 exceeds the model's 2 layers"),
])
def test_unsplittable_sizes_are_refused(arch: str, overrides: dict[str, object],
                                        parallel: Parallel, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        _empty_model(arch, parallel, **overrides)


def test_take_rows_pads_the_last_ranks_vocabulary() -> None:
    table = torch.arange(5.0).unsqueeze(1)  # [5, 1]
    assert take_rows(table, 3, 3).flatten().tolist() == [3.0, 4.0, 0.0]
    assert take_rows(table, 0, 3).data_ptr() == table.data_ptr()  # a view, nothing copied


def test_int4_checkpoints_are_refused_under_tensor_parallelism(tmp_path: Path) -> None:
    from engine.loader import _checkpoint_quantization

    config = build_config("llama")
    config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    with pytest.raises(UnsupportedModelError, match="tensor parallel size 2"):
        _checkpoint_quantization(config, None, Parallel(tp_size=2))

"""The Mixture-of-Experts block on its own: tokens grouped so each active expert runs once per
step, the grouped sum equal to a token-by-token one, routing as transformers routes, and
checkpoints with per-expert or stacked tensors loading the same weights. The end-to-end
greedy identity with transformers runs with the other architectures (test_llm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from engine.attention.torch_ref import TorchAttentionBackend
from engine.errors import UnsupportedModelError
from engine.models import get_model_class
from engine.models.base import CausalLM
from engine.models.llama import LlamaMLP
from engine.models.moe import SparseMoeBlock, StackedExperts, is_sparse_layer
from tests.tiny_models import MOE_ARCHITECTURES, build_config


def load_model(model_dir: Path) -> CausalLM:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    model = get_model_class(config)(config, TorchAttentionBackend())
    model.load_weights(load_file(model_dir / "model.safetensors").items())
    return model.eval()


def sparse_blocks(model: CausalLM) -> list[SparseMoeBlock]:
    return [module for module in model.modules() if isinstance(module, SparseMoeBlock)]


def token_by_token(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's definition, one token and one expert at a time (and the shared expert)."""
    expert_ids, weights = block.route(x)
    experts = block.experts
    rows = []
    for token in range(x.shape[0]):
        total = torch.zeros_like(x[token])
        for slot in range(expert_ids.shape[1]):
            expert = int(expert_ids[token, slot])
            gate = x[token] @ experts.gate_up_proj[expert, :experts.intermediate_size].T
            up = x[token] @ experts.gate_up_proj[expert, experts.intermediate_size:].T
            total += weights[token, slot] * (experts.down_proj[expert]
                                             @ (torch.nn.functional.silu(gate) * up))
        if block.shared_expert is not None and block.shared_expert_gate is not None:
            total += (torch.sigmoid(block.shared_expert_gate(x[token:token + 1]))[0]
                      * block.shared_expert(x[token:token + 1])[0])
        rows.append(total)
    return torch.stack(rows)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_each_active_expert_runs_once_over_its_rows(
        arch: str, tiny_model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    block = sparse_blocks(load_model(tiny_model_dirs[arch]))[0]
    calls: list[tuple[int, int]] = []
    run_expert = StackedExperts.run_expert

    def counted(self: StackedExperts, expert: int, x: torch.Tensor) -> torch.Tensor:
        calls.append((expert, x.shape[0]))
        return run_expert(self, expert, x)

    monkeypatch.setattr(StackedExperts, "run_expert", counted)
    x = torch.randn(64, block.gate.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = block(x)
        expert_ids, _ = block.route(x)
    active = sorted(set(expert_ids.flatten().tolist()))
    assert [expert for expert, _ in calls] == active  # one call per active expert, in order
    assert sum(rows for _, rows in calls) == expert_ids.numel()  # every (token, slot) once
    assert len(calls) <= block.router.num_experts < x.shape[0]
    with torch.no_grad():
        expected = token_by_token(block, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_routing_matches_transformers(arch: str, tiny_model_dirs: dict[str, Path]) -> None:
    """The experts and weights our router picks are the ones transformers' router picks."""
    model_dir = tiny_model_dirs[arch]
    ours = sparse_blocks(load_model(model_dir))[0]
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                                  dtype=torch.float32)
    layer = reference.model.layers[0]
    router = layer.mlp.gate if hasattr(layer, "mlp") else layer.block_sparse_moe.gate
    x = torch.randn(32, ours.gate.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, ref_weights, ref_ids = router(x)
        ids, weights = ours.route(x)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights.to(weights.dtype), atol=1e-6, rtol=1e-6)
    normalized = weights.sum(-1).sub(1).abs().max().item() < 1e-5
    assert normalized == ours.router.normalize  # the tiny configs cover both settings


def test_sparse_and_dense_layers_follow_the_config() -> None:
    """Qwen2-MoE's mlp_only_layers and decoder_sparse_step, as transformers builds them."""
    config = build_config("qwen2_moe", num_hidden_layers=6, mlp_only_layers=[3],
                          decoder_sparse_step=2, architectures=["Qwen2MoeForCausalLM"])
    reference = transformers.AutoModelForCausalLM.from_config(config)
    expected = [type(layer.mlp).__name__.endswith("SparseMoeBlock")
                for layer in reference.model.layers]
    assert expected == [False, True, False, False, False, True]
    ours = [is_sparse_layer(config, index) for index in range(6)]
    assert ours == expected
    model = get_model_class(config)(config, TorchAttentionBackend())
    kinds = [type(layer.mlp) for layer in model.model.layers]
    assert kinds == [SparseMoeBlock if sparse else LlamaMLP for sparse in expected]


def test_stacked_expert_checkpoint_loads_like_per_expert(
        tiny_model_dirs: dict[str, Path]) -> None:
    """transformers' fused layout (experts.gate_up_proj [E, 2I, H], experts.down_proj
    [E, H, I]) gives the same parameters as the hub's one tensor per expert."""
    model_dir = tiny_model_dirs["qwen3_moe"]
    per_expert = load_file(model_dir / "model.safetensors")
    stacked = {name: tensor for name, tensor in per_expert.items() if ".experts." not in name}
    config = transformers.AutoConfig.from_pretrained(model_dir)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        experts = range(config.num_experts)
        stacked[f"{prefix}.gate_up_proj"] = torch.stack([
            torch.cat([per_expert[f"{prefix}.{e}.gate_proj.weight"],
                       per_expert[f"{prefix}.{e}.up_proj.weight"]]) for e in experts])
        stacked[f"{prefix}.down_proj"] = torch.stack(
            [per_expert[f"{prefix}.{e}.down_proj.weight"] for e in experts])
    model = get_model_class(config)(config, TorchAttentionBackend())
    model.load_weights(stacked.items())
    reference = load_model(model_dir)
    for (name, param), (_, expected) in zip(model.named_parameters(),
                                            reference.named_parameters(), strict=True):
        assert torch.equal(param, expected), name


def test_missing_expert_and_bad_configs_are_errors(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["mixtral"]
    weights = load_file(model_dir / "model.safetensors")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    missing = {k: v for k, v in weights.items() if "experts.3.w2" not in k}
    with pytest.raises(UnsupportedModelError, match="lacks 2 tensors"):
        get_model_class(config)(config, TorchAttentionBackend()).load_weights(missing.items())
    renamed = dict(weights)
    renamed["model.layers.0.block_sparse_moe.experts.0.w9.weight"] = renamed.pop(
        "model.layers.0.block_sparse_moe.experts.0.w1.weight")
    with pytest.raises(UnsupportedModelError, match="w9"):
        get_model_class(config)(config, TorchAttentionBackend()).load_weights(renamed.items())
    too_many = build_config("mixtral", num_experts_per_tok=5,
                            architectures=["MixtralForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=5"):
        get_model_class(too_many)(too_many, TorchAttentionBackend())


def test_split_experts_compute_the_same_and_quantize_to_int8(
        tiny_model_dirs: dict[str, Path]) -> None:
    """Prepacking and int8 replace each matmul's dense weight, so they need one Linear per
    expert: split, the block computes exactly what the stacks did; quantized, every expert
    matmul is int8 and the output stays close."""
    model = load_model(tiny_model_dirs["mixtral"])
    block = sparse_blocks(model)[0]
    x = torch.randn(48, block.gate.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stacked = block(x)
        block.experts.split()
        assert block.experts.gate_up_proj.numel() == 0  # no second copy of the weights
        assert torch.equal(block(x), stacked)
    num_experts = block.router.num_experts
    quantized, kept = model.quantize_weights(bits=8)
    expert_layers = [layer for module in model.modules() if isinstance(module, StackedExperts)
                     for pair in module.expert_layers or [] for layer in pair]
    assert len(expert_layers) == 2 * num_experts * model.hf_config.num_hidden_layers
    assert all(layer.int8_weight is not None for layer in expert_layers)
    assert quantized >= len(expert_layers) and kept == 0
    with torch.no_grad():
        int8_out = block(x)
    relative_error = float((int8_out - stacked).norm() / stacked.norm())
    assert 0 < relative_error < 0.05

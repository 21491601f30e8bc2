"""RoPE scaling (`linear`, `dynamic`, `yarn`) against transformers: frequencies, attention factor
and cos/sin table bit for bit, and greedy generation past the original context on tiny models;
`dynamic` against a direct computation of vLLM's scaled base."""

from __future__ import annotations

import random
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.layers.rotary import RopeSettings, RotaryEmbedding, inverse_frequencies, rope_settings
from tests.devices import device_args
from tests.tiny_models import build_config, greedy_reference, save_tiny_model

ORIGINAL_CONTEXT = 32  # the tiny models' pre-scaling context; prompts run well past it
HEAD_DIM = 16  # build_config's llama and qwen2: hidden_size 64 over 4 heads
NUM_NEW_TOKENS = 24
PROMPT_LENGTHS = (70, 96)  # + NUM_NEW_TOKENS stays inside the 4x scaled context of 128

# rope_parameters and max_position_embeddings of realistic head_dim 128 configs: every key
# transformers 5.24 reads for each type, DeepSeek-V3 and Qwen2.5/Phi-3 style yarn included.
FREQUENCY_CASES: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "linear": ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, {}),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
              "original_max_position_embeddings": 4096}, {"max_position_embeddings": 16384}),
    # Qwen2.5's recipe: original == max_position_embeddings, the scaled context is implicit
    "yarn-qwen2.5": ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                      "original_max_position_embeddings": 32768},
                     {"max_position_embeddings": 32768}),
    "yarn-deepseek-mscale": ({"rope_type": "yarn", "factor": 40, "rope_theta": 10000.0,
                              "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 16,
                              "beta_slow": 2, "original_max_position_embeddings": 4096},
                             {"max_position_embeddings": 163840}),
    "yarn-untruncated-attention-factor": ({
        "rope_type": "yarn", "factor": 8.0, "rope_theta": 500000.0, "truncate": False,
        "attention_factor": 1.25, "original_max_position_embeddings": 8192}, {}),
    # a null factor is the ratio of the two contexts
    "yarn-null-factor": ({"rope_type": "yarn", "factor": None, "rope_theta": 10000.0,
                          "original_max_position_embeddings": 4096},
                         {"max_position_embeddings": 16384}),
    # Phi-3 style: a top-level original_max_position_embeddings wins over the rope parameters'
    "yarn-top-level-original": ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                 "original_max_position_embeddings": 4096},
                                {"original_max_position_embeddings": 2048}),
}


def rope_init_functions() -> dict[str, Any]:
    """transformers' RoPE initializers, imported when a test runs: importing its modeling
    modules while tests are collected imports Triton in compiled mode, before the Triton tests
    can switch it to the interpreter."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return dict(ROPE_INIT_FUNCTIONS)


def unscaled(settings: RopeSettings) -> RopeSettings:
    return RopeSettings(theta=settings.theta)


@pytest.mark.parametrize("case", sorted(FREQUENCY_CASES))
def test_frequencies_and_attention_factor_match_transformers(case: str) -> None:
    rope_parameters, overrides = FREQUENCY_CASES[case]
    config = build_config("llama", head_dim=128, rope_parameters=dict(rope_parameters),
                          **overrides)
    rope_type = str(rope_parameters["rope_type"])
    expected, expected_attention_factor = rope_init_functions()[rope_type](config, "cpu")
    settings = rope_settings(config)
    actual = inverse_frequencies(128, settings)
    assert settings.rope_type == rope_type
    assert torch.equal(actual, expected)
    assert settings.attention_factor == expected_attention_factor
    assert not torch.equal(actual, inverse_frequencies(128, unscaled(settings)))


def test_yarn_context_lengths() -> None:
    """The context a yarn model is served at: original * factor (as vLLM derives it), which
    Qwen2.5 style configs (max_position_embeddings == original) leave implicit."""
    def settings(case: str) -> RopeSettings:
        rope_parameters, overrides = FREQUENCY_CASES[case]
        return rope_settings(build_config("llama", rope_parameters=dict(rope_parameters),
                                          **overrides))

    assert settings("yarn-qwen2.5").scaled_max_position == 4 * 32768
    assert settings("yarn-deepseek-mscale").scaled_max_position == 163840
    assert settings("yarn-null-factor").factor == 4.0
    assert settings("yarn-top-level-original").original_max_position_embeddings == 2048
    assert settings("yarn-top-level-original").scaled_max_position == 4 * 2048
    assert settings("linear").scaled_max_position == 4 * 512  # build_config's 512 positions


def test_legacy_rope_scaling_reads_the_same() -> None:
    """A transformers 4 style config (rope_theta + rope_scaling with `type`) gives the same
    settings as the rope_parameters it standardizes to."""
    config = build_config("llama", rope_parameters=dict(FREQUENCY_CASES["yarn"][0]),
                          max_position_embeddings=16384)
    legacy = types.SimpleNamespace(
        rope_theta=10000.0, max_position_embeddings=16384,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})
    assert rope_settings(legacy) == rope_settings(config)  # type: ignore[arg-type]


def transformers_cos_sin(arch: str, config: transformers.PretrainedConfig,
                         num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos and sin [num_positions, head_dim] for one sequence of that length."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    klass = {"llama": LlamaRotaryEmbedding, "qwen2": Qwen2RotaryEmbedding}[arch]
    rotary = klass(config)
    position_ids = torch.arange(num_positions)[None, :]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), position_ids)
    return cos[0], sin[0]


def ours_cos_sin(config: transformers.PretrainedConfig, num_positions: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Our cos and sin rows [num_positions, head_dim], in transformers' layout."""
    rotary = RotaryEmbedding(HEAD_DIM, config.max_position_embeddings, rope_settings(config))
    cos_full, sin_signed = rotary(torch.arange(num_positions), torch.float32)
    sin = sin_signed[:, 0].clone()
    sin[:, :HEAD_DIM // 2] = -sin[:, :HEAD_DIM // 2]  # undo the rotate-half sign folded in
    return cos_full[:, 0], sin


TABLE_CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
             "original_max_position_embeddings": ORIGINAL_CONTEXT},
}


@pytest.mark.parametrize("rope_type", sorted(TABLE_CASES))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cos_sin_table_matches_transformers(arch: str, rope_type: str) -> None:
    """Every row of the table, yarn's attention factor included, up to the scaled context."""
    config = build_config(arch, max_position_embeddings=ORIGINAL_CONTEXT,
                          rope_parameters=dict(TABLE_CASES[rope_type]))
    num_positions = 4 * ORIGINAL_CONTEXT
    rotary = RotaryEmbedding(HEAD_DIM, config.max_position_embeddings, rope_settings(config))
    assert rotary.cos_sin_cache.shape == (num_positions, HEAD_DIM)  # stretched past the config's 32
    expected_cos, expected_sin = transformers_cos_sin(arch, config, num_positions)
    cos, sin = ours_cos_sin(config, num_positions)
    assert torch.equal(cos, expected_cos)
    assert torch.equal(sin, expected_sin)
    plain = build_config(arch, max_position_embeddings=num_positions)
    assert not torch.equal(cos, transformers_cos_sin(arch, plain, num_positions)[0])


DYNAMIC_ROPE = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}


def vllm_dynamic_inverse_frequencies(head_dim: int, theta: float, factor: float,
                                     max_position_embeddings: int) -> torch.Tensor:
    """vLLM's DynamicNTKScalingRotaryEmbedding, written out: one base for the whole scaled
    context max_len = max_position_embeddings * factor."""
    max_len = max_position_embeddings * factor
    base = theta * ((factor * max_len / max_position_embeddings) - (factor - 1)) ** (
        head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (base ** exponents)


@pytest.mark.parametrize("head_dim", [HEAD_DIM, 128])
def test_dynamic_frequencies_follow_vllm(head_dim: int) -> None:
    config = build_config("llama", head_dim=head_dim, max_position_embeddings=ORIGINAL_CONTEXT,
                          rope_parameters=dict(DYNAMIC_ROPE))
    settings = rope_settings(config)
    actual = inverse_frequencies(head_dim, settings)
    expected = vllm_dynamic_inverse_frequencies(head_dim, 10000.0, 4.0, ORIGINAL_CONTEXT)
    assert torch.equal(actual, expected)
    # NTK raises the base: every frequency but the first (theta^0) drops
    plain = inverse_frequencies(head_dim, unscaled(settings))
    assert actual[0] == plain[0] and bool((actual[1:] < plain[1:]).all())
    assert settings.scaled_max_position == 4 * ORIGINAL_CONTEXT


def test_dynamic_table_is_transformers_at_the_full_scaled_context() -> None:
    """transformers recomputes dynamic NTK from each forward's length; our one table is what it
    computes for a sequence of the full scaled length, and (unlike transformers, which keeps
    the plain base there) is scaled inside the original context too."""
    config = build_config("llama", max_position_embeddings=ORIGINAL_CONTEXT,
                          rope_parameters=dict(DYNAMIC_ROPE))
    num_positions = 4 * ORIGINAL_CONTEXT
    expected, _ = rope_init_functions()["dynamic"](config, "cpu", seq_len=num_positions)
    assert torch.equal(inverse_frequencies(HEAD_DIM, rope_settings(config)), expected)
    # transformers' forward passes the length as a tensor, so its base is rounded to float32
    # first: equal to within an ulp of the frequencies, not bit for bit
    cos, sin = ours_cos_sin(config, num_positions)
    expected_cos, expected_sin = transformers_cos_sin("llama", config, num_positions)
    torch.testing.assert_close(cos, expected_cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(sin, expected_sin, rtol=0, atol=1e-5)
    short_cos, _ = transformers_cos_sin("llama", config, ORIGINAL_CONTEXT)
    plain_cos, _ = transformers_cos_sin("llama", build_config("llama"), ORIGINAL_CONTEXT)
    assert torch.equal(short_cos, plain_cos)
    assert (cos[:ORIGINAL_CONTEXT] - short_cos).abs().max() > 1e-2


def make_prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENGTHS]


def reference_outputs(model_dir: Path, prompts: list[list[int]],
                      rope_parameters: dict[str, object] | None = None) -> list[list[int]]:
    """transformers' greedy generate in fp32, one prompt at a time; `rope_parameters` replaces
    the checkpoint's."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if rope_parameters is not None:
        config.rope_parameters = rope_parameters
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, config=config,
                                                              dtype=torch.float32)
    return greedy_reference(model, prompts, NUM_NEW_TOKENS)


def engine_outputs(model_dir: Path, prompts: list[list[int]]) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(model_dir), **device_args(dtype="float32", block_size=16))
    greedy = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS,
                            min_tokens=NUM_NEW_TOKENS)
    outputs = llm.generate(prompts, greedy)
    return [list(output.outputs[0].token_ids) for output in outputs], llm


# max_position_embeddings and rope_parameters of each tiny model: linear keeps the original
# context as max_position_embeddings (vicuna-16k style); yarn both with it implicit
# (Qwen2.5 style) and with max_position_embeddings the scaled context (DeepSeek/Qwen3 style).
SCALED_MODELS: dict[str, tuple[str, int, dict[str, object]]] = {
    "llama-linear": ("llama", ORIGINAL_CONTEXT, TABLE_CASES["linear"]),
    "qwen2-linear": ("qwen2", ORIGINAL_CONTEXT, TABLE_CASES["linear"]),
    "llama-yarn": ("llama", 4 * ORIGINAL_CONTEXT, TABLE_CASES["yarn"]),
    "qwen2-yarn-implicit": ("qwen2", ORIGINAL_CONTEXT, TABLE_CASES["yarn"]),
}


@pytest.mark.parametrize("model", sorted(SCALED_MODELS))
def test_greedy_past_original_context_matches_transformers(model: str, tmp_path: Path) -> None:
    arch, max_positions, rope_parameters = SCALED_MODELS[model]
    model_dir = save_tiny_model(arch, tmp_path / model, max_position_embeddings=max_positions,
                                rope_parameters=dict(rope_parameters))
    prompts = make_prompts()
    expected = reference_outputs(model_dir, prompts)
    actual, llm = engine_outputs(model_dir, prompts)
    assert actual == expected
    assert llm.llm_engine.model_max_len == 4 * ORIGINAL_CONTEXT  # the scaled context
    # the scaling decides tokens: the same weights with plain RoPE generate something else
    plain = reference_outputs(model_dir, prompts, {"rope_type": "default", "rope_theta": 1e4})
    assert plain != expected


def test_dynamic_greedy_is_plain_rope_at_the_scaled_base(tmp_path: Path) -> None:
    """End to end, dynamic NTK is default RoPE with vLLM's scaled base for every position, past
    the original context too: transformers with that base as rope_theta generates the same."""
    model_dir = save_tiny_model("llama", tmp_path / "dynamic",
                                max_position_embeddings=ORIGINAL_CONTEXT,
                                rope_parameters=dict(DYNAMIC_ROPE))
    # theta * (factor * max_len / original - (factor - 1)) ** (dim / (dim - 2)), max_len = 4 * 32
    base = 10000.0 * (4.0 * 4.0 - 3.0) ** (HEAD_DIM / (HEAD_DIM - 2))
    prompts = make_prompts()
    actual, llm = engine_outputs(model_dir, prompts)
    assert actual == reference_outputs(model_dir, prompts,
                                       {"rope_type": "default", "rope_theta": base})
    assert llm.llm_engine.model_max_len == 4 * ORIGINAL_CONTEXT
    assert actual != reference_outputs(model_dir, prompts,
                                       {"rope_type": "default", "rope_theta": 10000.0})

"""Sliding-window attention end to end: a tiny Mistral (every layer windowed) and a tiny Qwen2
(one full, one windowed layer) with sliding_window=16, prompts well past the window, greedy
outputs token-identical to transformers (which applies the window) under prefix caching,
chunked prefill and preemption; the MoE families once each; and which layers get a window,
family by family."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.models.llama import sliding_window_of
from tests.devices import device_args
from tests.tiny_models import greedy_reference, save_tiny_model

WINDOW = 16
NUM_NEW_TOKENS = 24
PROMPT_LENGTHS = (5, 17, 61, 75, 90)
MODELS = {
    "mistral": ("mistral", {"sliding_window": WINDOW}),
    # transformers windows layers i >= max_window_layers: layer 0 full, layer 1 windowed
    "qwen2": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW,
                        "max_window_layers": 1}),
    "mixtral": ("mixtral", {"sliding_window": WINDOW}),
    # Qwen2-MoE's own rule: even layers below max_window_layers, so layer 0 only
    "qwen2_moe": ("qwen2_moe", {"use_sliding_window": True, "sliding_window": WINDOW,
                                "max_window_layers": 2}),
    "qwen3_moe": ("qwen3_moe", {"use_sliding_window": True, "sliding_window": WINDOW}),
}
DENSE_MODELS = ("mistral", "qwen2")
VARIANTS = {
    "default": {},
    "no_prefix_caching": {"enable_prefix_caching": False},
    "chunked_prefill": {"max_num_batched_tokens": 20},
    "preemption": {"num_blocks": 12, "block_size": 16},
}


def make_prompts() -> list[list[int]]:
    rng = random.Random(16)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENGTHS]


def shared_prefix_prompt(prompts: list[list[int]]) -> list[int]:
    """The longest prompt's first 80 tokens (5 blocks of 16, all past the window) + 9 new."""
    return prompts[-1][:80] + list(range(100, 109))


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, min_tokens=NUM_NEW_TOKENS)


def reference_outputs(model_dir: Path, prompts: list[list[int]],
                      is_windowed: bool = True) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time, fp32; without the window (every
    layer full attention) when not is_windowed."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if not is_windowed and getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * config.num_hidden_layers  # Qwen2 and kin
    elif not is_windowed:
        config.sliding_window = None  # Mistral and kin
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, config=config,
                                                              dtype=torch.float32)
    return greedy_reference(model, prompts, NUM_NEW_TOKENS)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("windowed-models")
    return {name: save_tiny_model(arch, root / name, seed=5, **overrides)
            for name, (arch, overrides) in MODELS.items()}


@pytest.fixture(scope="module")
def references(model_dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    prompts = make_prompts()
    prompts.append(shared_prefix_prompt(prompts))
    return {name: reference_outputs(path, prompts) for name, path in model_dirs.items()}


def test_the_references_apply_the_window(model_dirs: dict[str, Path],
                                         references: dict[str, list[list[int]]]) -> None:
    """Without this, a backend that ignored the window could still match: transformers'
    outputs with and without it differ on the prompts past the window."""
    prompts = make_prompts()
    for name, path in model_dirs.items():
        full = reference_outputs(path, prompts[2:], is_windowed=False)
        windowed = references[name][2:len(prompts)]
        assert all(a != b for a, b in zip(full, windowed, strict=True)), name


# every variant for the dense models; the MoE ones (same attention) with chunked prefill only
CASES = [(name, variant) for name in DENSE_MODELS for variant in sorted(VARIANTS)] + [
    (name, "chunked_prefill") for name in MODELS if name not in DENSE_MODELS]


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_greedy_matches_transformers_past_the_window(
        name: str, variant: str, model_dirs: dict[str, Path],
        references: dict[str, list[list[int]]]) -> None:
    llm = LLM(str(model_dirs[name]), **device_args(dtype="float32", **VARIANTS[variant]))
    prompts = make_prompts()
    outputs = llm.generate(prompts, greedy())
    assert [o.outputs[0].token_ids for o in outputs] == references[name][:len(prompts)]
    if variant == "preemption":
        assert llm.llm_engine.core.scheduler.num_preemptions > 0
    # then a prompt whose cached prefix (with prefix caching) reaches past the window
    shared = llm.generate([shared_prefix_prompt(prompts)], greedy())[0]
    assert shared.outputs[0].token_ids == references[name][-1]
    if VARIANTS[variant].get("enable_prefix_caching", True):
        assert shared.num_cached_tokens == 80
    manager = llm.llm_engine.core.kv_cache_manager
    assert manager.num_free_blocks == manager.num_total_blocks  # no leaks


def _config(arch: str, **overrides: object) -> transformers.PretrainedConfig:
    klass = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
             "mixtral": transformers.MixtralConfig, "qwen2": transformers.Qwen2Config,
             "qwen3": transformers.Qwen3Config, "qwen2_moe": transformers.Qwen2MoeConfig,
             "qwen3_moe": transformers.Qwen3MoeConfig}[arch]
    return klass(num_hidden_layers=4, **overrides)


def _windows(config: transformers.PretrainedConfig) -> list[int | None]:
    return [sliding_window_of(config, i) for i in range(config.num_hidden_layers)]


@pytest.mark.parametrize(("arch", "overrides", "expected"), [
    # Qwen2/Qwen3: layer_types from use_sliding_window and max_window_layers
    ("qwen2", {}, [None] * 4),  # use_sliding_window defaults to False
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
     [None, 8, 8, 8]),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3},
     [None, None, None, 8]),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8,
               "layer_types": ["sliding_attention", "full_attention"] * 2}, [8, None, 8, None]),
    # Qwen2-MoE: its own rule (even layers below max_window_layers); sliding_window 0 when off
    ("qwen2_moe", {}, [None] * 4),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3},
     [8, None, 8, None]),
    # Mistral, Mixtral, Qwen3-MoE: the window on every layer, layer_types or not
    ("mistral", {"sliding_window": 8}, [8] * 4),
    ("mistral", {"sliding_window": None}, [None] * 4),
    ("mistral", {"sliding_window": 8, "layer_types": ["full_attention"] * 4}, [8] * 4),
    ("mixtral", {}, [None] * 4),
    ("mixtral", {"sliding_window": 8}, [8] * 4),
    ("qwen3_moe", {"sliding_window": 8}, [None] * 4),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8}, [8] * 4),
    # Llama ignores a sliding_window a config may carry
    ("llama", {"sliding_window": 8}, [None] * 4),
])
def test_which_layers_get_a_window(arch: str, overrides: dict[str, object],
                                   expected: list[int | None]) -> None:
    assert _windows(_config(arch, **overrides)) == expected

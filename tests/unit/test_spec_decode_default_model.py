"""Speculative decoding on the embedded default model (Qwen2.5-Coder-0.5B-Instruct), fp32: greedy
with n-gram proposals, and with the model drafting for itself, gives exactly the tokens of
greedy without speculation, on an edit prompt where proposals are mostly accepted and on plain
prompts where they are mostly rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from tests.devices import device_args

pytestmark = [pytest.mark.default_model, pytest.mark.slow]

CODE = '''def moving_average(values, window=3):
    """The mean of each run of `window` consecutive values."""
    averages = []
    for start in range(len(values) - window + 1):
        chunk = values[start:start + window]
        averages.append(sum(chunk) / window)
    return averages
'''
PROMPTS = [
    f"Rename the variable `chunk` to `run` in this code and return the whole code only:\n\n{CODE}",
    "What is the difference between a process and a thread? Answer in two sentences.",
]
NUM_TOKENS = 32
# every decoding row verifies the full count, whatever its acceptance
ALWAYS = {"disable_by_batch_size": None, "adaptive": False}


def _generate(model_dir: Path, speculative_config: dict[str, object] | None
              ) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens per prompt, and [proposed, accepted] tokens summed over the steps."""
    llm = LLM(str(model_dir), **device_args(dtype="float32", kv_cache_memory_gb=0.25,
                                            speculative_config=speculative_config))
    tokenizer = llm.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for p in PROMPTS]
    core = llm.llm_engine.core
    counts = [0, 0]
    step = core.step

    def counting_step():  # type: ignore[no-untyped-def]
        output = step()
        if core.last_stats.spec is not None:
            counts[0] += core.last_stats.spec.num_draft_tokens
            counts[1] += core.last_stats.spec.num_accepted_tokens
        return output

    core.step = counting_step  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)], counts


@pytest.fixture(scope="module")
def greedy_tokens(default_model_dir: Path) -> list[list[int]]:
    return _generate(default_model_dir, None)[0]


@pytest.mark.parametrize("method", ["ngram", "self-draft"])
def test_greedy_with_speculation_is_greedy_without(default_model_dir: Path, method: str,
                                                   greedy_tokens: list[list[int]]) -> None:
    config: dict[str, object] = (
        {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2,
         "prompt_lookup_max": 4, **ALWAYS} if method == "ngram"
        else {"model": str(default_model_dir), "num_speculative_tokens": 4, **ALWAYS})
    tokens, (proposed, accepted) = _generate(default_model_dir, config)
    assert tokens == greedy_tokens
    assert proposed > 0 and accepted > 0
    if method == "self-draft":  # the same weights propose what they would sample
        assert accepted == proposed
    else:  # the edit prompt copies its code: most proposals hold
        assert accepted > proposed // 2

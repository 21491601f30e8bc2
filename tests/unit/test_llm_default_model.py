"""The embedded default model (Qwen2.5-Coder-0.5B-Instruct) through our engine: the same greedy
tokens as transformers on chat prompts, fp32."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

from engine import LLM, SamplingParams

pytestmark = [pytest.mark.default_model, pytest.mark.slow]

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the difference between a process and a thread? Answer in two sentences.",
    "用中文简单介绍一下快速排序，并加一个表情符号。",
]
NUM_TOKENS = 32


@pytest.fixture(scope="module")
def default_model_dir() -> Path:
    from engine.default_model import ensure_default_model
    from engine.errors import UnsupportedModelError

    try:
        return ensure_default_model()
    except UnsupportedModelError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"default model not installed: {error}")


def test_greedy_matches_transformers(default_model_dir: Path) -> None:
    llm = LLM(str(default_model_dir), dtype="float32", kv_cache_memory_gb=0.5)
    tokenizer = llm.tokenizer
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS)
    ours = [o.outputs[0] for o in llm.generate(prompts, params)]
    del llm
    reference = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir,
                                                                  dtype=torch.float32)
    for prompt, output in zip(prompts, ours, strict=True):
        input_ids = torch.tensor([prompt])
        expected = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                      do_sample=False, max_new_tokens=NUM_TOKENS,
                                      min_new_tokens=NUM_TOKENS)[0, len(prompt):].tolist()
        assert output.token_ids == expected, (tokenizer.decode(output.token_ids),
                                              tokenizer.decode(expected))
    # sensible text, not just equal noise: the code prompt gets code
    assert "def " in ours[0].text


def test_cjk_and_emoji_deltas_are_whole_characters(default_model_dir: Path) -> None:
    llm = LLM(str(default_model_dir), dtype="bfloat16", kv_cache_memory_gb=0.5)
    engine = llm.engine
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "用中文写一句话介绍春天，并在句末加上三个不同的表情符号。"}],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    engine.add_request("cjk", prompt, SamplingParams(temperature=0.0, max_tokens=48))
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            deltas.append(output.outputs[0].delta_text)
            final = output
    assert final is not None
    text = final.outputs[0].text
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # the model did write Chinese

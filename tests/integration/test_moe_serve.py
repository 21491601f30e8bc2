"""`pagedserve serve` on tiny Mixture-of-Experts checkpoints, as a user starts it: the openai SDK
gets transformers' greedy tokens back, streamed and not."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch
import transformers

from tests.integration.conftest import API_KEY, MODEL_NAME, serve_process
from tests.tiny_models import greedy_reference

PROMPT = [5, 17, 101, 33, 250, 7, 64, 9, 300, 12, 45, 77]
NUM_TOKENS = 12


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_serve_moe_model_through_the_sdk(arch: str, tiny_model_dirs: dict[str, Path],
                                         tmp_path: Path) -> None:
    model_dir = tiny_model_dirs[arch]
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    [expected] = greedy_reference(reference, [PROMPT], NUM_TOKENS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    with serve_process(model_dir, tmp_path / "serve.log", "--num-blocks", "64") as running:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key=API_KEY,
                               max_retries=0)
        greedy = {"temperature": 0.0, "max_tokens": NUM_TOKENS}
        extra = {"min_tokens": NUM_TOKENS, "return_token_ids": True}
        completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, **greedy,
                                               extra_body=extra)
        choice = completion.choices[0]
        assert choice.model_extra is not None
        assert choice.model_extra["token_ids"] == expected
        stream = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Which expert?"}],
            stream=True, **greedy, extra_body={"min_tokens": NUM_TOKENS})
        deltas = [chunk.choices[0].delta.content for chunk in stream
                  if chunk.choices and chunk.choices[0].delta.content]
        assert len(deltas) > 1  # streamed in increments
        chat_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Which expert?"}], add_generation_prompt=True,
            tokenize=False)
        chat_ids = tokenizer.encode(str(chat_text), add_special_tokens=False)
        [chat_expected] = greedy_reference(reference, [chat_ids], NUM_TOKENS)
        assert "".join(deltas) == tokenizer.decode(chat_expected, skip_special_tokens=True)

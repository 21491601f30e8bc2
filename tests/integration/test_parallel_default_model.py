"""`pagedserve serve --tensor-parallel-size 2` on the embedded default model, as a user starts
it: the same greedy answers as one process in fp32 (streamed and not), through the OpenAI SDK,
and 16 concurrent streams all finish."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from tests.integration.test_default_model import (
    DEFAULT_MODEL_NAME,
    REPO,
    _free_port,
    _require_default_model,
    _wait_healthy,
)

QUESTIONS = [
    "What is the capital of France? Answer with one word.",
    "Write a Python function add(a, b) that returns a + b. Only code.",
    "Name three sorting algorithms.",
]
MAX_TOKENS = 24


@contextmanager
def _serving(tmp_path: Path, name: str, *flags: str) -> Iterator[openai.OpenAI]:
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp_path / f"{name}.log"
    command = [str(Path(sys.executable).with_name("pagedserve")), "serve", "--config",
               "configs/default.yaml", "--dtype", "float32", "--port", str(port), *flags]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env=dict(os.environ))
    try:
        _wait_healthy(process, base_url, log)
        yield openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0,
                            timeout=600)
        process.terminate()
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _answers(client: openai.OpenAI) -> list[tuple[str, str]]:
    """Each question's greedy answer, whole and streamed."""
    answers = []
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        whole = client.chat.completions.create(model=DEFAULT_MODEL_NAME, temperature=0,
                                               max_tokens=MAX_TOKENS, messages=messages)
        stream = client.chat.completions.create(model=DEFAULT_MODEL_NAME, temperature=0,
                                                max_tokens=MAX_TOKENS, messages=messages,
                                                stream=True)
        streamed = "".join(chunk.choices[0].delta.content or ""
                           for chunk in stream if chunk.choices)
        answers.append((whole.choices[0].message.content or "", streamed))
    return answers


async def _concurrent_streams(base_url: str, count: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    async def one(index: int) -> str:
        stream = await client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, temperature=0.7, seed=index, max_tokens=16, stream=True,
            messages=[{"role": "user", "content": f"Say something about the number {index}."}])
        finish = ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish

    return await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.slow
@pytest.mark.default_model
def test_tensor_parallel_default_model_answers_like_one_process(tmp_path: Path) -> None:
    _require_default_model()
    with _serving(tmp_path, "tp1") as client:
        expected = _answers(client)
    with _serving(tmp_path, "tp2", "--tensor-parallel-size", "2") as client:
        answers = _answers(client)
        finishes = asyncio.run(_concurrent_streams(str(client.base_url), 16))
    assert all(whole == streamed for whole, streamed in expected)
    assert answers == expected
    assert "paris" in answers[0][0].lower()
    assert len(finishes) == 16 and all(f in ("length", "stop") for f in finishes), finishes

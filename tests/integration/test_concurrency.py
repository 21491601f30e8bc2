"""Acceptance 2: 32 concurrent streaming clients all complete, and each one's output equals the
same request run alone (greedy), so batching never changes what a client gets."""

from __future__ import annotations

import asyncio

import openai

from tests.integration.conftest import MODEL_NAME, RunningServer

NUM_CLIENTS = 32
WORDS = ["fox", "blocks", "batching", "fibonacci", "hello", "world", "paged", "tokens"]


def _messages(i: int) -> list[dict[str, str]]:
    # distinct prompts of different lengths, so prefills and decodes mix in one batch
    words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 7))
    return [{"role": "user", "content": f"{i}: {words}"}]


async def _stream_one(client: openai.AsyncOpenAI, i: int, max_tokens: int) -> tuple[str, str]:
    stream = await client.chat.completions.create(
        model=MODEL_NAME, messages=_messages(i), max_tokens=max_tokens, temperature=0.0,
        stream=True, extra_body={"ignore_eos": True})
    text, finish = "", ""
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


def test_32_concurrent_streams_match_sequential(server: RunningServer) -> None:
    max_tokens = [8 + (i % 5) * 4 for i in range(NUM_CLIENTS)]

    async def run() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        client = server.async_client()
        concurrent = await asyncio.gather(*(_stream_one(client, i, max_tokens[i])
                                            for i in range(NUM_CLIENTS)))
        sequential = [await _stream_one(client, i, max_tokens[i]) for i in range(NUM_CLIENTS)]
        await client.close()
        return list(concurrent), sequential

    concurrent, sequential = asyncio.run(run())
    assert all(finish == "length" for _, finish in concurrent)
    assert [text for text, _ in concurrent] == [text for text, _ in sequential]
    assert len({text for text, _ in concurrent}) > 1  # the prompts really differ
    server.wait_idle()

"""Acceptance 1: chat and completions through the official OpenAI SDK (sync and async), against
transformers' own greedy generation and the tokenizer's own chat template as references."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import openai
import pytest
import torch
import transformers
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import MODEL_NAME, RunningServer

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Paged attention stores keys and values"}]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def tokenizer(server: RunningServer) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(server.model_dir)


@pytest.fixture(scope="module")
def hf_model(server: RunningServer) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(server.model_dir,
                                                             dtype=torch.float32).eval()


def _chat_prompt_ids(tokenizer: transformers.PreTrainedTokenizerBase,
                     messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _hf_greedy(model: transformers.PreTrainedModel, prompt_ids: list[int],
               num_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation (EOS suppressed) and each token's logprob."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=num_tokens,
                             min_new_tokens=num_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0)
    generated = out.sequences[0, len(prompt_ids):].tolist()
    with torch.no_grad():  # logprobs from raw logits (scores may be processed by min_new_tokens)
        logits = model(out.sequences).logits[0, len(prompt_ids) - 1:-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return generated, [float(logprobs[i, t]) for i, t in enumerate(generated)]


# ---------------------------------------------------------------- models, health, misc


def test_models_lists_served_name(server: RunningServer) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].owned_by == "pagedserve"
    raw = server.http().get("/v1/models").json()["data"][0]
    assert raw["max_model_len"] == server.engine.max_model_len == 512
    assert raw["object"] == "model" and isinstance(raw["created"], int)


def test_health_version_metrics_are_open(server: RunningServer) -> None:
    bare = httpx.Client(base_url=server.base_url)  # no API key
    assert bare.get("/health").status_code == 200
    assert bare.get("/version").json()["version"]
    metrics = bare.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(metrics.text)}
    # the engine's families, labelled with the served name
    assert any(name.startswith("pagedserve_") for name in families)
    assert f'model_name="{MODEL_NAME}"' in metrics.text
    om = bare.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")


def test_openapi_schema_documents_the_api(server: RunningServer) -> None:
    schema = httpx.get(f"{server.base_url}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                 "/tokenize", "/detokenize", "/metrics", "/version"):
        assert path in schema["paths"]
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "404", "429", "503"} <= set(chat["responses"])


def test_request_id_honoured_or_generated(server: RunningServer) -> None:
    http = server.http()
    given = http.get("/v1/models", headers={"X-Request-Id": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    generated = http.get("/v1/models").headers["x-request-id"]
    assert generated and generated != "trace-42"
    error = http.post("/v1/chat/completions", json={"messages": []},
                      headers={"X-Request-Id": "bad-1"})
    assert error.status_code == 400 and error.headers["x-request-id"] == "bad-1"


def test_tokenize_and_detokenize(server: RunningServer,
                                 tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    http = server.http()
    text = "The quick brown fox"
    result = http.post("/tokenize", json={"prompt": text}).json()
    assert result["tokens"] == tokenizer.encode(text) and result["count"] == len(result["tokens"])
    assert result["max_model_len"] == 512
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == _chat_prompt_ids(tokenizer, MESSAGES)
    assert http.post("/detokenize", json={"tokens": result["tokens"]}).json()["prompt"] == text
    assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400


# ---------------------------------------------------------------- chat


def test_chat_greedy_matches_transformers(server: RunningServer,
                                          tokenizer: transformers.PreTrainedTokenizerBase,
                                          hf_model: transformers.PreTrainedModel) -> None:
    prompt_ids = _chat_prompt_ids(tokenizer, MESSAGES)
    expected_ids, expected_logprobs = _hf_greedy(hf_model, prompt_ids, 12)
    response = server.client().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=12, logprobs=True, top_logprobs=3,
        **GREEDY)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == len(prompt_ids) + 12
    assert response.id.startswith("chatcmpl-") and response.model == MODEL_NAME
    # logprobs: one entry per token, the sampled (greedy) token is the top alternative, and
    # the values are transformers' log-softmax at each position
    content = choice.logprobs.content if choice.logprobs else None
    assert content is not None and len(content) == 12
    for entry, reference in zip(content, expected_logprobs, strict=True):
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(math.exp(t) for t in tops) <= 1.0001
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(reference, abs=1e-3)
    # the bytes of all tokens make up the content, partial UTF-8 characters included
    assert bytes(b for entry in content for b in entry.bytes or []).decode(
        errors="replace") == choice.message.content


def _collect_chat_stream(stream: openai.Stream) -> tuple[dict[int, str], list, dict[int, str]]:  # type: ignore[type-arg]
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    return texts, chunks, finish


def test_chat_stream_equals_non_stream(server: RunningServer) -> None:
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=16, **GREEDY)
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = client.chat.completions.create(stream=True,  # type: ignore[call-overload]
                                            stream_options={"include_usage": True}, **kwargs)
    texts, chunks, finish = _collect_chat_stream(stream)
    assert texts == {0: whole.choices[0].message.content}
    assert finish == {0: "length"}
    # OpenAI order: role chunk first, the finish chunk, then the usage chunk with no choices
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1


def test_chat_stream_wire_format(server: RunningServer) -> None:
    """The raw SSE bytes: `data: {json}\\n\\n` frames ending with `data: [DONE]`."""
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 3, "stream": True,
            "temperature": 0}
    with server.http().stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    frames = [frame for frame in raw.split("\n\n") if frame and not frame.startswith(":")]
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames)
    assert frames[-1] == "data: [DONE]"
    payloads = [json.loads(frame.removeprefix("data: ")) for frame in frames[:-1]]
    assert all(p["object"] == "chat.completion.chunk" and "usage" in p for p in payloads)


def test_stream_data_lines_survive_unicode_line_breaks(server: RunningServer) -> None:
    """Text with U+0085, U+2028 and U+2029 (which JSON leaves raw but str.splitlines() and
    httpx's aiter_lines split on) still arrives as one parseable data line per event."""
    prompt = "a\x85b\u2028c\u2029d\r\ne\nf"
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "echo": True,
            "stream": True, "temperature": 0}
    events: list[str] = []
    with server.http().stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line:
                assert line.startswith("data: ") or line.startswith(":"), line
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1] if not event.startswith(":")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text.startswith(prompt)


def test_chat_stop_string_excluded(server: RunningServer) -> None:
    client = server.client()
    full = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24,
                                          **GREEDY).choices[0].message.content
    assert full is not None and len(full) > 12
    stop = full[8:11]
    expected = full[:full.find(stop)]
    for streamed in (False, True):
        response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                  max_tokens=24, stop=[stop], stream=streamed,
                                                  **GREEDY)
        if streamed:
            texts, _, finish = _collect_chat_stream(response)  # type: ignore[arg-type]
            assert (texts.get(0, ""), finish[0]) == (expected, "stop")
        else:
            choice = response.choices[0]  # type: ignore[union-attr]
            assert (choice.message.content, choice.finish_reason) == (expected, "stop")


def test_chat_n2_indexes_and_seed(server: RunningServer) -> None:
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=1.0, n=2,
                  seed=1234, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.index for c in first.choices] == [0, 1]
    assert first.usage.completion_tokens == 2 * 8  # both choices count
    again = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.message.content for c in again.choices] == [c.message.content
                                                          for c in first.choices]
    texts, chunks, finish = _collect_chat_stream(
        client.chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    assert texts == {c.index: c.message.content for c in first.choices}
    assert set(finish) == {0, 1}
    assert {c.choices[0].index for c in chunks[:2]} == {0, 1}  # one role chunk per choice
    others = {client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=1.0,
        seed=seed).choices[0].message.content for seed in (1, 2, 3)}
    assert len(others | {first.choices[0].message.content}) > 1  # the seed matters


def test_chat_async_client(server: RunningServer) -> None:
    async def run() -> tuple[str | None, str]:
        client = server.async_client()
        whole = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                     max_tokens=10, **GREEDY)
        stream = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                      max_tokens=10, stream=True, **GREEDY)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return whole.choices[0].message.content, text

    whole, streamed = asyncio.run(run())
    assert whole == streamed and whole


def test_chat_max_tokens_absent_runs_to_context_limit(
        server: RunningServer, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    response = server.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                       **GREEDY)
    num_prompt = len(_chat_prompt_ids(tokenizer, MESSAGES))
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == server.engine.max_model_len - num_prompt


# ---------------------------------------------------------------- legacy completions


def test_completion_greedy_matches_transformers_and_stream(
        server: RunningServer, tokenizer: transformers.PreTrainedTokenizerBase,
        hf_model: transformers.PreTrainedModel) -> None:
    prompt = "The quick brown fox"
    prompt_ids = tokenizer.encode(prompt)
    expected_ids, _ = _hf_greedy(hf_model, prompt_ids, 10)
    client = server.client()
    whole = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, **GREEDY)
    assert whole.choices[0].text == tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert whole.choices[0].finish_reason == "length" and whole.id.startswith("cmpl-")
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_ids), 10)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # the same prompt as token ids gives the same text
    by_ids = client.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=10,
                                       **GREEDY)
    assert by_ids.choices[0].text == whole.choices[0].text


def test_completion_several_prompts_and_n(server: RunningServer) -> None:
    client = server.client()
    prompts = ["Hello, world!", "def fibonacci(n):"]
    singles = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=6,
                                         **GREEDY).choices[0].text for p in prompts]
    batch = client.completions.create(model=MODEL_NAME, prompt=prompts, n=2, max_tokens=6,
                                      **GREEDY)
    # choice index = prompt_index * n + i; greedy choices of one prompt are identical
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [singles[0]] * 2 + [singles[1]] * 2
    assert batch.usage is not None and batch.usage.completion_tokens == 4 * 6
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL_NAME, prompt=prompts, n=2, max_tokens=6,
                                           stream=True, **GREEDY):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in batch.choices}


def test_completion_echo_and_logprobs(server: RunningServer) -> None:
    client = server.client()
    prompt = "Paged attention"
    echoed = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, echo=True,
                                       **GREEDY)
    plain = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5,
                                      logprobs=2, **GREEDY)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    streamed = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5,
                                         echo=True, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed.choices[0].text
    logprobs = plain.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and len(logprobs.tokens) == 5
    if not any(token.startswith("bytes:") for token in logprobs.tokens):  # whole characters
        assert "".join(logprobs.tokens) == plain.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs or [],
                                 logprobs.top_logprobs or [], strict=True):
        assert value is not None and value <= 0
        assert top is not None and 2 <= len(top) <= 3 and top[token] == value
        assert value == max(top.values())  # greedy: the sampled token is the most likely
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL_NAME, prompt=prompt, suffix="x", max_tokens=2)


def test_completion_async_client(server: RunningServer) -> None:
    async def run() -> tuple[str, str]:
        client = server.async_client()
        whole = await client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=8,
                                                **GREEDY)
        stream = await client.completions.create(model=MODEL_NAME, prompt="Hello",
                                                 max_tokens=8, stream=True, **GREEDY)
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        await client.close()
        return whole.choices[0].text, text

    whole, streamed = asyncio.run(run())
    assert whole == streamed and whole


"""Every request field honoured or refused (server/fields.py), against a real server: the table
test over every field of both APIs, then the fields that change the answer, each through the
openai SDK's extra_body as a client sends them."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from tokenizers import processors

from server.fields import CHAT, COMPLETIONS, FIELDS, Support, fields_for
from tests.integration.conftest import (
    API_KEY,
    MODEL_NAME,
    REPO,
    RunningServer,
    serve,
    serve_process,
)
from tests.tiny_models import build_tokenizer

MESSAGES = [{"role": "user", "content": "Paged attention stores keys and values"}]
ASSISTANT_START = "Continuous batching lets"
CUSTOM_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant]{% endif %}")
GREEDY = {"temperature": 0.0, "ignore_eos": True}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# per field: extra body fields that use it validly (some need a partner field)
SERVED_SAMPLES: dict[str, dict[str, dict[str, object]]] = {
    "common": {
        "model": {"model": MODEL_NAME}, "frequency_penalty": {"frequency_penalty": 0.5},
        "presence_penalty": {"presence_penalty": 0.5}, "logit_bias": {"logit_bias": {"5": 1}},
        "max_tokens": {"max_tokens": 3}, "n": {"n": 2}, "seed": {"seed": 3},
        "stop": {"stop": ["zz"]}, "stream": {"stream": True},
        "stream_options": {"stream": True, "stream_options": {
            "include_usage": True, "continuous_usage_stats": True}},
        "temperature": {"temperature": 0.5}, "top_p": {"top_p": 0.9}, "user": {"user": "u1"},
        "echo": {"echo": True}, "top_k": {"top_k": 5}, "min_p": {"min_p": 0.1},
        "repetition_penalty": {"repetition_penalty": 1.1}, "min_tokens": {"min_tokens": 1},
        "ignore_eos": {"ignore_eos": True}, "stop_token_ids": {"stop_token_ids": [3]},
        "include_stop_str_in_output": {"include_stop_str_in_output": True},
        "skip_special_tokens": {"skip_special_tokens": False},
        "spaces_between_special_tokens": {"spaces_between_special_tokens": True},
        "truncate_prompt_tokens": {"truncate_prompt_tokens": 3},
        "prompt_logprobs": {"prompt_logprobs": 1},
        "allowed_token_ids": {"allowed_token_ids": [5, 6]},
        "bad_words": {"bad_words": ["hello"]},
        "return_token_ids": {"return_token_ids": True},
        "request_id": {"request_id": "client-id-1"},
        "add_special_tokens": {"add_special_tokens": True},
        "cache_salt": {"cache_salt": "tenant-a"},
        "response_format": {"response_format": {"type": "json_object"}},
        "guided_json": {"guided_json": {"type": "object"}},
        "guided_regex": {"guided_regex": "a+"}, "guided_choice": {"guided_choice": ["a"]},
        "guided_grammar": {"guided_grammar": 'root ::= "a"'},
        "guided_decoding_backend": {"guided_decoding_backend": "guidance"},
        "structured_outputs": {"structured_outputs": {"choice": ["a"]}},
    },
    CHAT: {
        "messages": {"messages": MESSAGES}, "logprobs": {"logprobs": True},
        "max_completion_tokens": {"max_completion_tokens": 3},
        "top_logprobs": {"logprobs": True, "top_logprobs": 2},
        "return_tokens_as_token_ids": {"logprobs": True, "return_tokens_as_token_ids": True},
        "metadata": {"metadata": {"k": "v"}}, "store": {"store": True},
        "service_tier": {"service_tier": "default"}, "prompt_cache_key": {"prompt_cache_key": "k"},
        "safety_identifier": {"safety_identifier": "s"},
        "prediction": {"prediction": {"type": "content", "content": "x"}},
        "parallel_tool_calls": {"parallel_tool_calls": False},
        "add_generation_prompt": {"add_generation_prompt": False},
        "continue_final_message": {"continue_final_message": True, "messages": [
            *MESSAGES, {"role": "assistant", "content": ASSISTANT_START}]},
        "chat_template_kwargs": {"chat_template_kwargs": {"unused_variable": 1}},
        "documents": {"documents": [{"title": "t", "text": "x"}]},
        "include_reasoning": {"include_reasoning": False},
        # the tiny model's template shows no tool format: "auto" would be a 400 (no parser)
        "tools": {"tools": [TOOL], "tool_choice": "required"},
        "tool_choice": {"tools": [TOOL], "tool_choice": {"type": "function",
                                                         "function": {"name": "f"}}},
        "functions": {"functions": [TOOL["function"]], "function_call": {"name": "f"}},
        "function_call": {"functions": [TOOL["function"]], "function_call": {"name": "f"}},
    },
    COMPLETIONS: {
        "prompt": {"prompt": "hello"}, "logprobs": {"logprobs": 2},
        "return_tokens_as_token_ids": {"logprobs": 1, "return_tokens_as_token_ids": True},
        "best_of": {"best_of": 2, "n": 2},
    },
}
REFUSED_SAMPLES: dict[str, object] = {
    "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
    "reasoning_effort": "low",
    "verbosity": "low", "web_search_options": {}, "suffix": "tail", "use_beam_search": True,
    "length_penalty": 0.5, "priority": 1, "logits_processors": ["x"], "vllm_xargs": {"a": 1},
    "kv_transfer_params": {"a": 1}, "guided_whitespace_pattern": " ",
    "structural_tag": {"type": "structural_tag"},
    "prompt_embeds": "AAAA", "mm_processor_kwargs": {"a": 1},
}
# served, but off unless the server allows it: its own tests below run on such a server
NEEDS_SERVER_FLAG = {"chat_template": "trust_request_chat_template"}
PATHS = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions"}
BASE_BODIES: dict[str, dict[str, object]] = {
    CHAT: {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2},
    COMPLETIONS: {"model": MODEL_NAME, "prompt": "Paged attention", "max_tokens": 2},
}


def _post(server: RunningServer, endpoint: str, **fields: object) -> httpx.Response:
    body = {**BASE_BODIES[endpoint], **fields}
    return server.http().post(PATHS[endpoint], json=body)


def _served_sample(endpoint: str, name: str) -> dict[str, object]:
    return SERVED_SAMPLES[endpoint].get(name) or SERVED_SAMPLES["common"][name]


# ---------------------------------------------------------------- the table


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_every_field_has_a_sample(endpoint: str) -> None:
    for name, spec in fields_for(endpoint).items():
        if spec.support is Support.REFUSED:
            assert name in REFUSED_SAMPLES, name
        elif name not in NEEDS_SERVER_FLAG:
            assert _served_sample(endpoint, name), name


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_field_table(server: RunningServer, endpoint: str,
                     caplog: pytest.LogCaptureFixture) -> None:
    """Each served field works (200, no unknown-field warning); each refused one asking for
    something is a 400 naming it, and is accepted in its neutral value."""
    failures = []
    with caplog.at_level(logging.WARNING, logger="server.protocol"):
        for name, spec in fields_for(endpoint).items():
            if name in NEEDS_SERVER_FLAG:
                response = _post(server, endpoint, **{name: CUSTOM_TEMPLATE})
                if response.status_code != 400 or response.json()["error"]["param"] != name:
                    failures.append((name, response.status_code, response.text[:200]))
                continue
            if spec.support is Support.REFUSED:
                response = _post(server, endpoint, **{name: REFUSED_SAMPLES[name]})
                error = response.json().get("error", {})
                if (response.status_code != 400 or error.get("param") != name
                        or error.get("code") != "unsupported_field"):
                    failures.append((name, response.status_code, response.text[:200]))
                response = _post(server, endpoint, **{name: None})
            else:
                response = _post(server, endpoint, **_served_sample(endpoint, name))
            if response.status_code != 200:
                failures.append((name, response.status_code, response.text[:200]))
    assert not failures
    assert not [r for r in caplog.records if "unknown to the OpenAI and vLLM" in r.message]


def test_made_up_fields_succeed_with_one_warning(server: RunningServer,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.protocol"):
        response = _post(server, CHAT, frobnicate=True, zorp={"a": 1})
    assert response.status_code == 200
    warnings = [r.message for r in caplog.records if "unknown to the OpenAI and vLLM" in r.message]
    assert warnings == ["chat request: ignoring fields unknown to the OpenAI and vLLM APIs: "
                        "frobnicate, zorp"]


def test_refused_fields_refuse_through_the_sdk(server: RunningServer) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                reasoning_effort="low")
    assert info.value.body["param"] == "reasoning_effort"  # type: ignore[index]


def test_reasoning_content_and_include_reasoning(tiny_llama_dir: Path) -> None:
    """--reasoning-parser qwen3: <think>...</think> goes to reasoning_content (a grammar makes
    the random model write it), the rest to content; include_reasoning false leaves it out."""
    regex = {"guided_regex": "<think>[a-z]{4}</think>[a-z]{3}"}
    with serve(tiny_llama_dir, {"reasoning_parser": "qwen3"}) as reasoning_server:
        body = {**BASE_BODIES[CHAT], "max_tokens": 40, "temperature": 0.0, **regex}
        message = reasoning_server.http().post(PATHS[CHAT], json=body).json()[
            "choices"][0]["message"]
        assert re.fullmatch("[a-z]{4}", message["reasoning_content"])
        assert re.fullmatch("[a-z]{3}", message["content"])
        hidden = reasoning_server.http().post(
            PATHS[CHAT], json={**body, "include_reasoning": False}).json()["choices"][0]
        assert "reasoning_content" not in hidden["message"]
        assert hidden["message"]["content"] == message["content"]
        stream = reasoning_server.client().chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=40, stream=True, temperature=0.0,
            extra_body=regex)
        reasoning, content = "", ""
        for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += (delta.content or "") if delta is not None else ""
        assert (reasoning, content) == (message["reasoning_content"], message["content"])


# ---------------------------------------------------------------- API odds and ends


def test_strings_are_not_numbers(server: RunningServer) -> None:
    response = _post(server, COMPLETIONS, max_tokens="10")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_tokens"


def test_stream_options_need_stream(server: RunningServer) -> None:
    response = _post(server, CHAT, stream_options={"include_usage": True})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream_options"


def test_completions_default_to_16_tokens(server: RunningServer) -> None:
    body = {key: value for key, value in BASE_BODIES[COMPLETIONS].items() if key != "max_tokens"}
    response = server.http().post("/v1/completions", json={**body, **GREEDY})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 16


def test_max_completion_tokens_wins_over_max_tokens(server: RunningServer) -> None:
    response = server.client().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=9, max_completion_tokens=4,
        temperature=0.0, extra_body={"ignore_eos": True})
    assert response.usage is not None and response.usage.completion_tokens == 4


def test_request_id_names_the_response(server: RunningServer) -> None:
    for _ in range(2):  # a reused id is still a fine request
        response = server.client().chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=2,
            extra_body={"request_id": "client-42"})
        assert response.id == "chatcmpl-client-42"


# ---------------------------------------------------------------- sampling fields


def test_allowed_token_ids(server: RunningServer) -> None:
    allowed = [7, 11, 13, 17, 19]
    response = server.client().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=1.0,
        extra_body={"allowed_token_ids": allowed, "ignore_eos": True, "return_token_ids": True})
    token_ids = response.choices[0].model_extra["token_ids"]  # type: ignore[index]
    assert len(token_ids) == 24 and set(token_ids) <= set(allowed)
    assert len(set(token_ids)) > 1  # sampled, not one forced token


def test_bad_words(server: RunningServer, tokenizer: transformers.PreTrainedTokenizerBase
                   ) -> None:
    client = server.client()
    plain = client.completions.create(model=MODEL_NAME, prompt="Paged attention", max_tokens=12,
                                      temperature=0.0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    token_ids = plain.choices[0].model_extra["token_ids"]  # type: ignore[index]
    # a word the greedy output produces whose text tokenizes back to that same token
    word, token_id = next((text.strip(), token) for token in token_ids
                          if (text := tokenizer.decode([token])).strip()
                          and token in _word_token_ids(tokenizer, text.strip()))
    banned = client.completions.create(model=MODEL_NAME, prompt="Paged attention",
                                       max_tokens=12, temperature=0.0,
                                       extra_body={"ignore_eos": True, "return_token_ids": True,
                                                   "bad_words": [word]})
    new_ids = banned.choices[0].model_extra["token_ids"]  # type: ignore[index]
    assert token_id in token_ids and token_id not in new_ids
    assert new_ids[:token_ids.index(token_id)] == token_ids[:token_ids.index(token_id)]


def _word_token_ids(tokenizer: transformers.PreTrainedTokenizerBase, word: str) -> set[int]:
    """Single-token spellings of `word`, with and without a leading space."""
    spellings = [tokenizer.encode(text, add_special_tokens=False) for text in (word, " " + word)]
    return {ids[0] for ids in spellings if len(ids) == 1}


def test_truncate_prompt_tokens(server: RunningServer,
                                tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    client = server.client()
    text = "Paged attention stores keys and values in fixed-size blocks. " * 60
    ids = tokenizer.encode(text)
    assert len(ids) > server.engine.max_model_len  # refused whole, served truncated
    truncated = client.completions.create(model=MODEL_NAME, prompt=text, max_tokens=6,
                                          extra_body={**GREEDY, "truncate_prompt_tokens": 100})
    assert truncated.usage is not None and truncated.usage.prompt_tokens == 100
    direct = client.completions.create(model=MODEL_NAME, prompt=ids[-100:], max_tokens=6,
                                       extra_body=GREEDY)
    assert truncated.choices[0].text == direct.choices[0].text
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": text}], max_tokens=2,
        extra_body={"truncate_prompt_tokens": 50})
    assert chat.usage is not None and chat.usage.prompt_tokens == 50


def test_continuous_usage_stats(server: RunningServer) -> None:
    stream = server.client().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, stream=True, temperature=0.0,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert all(chunk.usage is not None for chunk in chunks)
    completion_counts = [chunk.usage.completion_tokens for chunk in chunks if chunk.usage]
    assert completion_counts == sorted(completion_counts) and completion_counts[-1] == 8
    assert completion_counts[0] == 0  # the role chunk: nothing generated yet
    assert len({chunk.usage.prompt_tokens for chunk in chunks if chunk.usage}) == 1
    plain = server.client().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, stream=True,
        stream_options={"include_usage": True})
    assert [chunk.usage is not None for chunk in plain][-1:] == [True]


# ---------------------------------------------------------------- chat-template controls


def test_continue_final_message(server: RunningServer,
                                tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": ASSISTANT_START}]
    client = server.client()
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=6,  # type: ignore[arg-type]
        extra_body={**GREEDY, "continue_final_message": True, "echo": True})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                           continue_final_message=True)
    assert str(prompt).endswith(ASSISTANT_START)  # no end-of-turn after the last message
    reference = client.completions.create(
        model=MODEL_NAME, prompt=tokenizer.encode(str(prompt), add_special_tokens=False),
        max_tokens=6, extra_body=GREEDY)
    content = response.choices[0].message.content or ""
    assert content == ASSISTANT_START + reference.choices[0].text  # echo: one whole message
    both = server.http().post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": messages, "continue_final_message": True,
        "add_generation_prompt": True})
    assert both.status_code == 400
    assert both.json()["error"]["param"] == "continue_final_message"


@pytest.fixture(scope="module")
def trusting_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    with serve(tiny_llama_dir, {"trust_request_chat_template": True}, num_blocks=128) as running:
        yield running


def _render_custom(messages: list[dict[str, str]]) -> str:
    return "".join(f"[{m['role']}] {m['content']}\n" for m in messages) + "[assistant]"


def test_request_chat_template(trusting_server: RunningServer,
                               tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    client = trusting_server.client()
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=6,  # type: ignore[arg-type]
        extra_body={**GREEDY, "chat_template": CUSTOM_TEMPLATE})
    prompt_ids = tokenizer.encode(_render_custom(MESSAGES), add_special_tokens=False)
    reference = client.completions.create(model=MODEL_NAME, prompt=prompt_ids, max_tokens=6,
                                          extra_body=GREEDY)
    assert response.usage is not None and response.usage.prompt_tokens == len(prompt_ids)
    assert response.choices[0].message.content == reference.choices[0].text
    # the sandbox holds: a template cannot reach Python internals
    escape = trusting_server.http().post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 2,
        "chat_template": "{{ messages.__class__.__mro__[1].__subclasses__() }}"})
    assert escape.status_code == 400 and escape.json()["error"]["param"] == "chat_template"
    broken = trusting_server.http().post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": MESSAGES, "chat_template": "{% for %}"})
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "chat_template"


def test_server_chat_template_file(tiny_llama_dir: Path, tmp_path: Path,
                                   tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    template = tmp_path / "template.jinja"
    template.write_text(CUSTOM_TEMPLATE, encoding="utf-8")
    with serve(tiny_llama_dir, {"chat_template": str(template)}, num_blocks=64) as running:
        response = running.client().chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
        tokenized = running.http().post("/tokenize", json={"model": MODEL_NAME,
                                                           "messages": MESSAGES})
    prompt_ids = tokenizer.encode(_render_custom(MESSAGES), add_special_tokens=False)
    assert response.usage is not None and response.usage.prompt_tokens == len(prompt_ids)
    assert tokenized.json()["tokens"] == prompt_ids


# ---------------------------------------------------------------- prompt logprobs


@pytest.fixture(scope="module")
def tokenizer(server: RunningServer) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(server.model_dir)


@pytest.fixture(scope="module")
def reference_logprobs(server: RunningServer) -> torch.Tensor:
    """transformers' log-softmax at every position of PROMPT_IDS (fp32)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(server.model_dir,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT_IDS])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


PROMPT_IDS = [40, 71, 5, 300, 12, 99, 150, 7, 61, 250, 33, 18, 44, 400, 2, 90, 91, 9]


def test_prompt_logprobs_match_transformers(server: RunningServer,
                                            reference_logprobs: torch.Tensor) -> None:
    response = server.http().post("/v1/completions", json={
        "model": MODEL_NAME, "prompt": PROMPT_IDS, "max_tokens": 1, "prompt_logprobs": 3})
    assert response.status_code == 200, response.text
    entries = response.json()["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(PROMPT_IDS) and entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        expected = reference_logprobs[position - 1]
        own = entry[str(PROMPT_IDS[position])]
        assert own["logprob"] == pytest.approx(float(expected[PROMPT_IDS[position]]), abs=1e-3)
        assert own["rank"] == int((expected > expected[PROMPT_IDS[position]]).sum()) + 1
        top_ids = expected.topk(3).indices.tolist()
        ranked = sorted((v["rank"], int(k)) for k, v in entry.items() if v["rank"] <= 3)
        assert [token for _, token in ranked] == top_ids
    chat = server.client().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=1, extra_body={"prompt_logprobs": 0})
    chat_entries = chat.model_extra["prompt_logprobs"]  # type: ignore[index]
    assert chat.usage is not None and len(chat_entries) == chat.usage.prompt_tokens
    streamed = server.http().post("/v1/completions", json={
        "model": MODEL_NAME, "prompt": PROMPT_IDS, "stream": True, "prompt_logprobs": 1})
    assert streamed.status_code == 400
    assert streamed.json()["error"]["param"] == "prompt_logprobs"


def test_echo_with_logprobs_in_the_legacy_format(server: RunningServer,
                                                 reference_logprobs: torch.Tensor) -> None:
    client = server.client()
    echoed = client.completions.create(model=MODEL_NAME, prompt=PROMPT_IDS, max_tokens=3,
                                       echo=True, logprobs=2, extra_body=GREEDY)
    logprobs = echoed.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert len(logprobs.tokens) == len(PROMPT_IDS) + 3
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for position in range(1, len(PROMPT_IDS)):
        expected = float(reference_logprobs[position - 1, PROMPT_IDS[position]])
        assert logprobs.token_logprobs[position] == pytest.approx(expected, abs=1e-3)
        assert 2 <= len(logprobs.top_logprobs[position] or {}) <= 3
    offsets = logprobs.text_offset or []
    assert offsets == sorted(offsets) and offsets[0] == 0
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT_IDS, max_tokens=3,
                                      logprobs=2, extra_body=GREEDY)
    assert plain.choices[0].logprobs is not None
    # the same tokens; logprobs equal up to the batch shape's rounding
    assert logprobs.tokens[-3:] == plain.choices[0].logprobs.tokens
    assert logprobs.token_logprobs[-3:] == pytest.approx(
        plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT_IDS, max_tokens=3,
                                       echo=True, logprobs=2, stream=True, extra_body=GREEDY)
    streamed_logprobs: list[float | None] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed_logprobs += chunk.choices[0].logprobs.token_logprobs or []
    assert streamed_logprobs == logprobs.token_logprobs


def test_return_tokens_as_token_ids(server: RunningServer) -> None:
    response = server.client().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2,
        extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    token_ids = response.choices[0].model_extra["token_ids"]  # type: ignore[index]
    assert content is not None
    assert [entry.token for entry in content] == [f"token_id:{t}" for t in token_ids]
    assert all(top.token.startswith("token_id:") for e in content for top in e.top_logprobs)
    assert response.model_extra["prompt_token_ids"]  # type: ignore[index]


# ---------------------------------------------------------------- --seed


def _unseeded_texts(base_url: str) -> list[str]:
    texts = []
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as client:
        for prompt in ("Paged attention", "The quick brown fox", "def fibonacci(n):"):
            response = client.post("/v1/completions", json={
                "model": MODEL_NAME, "prompt": prompt, "max_tokens": 24, "temperature": 1.0,
                "ignore_eos": True})
            assert response.status_code == 200, response.text
            texts.append(json.dumps(response.json()["choices"][0]["text"]))
    return texts


def test_server_seed_makes_unseeded_requests_repeat(tiny_llama_dir: Path,
                                                    tmp_path: Path) -> None:
    runs = {}
    for name, args in (("seeded-a", ("--seed", "7")), ("seeded-b", ("--seed", "7")),
                       ("fresh-a", ()), ("fresh-b", ())):
        with serve_process(tiny_llama_dir, tmp_path / f"{name}.log", *args) as running:
            runs[name] = _unseeded_texts(running.base_url)
    assert runs["seeded-a"] == runs["seeded-b"]
    assert runs["fresh-a"] != runs["fresh-b"]
    assert runs["seeded-a"] != runs["fresh-a"]


def test_cache_salt_isolates_the_prefix_cache(server: RunningServer) -> None:
    prompt = [(7 * i + 3) % 400 + 20 for i in range(80)]  # five full blocks

    def cached_tokens(**fields: object) -> int:
        response = server.http().post("/v1/completions", json={
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": 1, **fields})
        assert response.status_code == 200, response.text
        return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert cached_tokens(cache_salt="tenant-a") == 0
    assert cached_tokens(cache_salt="tenant-a") >= 64  # the same tenant shares its prefix
    assert cached_tokens(cache_salt="tenant-b") == 0  # another tenant does not see it
    assert cached_tokens() == 0  # nor does a request without a salt
    assert cached_tokens() >= 64


# ---------------------------------------------------------------- fields tested nowhere else


def _choice(response: httpx.Response) -> dict[str, object]:
    assert response.status_code == 200, response.text
    choice: dict[str, object] = response.json()["choices"][0]
    return choice


def _text(choice: dict[str, object]) -> str:
    message = choice.get("message")
    return str(message["content"] if isinstance(message, dict) else choice["text"])


def test_model_is_the_served_name(server: RunningServer) -> None:
    for endpoint in (CHAT, COMPLETIONS):
        named = _post(server, endpoint)
        assert named.status_code == 200 and named.json()["model"] == MODEL_NAME
        unnamed_body = {k: v for k, v in BASE_BODIES[endpoint].items() if k != "model"}
        unnamed = server.http().post(PATHS[endpoint], json=unnamed_body)
        assert unnamed.status_code == 200 and unnamed.json()["model"] == MODEL_NAME
        other = _post(server, endpoint, model="gpt-4o")
        assert other.status_code == 404
        assert other.json()["error"]["param"] == "model"
        assert other.json()["error"]["code"] == "model_not_found"


def test_max_tokens_caps_the_completion(server: RunningServer) -> None:
    """The first max_tokens tokens of a longer answer, finishing with "length". (The defaults
    are tested apart: test_completions_default_to_16_tokens, and for chat
    test_openai_api.py::test_chat_max_tokens_absent_runs_to_context_limit.)"""
    for endpoint in (CHAT, COMPLETIONS):
        long = _choice(_post(server, endpoint, max_tokens=9, return_token_ids=True, **GREEDY))
        short_response = _post(server, endpoint, max_tokens=4, return_token_ids=True, **GREEDY)
        short = _choice(short_response)
        assert short_response.json()["usage"]["completion_tokens"] == 4
        assert short["finish_reason"] == "length"
        assert short["token_ids"] == long["token_ids"][:4]  # type: ignore[index]


def test_echo_on_both_endpoints(server: RunningServer,
                                tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """Chat (vLLM): a last assistant message is sent first, also without
    continue_final_message (the template then closes it and opens a new turn); completions:
    the prompt is sent first."""
    client = server.client()
    messages = [*MESSAGES, {"role": "assistant", "content": ASSISTANT_START}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    reference = client.completions.create(
        model=MODEL_NAME, prompt=tokenizer.encode(str(prompt), add_special_tokens=False),
        max_tokens=6, extra_body=GREEDY).choices[0].text
    echoed = _choice(_post(server, CHAT, messages=messages, max_tokens=6, echo=True, **GREEDY))
    assert _text(echoed) == ASSISTANT_START + reference
    plain = _choice(_post(server, CHAT, messages=messages, max_tokens=6, **GREEDY))
    assert _text(plain) == reference
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=6, stream=True,  # type: ignore[arg-type]
        extra_body={**GREEDY, "echo": True})
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]  # type: ignore[union-attr]
    assert ASSISTANT_START in deltas[:2] and "".join(deltas) == _text(echoed)
    # the last message is the user's: nothing to echo
    user_last = _choice(_post(server, CHAT, max_tokens=4, echo=True, **GREEDY))
    assert _text(user_last) == _text(_choice(_post(server, CHAT, max_tokens=4, **GREEDY)))
    completion = _choice(_post(server, COMPLETIONS, max_tokens=4, echo=True, **GREEDY))
    bare = _choice(_post(server, COMPLETIONS, max_tokens=4, **GREEDY))
    assert _text(completion) == str(BASE_BODIES[COMPLETIONS]["prompt"]) + _text(bare)


def test_best_of_equal_to_n(server: RunningServer) -> None:
    sampled = {"temperature": 1.0, "seed": 5, "ignore_eos": True, "max_tokens": 6, "n": 2}
    with_best_of = _post(server, COMPLETIONS, best_of=2, **sampled)
    without = _post(server, COMPLETIONS, **sampled)
    assert with_best_of.status_code == 200, with_best_of.text
    texts = [choice["text"] for choice in with_best_of.json()["choices"]]
    assert len(texts) == 2 and texts == [c["text"] for c in without.json()["choices"]]
    refused = _post(server, COMPLETIONS, best_of=3, n=2)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "best_of"


def test_special_tokens_in_the_text(server: RunningServer) -> None:
    """skip_special_tokens and spaces_between_special_tokens through the server: an answer of
    three <|im_end|> tokens (forced by logit_bias, generated through by ignore_eos)."""
    eos = "<|im_end|>"
    forced = {"max_tokens": 3, "logit_bias": {"2": 100}, "return_token_ids": True, **GREEDY}
    # spaced as in a full decode of prompt and answer: both prompts end in plain text, which
    # the first special token is set apart from too
    spaced = f" {eos} {eos} {eos}"
    cases = [({}, ""), ({"skip_special_tokens": False}, eos * 3),
             ({"skip_special_tokens": False, "spaces_between_special_tokens": True}, spaced),
             ({"spaces_between_special_tokens": True}, "")]  # nothing kept, nothing spaced
    for endpoint in (CHAT, COMPLETIONS):
        for fields, expected in cases:
            choice = _choice(_post(server, endpoint, **forced, **fields))
            assert choice["token_ids"] == [2, 2, 2]
            assert _text(choice) == expected, (endpoint, fields)
    stream = server.client().completions.create(
        model=MODEL_NAME, prompt="Paged attention", max_tokens=3, stream=True,
        extra_body={**forced, "skip_special_tokens": False,
                    "spaces_between_special_tokens": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == spaced


def test_return_token_ids(server: RunningServer,
                          tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    completion = _post(server, COMPLETIONS, max_tokens=5, return_token_ids=True, **GREEDY)
    choice = _choice(completion)
    assert choice["prompt_token_ids"] == tokenizer.encode(str(BASE_BODIES[COMPLETIONS]["prompt"]))
    token_ids = choice["token_ids"]
    assert isinstance(token_ids, list) and len(token_ids) == 5
    assert tokenizer.decode(token_ids, skip_special_tokens=True) == choice["text"]
    chat = _post(server, CHAT, max_tokens=5, return_token_ids=True, **GREEDY)
    tokenized = server.http().post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert chat.json()["prompt_token_ids"] == tokenized
    chat_ids = _choice(chat)["token_ids"]
    assert isinstance(chat_ids, list) and len(chat_ids) == 5
    assert tokenizer.decode(chat_ids, skip_special_tokens=True) == _text(_choice(chat))
    # not asked, not sent
    for endpoint in (CHAT, COMPLETIONS):
        response = _post(server, endpoint, max_tokens=2)
        assert "prompt_token_ids" not in response.json()
        assert not {"token_ids", "prompt_token_ids"} & set(_choice(response))


def _with_bos_token(model_dir: Path, into: Path) -> Path:
    """A copy of the tiny checkpoint whose tokenizer puts <|endoftext|> (id 0) before every
    text it encodes with special tokens, as Llama's BOS: the tiny tokenizer adds none, so
    add_special_tokens could not show anything there."""
    shutil.copytree(model_dir, into)
    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                      special_tokens=[("<|endoftext|>", 0)])])
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.save_pretrained(into)
    return into


def test_add_special_tokens(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Completions add the tokenizer's special tokens by default; chat does not (the template
    writes its own), unless asked."""
    model_dir = _with_bos_token(tiny_llama_dir, tmp_path / "bos-llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    text = str(BASE_BODIES[COMPLETIONS]["prompt"])
    bare_ids = tokenizer.encode(text, add_special_tokens=False)
    chat_text = str(tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                                  add_generation_prompt=True))
    chat_ids = tokenizer.encode(chat_text, add_special_tokens=False)
    assert tokenizer.encode(text) == [0, *bare_ids]  # the copy really has a BOS
    with serve(model_dir, num_blocks=64) as running:
        def prompt_ids(endpoint: str, **fields: object) -> list[int]:
            response = _post(running, endpoint, return_token_ids=True, **fields)
            assert response.status_code == 200, response.text
            body = response.json()
            ids = body["prompt_token_ids"] if endpoint == CHAT else body["choices"][0][
                "prompt_token_ids"]
            assert body["usage"]["prompt_tokens"] == len(ids)
            return list(ids)

        assert prompt_ids(COMPLETIONS) == [0, *bare_ids]
        assert prompt_ids(COMPLETIONS, add_special_tokens=False) == bare_ids
        assert prompt_ids(CHAT) == chat_ids
        assert prompt_ids(CHAT, add_special_tokens=True) == [0, *chat_ids]


def _greedy_reference(server: RunningServer, prompt_ids: list[int], num_tokens: int) -> str:
    return server.client().completions.create(model=MODEL_NAME, prompt=prompt_ids,
                                              max_tokens=num_tokens,
                                              extra_body=GREEDY).choices[0].text


def test_add_generation_prompt(server: RunningServer,
                               tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    def template_ids(add_generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        return list(tokenizer.encode(str(text), add_special_tokens=False))

    with_prompt, without = template_ids(True), template_ids(False)
    assert with_prompt[:len(without)] == without and len(with_prompt) > len(without)
    for flag, expected_ids in ((True, with_prompt), (False, without)):
        response = _post(server, CHAT, max_tokens=6, add_generation_prompt=flag,
                         return_token_ids=True, **GREEDY)
        assert response.json()["prompt_token_ids"] == expected_ids
        assert _text(_choice(response)) == _greedy_reference(server, expected_ids, 6)


PERSONA_TEMPLATE = "{% if persona %}[system] {{ persona }}\n{% endif %}" + CUSTOM_TEMPLATE
DOCUMENTS_TEMPLATE = ("{% if documents %}{% for d in documents %}[document] {{ d['title'] }}: "
                      "{{ d['text'] }}\n{% endfor %}{% endif %}" + CUSTOM_TEMPLATE)


def _templated(server: RunningServer, tokenizer: transformers.PreTrainedTokenizerBase,
               rendered: str, **fields: object) -> None:
    """A chat request with these template fields reads `rendered` as its prompt: the same
    prompt tokens, and the same greedy answer as completions on them."""
    prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
    response = _post(server, CHAT, max_tokens=6, return_token_ids=True, **GREEDY, **fields)
    assert response.status_code == 200, response.text
    assert response.json()["prompt_token_ids"] == prompt_ids
    assert response.json()["usage"]["prompt_tokens"] == len(prompt_ids)
    assert _text(_choice(response)) == _greedy_reference(server, prompt_ids, 6)


def test_chat_template_kwargs(trusting_server: RunningServer,
                              tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    _templated(trusting_server, tokenizer, "[system] be terse\n" + _render_custom(MESSAGES),
               chat_template=PERSONA_TEMPLATE, chat_template_kwargs={"persona": "be terse"})
    _templated(trusting_server, tokenizer, _render_custom(MESSAGES),
               chat_template=PERSONA_TEMPLATE)


def test_documents(trusting_server: RunningServer,
                   tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    documents = [{"title": "Paging", "text": "blocks hold 16 tokens"},
                 {"title": "Batching", "text": "requests join every step"}]
    rendered = ("[document] Paging: blocks hold 16 tokens\n"
                "[document] Batching: requests join every step\n" + _render_custom(MESSAGES))
    _templated(trusting_server, tokenizer, rendered, chat_template=DOCUMENTS_TEMPLATE,
               documents=documents)
    _templated(trusting_server, tokenizer, _render_custom(MESSAGES),
               chat_template=DOCUMENTS_TEMPLATE)


# ---------------------------------------------------------------- each served field's own test

# every SUPPORTED field (server/fields.py) → the test that shows it changing the answer as its
# note says; a test here must exercise the effect, not just send the field
_UNIT = "tests/unit"
_API = "tests/integration/test_openai_api.py"
_HERE = "tests/integration/test_request_fields.py"
_STRUCTURED = "tests/integration/test_structured_outputs.py"
_TOOLS = "tests/integration/test_tools.py"
BEHAVIOUR_TESTS: dict[str, str] = {
    "model": f"{_HERE}::test_model_is_the_served_name",
    "frequency_penalty":
        f"{_UNIT}/test_sampler.py::test_frequency_and_presence_penalties_match_openai_formula",
    "presence_penalty":
        f"{_UNIT}/test_sampler.py::test_frequency_and_presence_penalties_match_openai_formula",
    "logit_bias": f"{_UNIT}/test_sampler.py::test_logit_bias_forces_a_token",
    "logprobs": f"{_API}::test_completion_echo_and_logprobs",
    "max_tokens": f"{_HERE}::test_max_tokens_caps_the_completion",
    "n": f"{_API}::test_completion_several_prompts_and_n",
    "seed": f"{_API}::test_chat_n2_indexes_and_seed",
    "stop": f"{_API}::test_chat_stop_string_excluded",
    "stream": f"{_API}::test_chat_stream_equals_non_stream",
    "stream_options": f"{_HERE}::test_continuous_usage_stats",
    "temperature": f"{_UNIT}/test_sampler.py::test_temperature_sampling_matches_softmax",
    "top_p": f"{_UNIT}/test_sampler.py::test_top_p_keeps_smallest_nucleus",
    "messages": f"{_API}::test_chat_greedy_matches_transformers",
    "max_completion_tokens": f"{_HERE}::test_max_completion_tokens_wins_over_max_tokens",
    "top_logprobs": f"{_API}::test_chat_greedy_matches_transformers",
    "prompt": f"{_API}::test_completion_greedy_matches_transformers_and_stream",
    "echo": f"{_HERE}::test_echo_on_both_endpoints",
    "best_of": f"{_HERE}::test_best_of_equal_to_n",
    "top_k": f"{_UNIT}/test_sampler.py::test_filtered_sampling_follows_renormalised_distribution",
    "min_p": f"{_UNIT}/test_sampler.py::test_min_p_sampling_never_picks_dropped_tokens",
    "repetition_penalty": f"{_UNIT}/test_sampler.py::test_repetition_penalty_matches_reference",
    "min_tokens": f"{_UNIT}/test_llm.py::test_stop_token_ids_max_tokens_and_min_tokens",
    "ignore_eos": f"{_UNIT}/test_llm.py::test_eos_stops_unless_ignored",
    "stop_token_ids": f"{_UNIT}/test_llm.py::test_stop_token_ids_max_tokens_and_min_tokens",
    "include_stop_str_in_output":
        f"{_UNIT}/test_llm.py::test_stop_string_spanning_tokens_is_excluded",
    "skip_special_tokens": f"{_HERE}::test_special_tokens_in_the_text",
    "spaces_between_special_tokens": f"{_HERE}::test_special_tokens_in_the_text",
    "truncate_prompt_tokens": f"{_HERE}::test_truncate_prompt_tokens",
    "prompt_logprobs": f"{_HERE}::test_prompt_logprobs_match_transformers",
    "allowed_token_ids": f"{_HERE}::test_allowed_token_ids",
    "bad_words": f"{_HERE}::test_bad_words",
    "return_tokens_as_token_ids": f"{_HERE}::test_return_tokens_as_token_ids",
    "return_token_ids": f"{_HERE}::test_return_token_ids",
    "request_id": f"{_HERE}::test_request_id_names_the_response",
    "add_special_tokens": f"{_HERE}::test_add_special_tokens",
    "cache_salt": f"{_HERE}::test_cache_salt_isolates_the_prefix_cache",
    "add_generation_prompt": f"{_HERE}::test_add_generation_prompt",
    "continue_final_message": f"{_HERE}::test_continue_final_message",
    "chat_template": f"{_HERE}::test_request_chat_template",
    "chat_template_kwargs": f"{_HERE}::test_chat_template_kwargs",
    "documents": f"{_HERE}::test_documents",
    "include_reasoning": f"{_HERE}::test_reasoning_content_and_include_reasoning",
    "response_format": f"{_STRUCTURED}::test_every_drawn_schema_is_followed",
    "guided_json": f"{_STRUCTURED}::test_guided_json_as_object_and_as_string",
    "guided_regex": f"{_STRUCTURED}::test_guided_regex_and_grammar",
    "guided_grammar": f"{_STRUCTURED}::test_guided_regex_and_grammar",
    "guided_choice": f"{_STRUCTURED}::test_guided_choice",
    "structured_outputs": f"{_STRUCTURED}::test_structured_outputs_object",
    "tools": f"{_TOOLS}::test_forced_calls_are_valid_tool_calls",
    "tool_choice": f"{_TOOLS}::test_forced_calls_are_valid_tool_calls",
    "parallel_tool_calls": f"{_TOOLS}::test_forced_calls_are_valid_tool_calls",
    "functions": f"{_TOOLS}::test_legacy_functions_behave_like_tools",
    "function_call": f"{_TOOLS}::test_legacy_functions_behave_like_tools",
}


def test_every_served_field_has_a_behaviour_test() -> None:
    served = {spec.name for spec in FIELDS if spec.support is Support.SUPPORTED}
    assert set(BEHAVIOUR_TESTS) == served
    missing = []
    for name, reference in BEHAVIOUR_TESTS.items():
        path, _, test_name = reference.partition("::")
        source = REPO / path
        # a top-level test function of that name (read as text: test modules are not imported)
        pattern = rf"^(async )?def {re.escape(test_name)}\("
        if (not path.startswith("tests/") or not test_name.startswith("test_")
                or not source.is_file()
                or not re.search(pattern, source.read_text(encoding="utf-8"), re.MULTILINE)):
            missing.append((name, reference))
    assert not missing

"""Acceptance 3: every bad request gets the right status and the OpenAI error envelope, and the
server is none the worse for it (a normal request succeeds, no KV block stays held)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import API_KEY, MAX_BODY_BYTES, MODEL_NAME, RunningServer, serve

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat(**fields: object) -> dict[str, object]:
    return {"model": MODEL_NAME, "messages": MESSAGES, **fields}


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    path: str = CHAT
    body: object = None  # JSON-encoded unless bytes
    param: str | None = None
    code: str | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    message_has: str = ""


LONG_PROMPT = "hello " * 200_000  # far more tokens than the 512-token context

CASES = [
    Case("malformed json", 400, body=b'{"model": "tiny-llama", "messages": [', code="invalid_json"),
    Case("non-utf8 body", 400, body=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
         message_has="UTF-8"),
    Case("not json at all", 400, body=b"hello", headers={"Content-Type": "text/plain"}),
    Case("json without content type", 400, body=b'{"prompt": "x"}', path=COMPLETIONS,
         headers={"Content-Type": "application/x-www-form-urlencoded"},
         message_has="Content-Type: application/json"),
    Case("json array body", 400, body=[1, 2], message_has="JSON object"),
    Case("missing messages", 400, body={"model": MODEL_NAME}, param="messages"),
    Case("empty messages", 400, body=chat(messages=[]), param="messages"),
    Case("bad role", 400, body=chat(messages=[{"role": "wizard", "content": "x"}]),
         param="messages[0].role"),
    Case("image content", 400, body=chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), param="messages[0].content"),
    Case("temperature -1", 400, body=chat(temperature=-1), param="temperature"),
    Case("top_p 2", 400, body=chat(top_p=2), param="top_p"),
    Case("n 0", 400, body=chat(n=0), param="n"),
    Case("n 1000", 400, body=chat(n=1000), param="n"),
    Case("max_tokens -5", 400, body=chat(max_tokens=-5), param="max_tokens"),
    Case("top_logprobs 50", 400, body=chat(logprobs=True, top_logprobs=50),
         param="top_logprobs"),
    Case("top_k -5", 400, body=chat(top_k=-5), param="top_k"),
    Case("logit_bias out of vocab", 400, body=chat(logit_bias={"999999": 1}),
         param="logit_bias"),
    Case("unknown model", 404, body=chat(model="gpt-9"), param="model", code="model_not_found"),
    Case("model as a path", 404, body=chat(model="../../etc/passwd"), code="model_not_found"),
    Case("200k-token prompt", 400, body=chat(messages=[{"role": "user", "content": LONG_PROMPT}]),
         param="messages", code="context_length_exceeded",
         message_has="maximum context length is 512 tokens"),
    Case("huge max_tokens", 400, body=chat(max_tokens=1_000_000),
         code="context_length_exceeded", message_has="1000000 in the completion"),
    Case("huge max_tokens, streaming", 400, body=chat(max_tokens=1_000_000, stream=True),
         code="context_length_exceeded"),
    Case("wrong api key", 401, body=chat(), headers={"Authorization": "Bearer sk-wrong"},
         code="invalid_api_key"),
    Case("missing api key", 401, body=chat(), headers={"Authorization": ""},
         code="invalid_api_key"),
    Case("wrong key on tokenize", 401, path="/tokenize", body={"prompt": "x"},
         headers={"Authorization": "Bearer nope"}),
    Case("tokenize nothing to continue", 400, path="/tokenize",
         body={"messages": [], "continue_final_message": True}, param="continue_final_message"),
    Case("body too large", 413, body=b"x" * (MAX_BODY_BYTES + 1), code="request_too_large"),
    Case("unknown route", 404, path="/v1/nothing", body=chat()),
    Case("wrong method", 405, method="GET"),
    Case("completion suffix", 400, path=COMPLETIONS, body={"prompt": "a", "suffix": "b"},
         param="suffix"),
    Case("completion out-of-vocab ids", 400, path=COMPLETIONS, body={"prompt": [1, 10**7]},
         param="prompt"),
    Case("completion empty prompt", 400, path=COMPLETIONS, body={"prompt": []}, param="prompt"),
    Case("completion too long", 400, path=COMPLETIONS,
         body={"prompt": [5] * 600, "max_tokens": 1}, param="prompt",
         code="context_length_exceeded"),
]


def _send(http: httpx.Client, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if headers.get("Authorization") == "":
        headers.pop("Authorization")
        http.headers.pop("Authorization", None)
    if isinstance(case.body, bytes):
        headers.setdefault("Content-Type", "application/json")
        return http.request(case.method, case.path, content=case.body, headers=headers)
    if case.body is None:
        return http.request(case.method, case.path, headers=headers)
    return http.request(case.method, case.path, json=case.body, headers=headers)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request_gets_status_and_envelope(server: RunningServer, case: Case) -> None:
    response = _send(server.http(), case)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("server_error" if case.status >= 500 else "invalid_request_error")
    if case.param is not None:
        assert error["param"] == case.param
    if case.code is not None:
        assert error["code"] == case.code
    assert case.message_has in error["message"]
    assert response.headers.get("x-request-id")


def test_server_fine_after_bad_requests(server: RunningServer) -> None:
    http = server.http()
    for case in CASES:  # again, back to back, then a normal request
        _send(http, case)
    http = server.http()
    response = http.post(CHAT, json=chat(max_tokens=4, temperature=0))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    server.wait_idle()


def test_right_key_after_wrong_one(server: RunningServer) -> None:
    bare = httpx.Client(base_url=server.base_url)
    assert bare.get("/v1/models").status_code == 401
    assert bare.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}x"}).status_code \
        == 401
    ok = bare.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and json.loads(ok.text)["data"][0]["id"] == MODEL_NAME


@pytest.fixture(scope="module")
def full_queue_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    # max_queue_len=0: no request may wait, so every admission finds the queue full
    with serve(tiny_llama_dir, num_blocks=64, max_queue_len=0) as running:
        yield running


def test_queue_full_is_429_with_retry_after(full_queue_server: RunningServer) -> None:
    http = full_queue_server.http()
    for stream in (False, True):
        response = http.post(CHAT, json=chat(max_tokens=2, stream=stream))
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        full_queue_server.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                           max_tokens=2)
    full_queue_server.wait_idle()


def _validation_failures() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("pagedserve_request_failure_total",
                                      {"model_name": MODEL_NAME, "reason": "validation"})
    return value or 0.0


def test_rejected_generation_requests_are_counted(server: RunningServer) -> None:
    http = server.http()
    before = _validation_failures()
    assert http.post(CHAT, json=chat(temperature=-1)).status_code == 400  # protocol model
    assert http.post(CHAT, json=chat(max_tokens=1_000_000)).status_code == 400  # engine
    assert http.post(COMPLETIONS, json={"prompt": []}).status_code == 400
    assert http.post("/tokenize", json={}).status_code == 400  # not a generation request
    assert _validation_failures() - before == 3

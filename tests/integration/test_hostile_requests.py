"""Requests that once took down the engine or its neighbours, against a real server: a fan-out
beyond the queue, a seed beyond 64 bits, lone surrogates, non-finite floats, tiny temperatures,
a body shorter than its Content-Length, a 4 MB /tokenize. Each is refused (or served) alone:
the engine lives, other streams keep their tokens, the client's connection stays usable."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration.conftest import API_KEY, MODEL_NAME, RunningServer, poison_tokenizer, serve

WITNESS_PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]
MAX_QUEUE_LEN = 256


@pytest.fixture(scope="module")
def hostile_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    with serve(tiny_llama_dir, num_blocks=256, max_num_seqs=16, max_queue_len=MAX_QUEUE_LEN,
               server_settings={"body_read_timeout": 1.0}) as running:
        yield running


class Connection:
    """One keep-alive HTTP/1.1 connection (http.client): `sockname` shows whether a request
    went over the same socket as the one before."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                               timeout=60)

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, object]]:
        self.conn.request("POST", path, body=body, headers={
            "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    @property
    def sockname(self) -> tuple[str, int]:
        assert self.conn.sock is not None, "the server closed the connection"
        return self.conn.sock.getsockname()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.conn.close()


def _completion(prompt: object, **fields: object) -> dict[str, object]:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0.0,
            **fields}


def _witness_body() -> dict[str, object]:
    return _completion(WITNESS_PROMPT, max_tokens=48, ignore_eos=True, stream=True,
                       logprobs=0)


def _stream_tokens(server: RunningServer, body: dict[str, object]) -> list[str]:
    """The streamed completion's tokens (from logprobs: exact, not re-tokenized text)."""
    tokens: list[str] = []
    with server.http() as client, client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event
                for choice in event["choices"]:
                    tokens += (choice.get("logprobs") or {}).get("tokens", [])
    return tokens


def _assert_envelope(status: int, body: dict[str, object], expected_status: int,
                     param: str | None = None) -> dict[str, object]:
    assert status == expected_status, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, body
    if param is not None:
        assert error["param"] == param, error
    return error


def test_fan_out_beyond_the_queue_is_refused_and_the_server_serves_on(
        hostile_server: RunningServer) -> None:
    http = hostile_server.http()
    prompts = [[20 + i, 21, 22] for i in range(20)]
    refused = http.post("/v1/completions", json=_completion(prompts, n=16, max_tokens=1,
                                                             temperature=1.0))
    error = _assert_envelope(refused.status_code, refused.json(), 400, "n")
    assert "320 sequences" in str(error["message"]), error
    assert hostile_server.engine.is_alive
    # a fan-out that fits: 10 prompts x n=16, siblings deferred until each prompt is cached
    served = http.post("/v1/completions", json=_completion(prompts[:10], n=16, max_tokens=2,
                                                           temperature=1.0, seed=3))
    assert served.status_code == 200, served.text
    assert sorted(c["index"] for c in served.json()["choices"]) == list(range(160))
    assert http.get("/health").status_code == 200
    ok = http.post("/v1/completions", json=_completion([5, 6, 7]))
    assert ok.status_code == 200
    hostile_server.wait_idle()


def test_bad_seeds_are_400_and_a_neighbouring_stream_keeps_its_tokens(
        hostile_server: RunningServer) -> None:
    solo = _stream_tokens(hostile_server, _witness_body())
    assert len(solo) == 48
    beside: list[list[str]] = []
    witness = threading.Thread(target=lambda: beside.append(
        _stream_tokens(hostile_server, _witness_body())))
    witness.start()
    http = hostile_server.http()
    try:
        for seed in (2**64, 2**63, -(2**63) - 1, 10**30):
            for stream in (False, True):
                reply = http.post("/v1/completions", json=_completion(
                    [30, 31, 32], temperature=1.0, seed=seed, stream=stream))
                _assert_envelope(reply.status_code, reply.json(), 400, "seed")
                reply = http.post("/v1/chat/completions", json={
                    "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                    "seed": seed, "stream": stream, "max_tokens": 4})
                _assert_envelope(reply.status_code, reply.json(), 400, "seed")
        # the int64 extremes are fine, for every one of n siblings
        for seed in (2**63 - 1, -(2**63)):
            reply = http.post("/v1/completions", json=_completion(
                [30, 31, 32], temperature=1.0, seed=seed, n=3, max_tokens=4))
            assert reply.status_code == 200, reply.text
    finally:
        witness.join(timeout=120)
    assert beside == [solo], "the stream beside the refused requests changed its tokens"
    assert hostile_server.engine.is_alive
    hostile_server.wait_idle()


SURROGATE = "\ud800"
SURROGATE_CASES = [
    ("/v1/chat/completions", {"model": MODEL_NAME, "max_tokens": 4,
                              "messages": [{"role": "user", "content": f"hi {SURROGATE}"}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
     "messages[0].content[0].text"),
    ("/v1/completions", _completion(f"x{SURROGATE}y"), "prompt"),
    ("/v1/completions", _completion(["ok", SURROGATE]), "prompt[1]"),
    ("/v1/completions", _completion("ok", stop=[SURROGATE]), "stop[0]"),
    ("/v1/completions", {**_completion("ok"), "model": f"tiny{SURROGATE}"}, "model"),
    ("/v1/completions", {**_completion("ok"), "user": SURROGATE}, "user"),
    ("/tokenize", {"prompt": SURROGATE}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": SURROGATE}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [
        {"role": "user", "content": "hi"}], "chat_template_kwargs": {SURROGATE: 1}},
     f"chat_template_kwargs.{SURROGATE}"),
]


def test_lone_surrogates_are_400_and_the_connection_stays_usable(
        hostile_server: RunningServer) -> None:
    connection = Connection(hostile_server.base_url)
    try:
        status, body = connection.post("/v1/completions", json.dumps(_completion([1])).encode())
        assert status == 200
        sockname = connection.sockname
        for path, request, param in SURROGATE_CASES:
            raw = json.dumps(request).encode()  # ensure_ascii spells it "\ud800", as clients do
            assert b"\\ud800" in raw
            status, body = connection.post(path, raw)
            error = _assert_envelope(status, body, 400)
            if SURROGATE not in param:  # a dict key holding one is named escaped
                assert error["param"] == param, (path, error)
            assert error["code"] == "invalid_text"
            status, body = connection.post("/v1/completions",
                                           json.dumps(_completion([1, 2])).encode())
            assert status == 200, body
            assert connection.sockname == sockname, "the connection was not kept alive"
    finally:
        connection.close()
    assert hostile_server.engine.is_alive


def test_a_500_keeps_the_connection_alive(hostile_server: RunningServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    poison_tokenizer(hostile_server.engine, monkeypatch)
    connection = Connection(hostile_server.base_url)
    try:
        status, body = connection.post("/v1/completions", json.dumps(_completion("hi")).encode())
        assert status == 200
        sockname = connection.sockname
        status, body = connection.post("/v1/completions",
                                       json.dumps(_completion("POISON")).encode())
        assert _assert_envelope(status, body, 500)["code"] == "internal_error"
        status, body = connection.post("/v1/completions", json.dumps(_completion("hi")).encode())
        assert status == 200 and connection.sockname == sockname
    finally:
        connection.close()


@pytest.mark.parametrize("literal, param", [
    (b"1e309", "repetition_penalty"), (b"NaN", "repetition_penalty"),
    (b"Infinity", "temperature"), (b"-1e999", "presence_penalty"), (b"1e999", "top_p")])
def test_non_finite_floats_are_400(hostile_server: RunningServer, literal: bytes,
                                   param: str) -> None:
    raw = json.dumps(_completion([1, 2, 3], **{param: 12345.5})).encode()
    raw = raw.replace(b"12345.5", literal)
    reply = hostile_server.http().post("/v1/completions", content=raw,
                                       headers={"Content-Type": "application/json"})
    _assert_envelope(reply.status_code, reply.json(), 400, param)


def test_logit_bias_values_must_be_finite(hostile_server: RunningServer) -> None:
    raw = json.dumps(_completion([1, 2, 3], logit_bias={"5": 12345.5})).encode()
    reply = hostile_server.http().post("/v1/completions", content=raw.replace(b"12345.5",
                                                                              b"-Infinity"),
                                       headers={"Content-Type": "application/json"})
    assert _assert_envelope(reply.status_code, reply.json(), 400)["param"] in (
        "logit_bias", "logit_bias.5")


def test_tiny_temperatures_are_greedy(hostile_server: RunningServer) -> None:
    http = hostile_server.http()
    greedy = http.post("/v1/completions", json=_completion(WITNESS_PROMPT, max_tokens=24,
                                                           ignore_eos=True, logprobs=0))
    assert greedy.status_code == 200
    expected = greedy.json()["choices"][0]["logprobs"]["tokens"]
    for temperature in (1e-40, 5e-324, 1e-6):
        reply = http.post("/v1/completions", json=_completion(
            WITNESS_PROMPT, max_tokens=24, ignore_eos=True, logprobs=0,
            temperature=temperature, seed=1))
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["logprobs"]["tokens"] == expected, temperature


def test_a_body_shorter_than_its_content_length_gets_408(hostile_server: RunningServer) -> None:
    parts = urlsplit(hostile_server.base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     b'{"prompt": ')
        started = time.monotonic()
        response = b""
        while chunk := sock.recv(65536):  # the server answers, then closes
            response += chunk
        waited = time.monotonic() - started
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), response
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert waited < 25, "the connection was held long past the body read timeout"
    assert hostile_server.http().get("/health").status_code == 200


def test_tokenize_has_the_limits_of_generation(hostile_server: RunningServer) -> None:
    http = hostile_server.http()
    huge = "hello world, this is some text. " * 130_000  # ~4 MB, about a million tokens
    reply = http.post("/tokenize", json={"prompt": huge})
    error = _assert_envelope(reply.status_code, reply.json(), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    assert "at least" in str(error["message"])  # counted only until it could not fit
    reply = http.post("/tokenize", json={"messages": [{"role": "user", "content": huge}]})
    _assert_envelope(reply.status_code, reply.json(), 400, "messages")
    reply = http.post("/v1/completions", json=_completion(huge))
    assert _assert_envelope(reply.status_code, reply.json(), 400,
                            "prompt")["code"] == "context_length_exceeded"
    max_model_len = hostile_server.engine.max_model_len
    reply = http.post("/detokenize", json={"tokens": [1] * (max_model_len + 1)})
    _assert_envelope(reply.status_code, reply.json(), 400, "tokens")
    fits = http.post("/tokenize", json={"prompt": "hello " * 50})
    assert fits.status_code == 200 and fits.json()["count"] <= max_model_len


@pytest.mark.parametrize("depth", [500, 5_000, 100_000])
def test_deeply_nested_json_is_a_4xx(hostile_server: RunningServer, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    raw = (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], '
           b'"max_tokens": 2, "chat_template_kwargs": {"deep": ' + nested.encode() + b"}}")
    connection = Connection(hostile_server.base_url)
    try:
        status, body = connection.post("/v1/chat/completions", raw)
        assert status == 200 or 400 <= status < 500, body
        if status != 200:
            _assert_envelope(status, body, status)
        status, body = connection.post("/v1/completions",
                                       json.dumps(_completion([1, 2])).encode())
        assert status == 200, body
    finally:
        connection.close()


@pytest.mark.parametrize("prompt", [[-1], [2**63], [2**64], [1, 512]])
def test_echo_of_token_ids_outside_the_vocabulary_is_a_400(hostile_server: RunningServer,
                                                            prompt: list[int]) -> None:
    reply = hostile_server.http().post("/v1/completions",
                                       json=_completion(prompt, max_tokens=1, echo=True))
    _assert_envelope(reply.status_code, reply.json(), 400, "prompt")

"""Acceptance (auth and exposure): every protected route answers 401 without a key or with a
wrong one and 200 with a right one; /health, /metrics and /version stay open; anything else is
protected by default; CORS headers appear only for the origins given with --allowed-origins."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import API_KEY, MODEL_NAME, RunningServer, serve

PROTECTED = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions",
     {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}),
    ("POST", "/tokenize", {"prompt": "hi"}),
    ("POST", "/detokenize", {"tokens": [5, 6]}),
]
OPEN = ["/health", "/metrics", "/version", "/openapi.json"]
# same length and all but the last character shared: only a constant-time compare hides that
NEAR_MISS = API_KEY[:-1] + ("x" if API_KEY[-1] != "x" else "y")
WRONG_AUTH = {
    "none": {},
    "wrong key": {"Authorization": "Bearer sk-wrong"},
    "near-miss key": {"Authorization": f"Bearer {NEAR_MISS}"},
    "key without Bearer": {"Authorization": API_KEY},
    "basic scheme": {"Authorization": f"Basic {API_KEY}"},
    "bearer without a key": {"Authorization": "Bearer"},
}


def _call(base_url: str, method: str, path: str, body: object,
          headers: dict[str, str]) -> httpx.Response:
    return httpx.request(method, f"{base_url}{path}", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_protected_route_needs_the_key(server: RunningServer, method: str, path: str,
                                       body: object) -> None:
    for name, headers in WRONG_AUTH.items():
        response = _call(server.base_url, method, path, body, headers)
        assert response.status_code == 401, f"{name}: {response.status_code}"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["code"] == "invalid_api_key" and "sk-" not in error["message"]
        assert response.headers["www-authenticate"] == "Bearer"
    right = _call(server.base_url, method, path, body, {"Authorization": f"Bearer {API_KEY}"})
    assert right.status_code == 200, right.text
    server.wait_idle()


@pytest.mark.parametrize("path", OPEN)
def test_open_routes_need_no_key(server: RunningServer, path: str) -> None:
    assert httpx.get(f"{server.base_url}{path}").status_code == 200


def test_unknown_paths_are_protected_by_default(server: RunningServer) -> None:
    assert httpx.get(f"{server.base_url}/v2/secret").status_code == 401
    assert httpx.post(f"{server.base_url}/admin", json={}).status_code == 401
    with_key = httpx.get(f"{server.base_url}/v2/secret", headers=server.headers)
    assert with_key.status_code == 404


@pytest.fixture(scope="module")
def cors_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    with serve(tiny_llama_dir, num_blocks=64, server_settings={
            "api_keys": ("key-one", "key-two"),
            "allowed_origins": ("https://app.example",)}) as running:
        yield running


def _preflight(base_url: str, origin: str) -> httpx.Response:
    return httpx.options(f"{base_url}/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_is_off_without_allowed_origins(server: RunningServer) -> None:
    preflight = _preflight(server.base_url, "https://app.example")
    assert "access-control-allow-origin" not in preflight.headers
    response = httpx.get(f"{server.base_url}/v1/models",
                         headers={**server.headers, "Origin": "https://app.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_cors_only_for_allowed_origins(cors_server: RunningServer) -> None:
    allowed = _preflight(cors_server.base_url, "https://app.example")
    assert allowed.status_code == 200  # a preflight carries no key and needs none
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    denied = _preflight(cors_server.base_url, "https://evil.example")
    assert denied.headers.get("access-control-allow-origin") != "https://evil.example"
    response = httpx.get(f"{cors_server.base_url}/v1/models", headers={
        "Authorization": "Bearer key-two", "Origin": "https://app.example"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"


def test_every_configured_key_works(cors_server: RunningServer) -> None:
    for key in ("key-one", "key-two"):
        response = httpx.get(f"{cors_server.base_url}/v1/models",
                             headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
    assert httpx.get(f"{cors_server.base_url}/v1/models", headers={
        "Authorization": "Bearer key-three"}).status_code == 401

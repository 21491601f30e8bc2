"""Acceptance (API extras): GET /v1/models/{model} through the openai SDK (slashed names
included, 404 envelope otherwise), HEAD wherever GET is (load balancers probe /health with
it), and bench/perplexity.py through the real server against transformers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from bench import perplexity
from engine import AsyncEngine
from tests.integration.conftest import API_KEY, MODEL_NAME, RunningServer, serve

REPO = Path(__file__).resolve().parents[2]
SLASHED_NAME = "org/tiny-llama"
ENVELOPE_FIELDS = {"message", "type", "param", "code"}

# ------------------------------------------------------------------------ GET /v1/models/{model}


def test_retrieve_the_served_model(server: RunningServer) -> None:
    model = server.client().models.retrieve(MODEL_NAME)
    listed = server.client().models.list().data[0]
    assert model.id == MODEL_NAME and model.owned_by == "pagedserve"
    assert model.model_dump() == listed.model_dump()
    assert server.http().get(f"/v1/models/{MODEL_NAME}").json() == \
        server.http().get("/v1/models").json()["data"][0]


@pytest.mark.parametrize("name", ["gpt-4o", "Qwen/Qwen2.5-0.5B", f"{MODEL_NAME}/extra",
                                  "tiny-llama "])
def test_retrieve_an_unknown_model_is_404(server: RunningServer, name: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().models.retrieve(name)
    assert caught.value.status_code == 404
    response = server.http().get(f"/v1/models/{name}")
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_FIELDS
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert name in body["error"]["message"]


def test_retrieve_needs_the_api_key(server: RunningServer) -> None:
    response = httpx.get(f"{server.base_url}/v1/models/{MODEL_NAME}")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.fixture(scope="module")
def slashed_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    """Served under a hub-style name: the SDK puts the slash in the path as is."""
    with serve(tiny_llama_dir, {"served_model_name": SLASHED_NAME}, num_blocks=64) as running:
        yield running


def test_retrieve_a_slashed_name(slashed_server: RunningServer) -> None:
    client = slashed_server.client()
    assert [m.id for m in client.models.list().data] == [SLASHED_NAME]
    assert client.models.retrieve(SLASHED_NAME).id == SLASHED_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("org")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny-llama")


# ---------------------------------------------------------------------------------------- HEAD


def test_head_health_is_200_with_no_body(server: RunningServer) -> None:
    bare = httpx.Client(base_url=server.base_url)  # /health is open: no key, as an LB sends it
    response = bare.head("/health")
    assert response.status_code == 200 and response.content == b""
    # the headers describe the body GET would send
    assert int(response.headers["content-length"]) == len(bare.get("/health").content)


def test_head_health_follows_get_when_the_engine_is_dead(
        server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AsyncEngine, "is_alive", property(lambda self: False))
    bare = httpx.Client(base_url=server.base_url)
    assert bare.get("/health").status_code == 503
    response = bare.head("/health")
    assert response.status_code == 503 and response.content == b""
    assert response.headers["retry-after"]


@pytest.mark.parametrize("path", ["/v1/models", f"/v1/models/{MODEL_NAME}", "/version",
                                  "/metrics", "/openapi.json"])
def test_head_is_answered_wherever_get_is(server: RunningServer, path: str) -> None:
    http = server.http()
    response = http.head(path)
    assert response.status_code == http.get(path).status_code == 200
    assert response.content == b""


def test_head_follows_get_on_errors(server: RunningServer) -> None:
    assert server.http().head("/v1/models/gpt-4o").status_code == 404
    assert httpx.head(f"{server.base_url}/v1/models").status_code == 401  # no key
    # a POST-only route answers HEAD as it answers GET: 405
    assert server.http().head("/v1/chat/completions").status_code == 405


def test_head_stays_out_of_the_openapi_schema(server: RunningServer) -> None:
    paths = server.http().get("/openapi.json").json()["paths"]
    assert "/v1/models/{model}" in paths
    assert all("head" not in operations for operations in paths.values())


# ------------------------------------------------------------------- bench/perplexity.py, served


def test_perplexity_through_the_server_matches_transformers(
        server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the start of the shipped text: it fits the tiny model's 512-token context
    text = (REPO / "bench" / "data" / "perplexity.txt").read_text(encoding="utf-8")[:600]
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    assert perplexity.main([str(path), "--url", server.base_url, "--api-key", API_KEY,
                            "--max-length", "128", "--stride", "48",
                            "--reference", str(server.model_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == MODEL_NAME and report["num_windows"] > 3
    assert report["server"]["num_scored"] == report["reference"]["num_scored"] == \
        report["num_tokens"] - 1
    assert abs(report["relative_difference"]) < 1e-4, report
    server.wait_idle()

"""Acceptance (fuzzing): schemathesis drives every route of the app's own OpenAPI schema with
valid and invalid inputs. No input may cause a 5xx, every 4xx carries the OpenAI error envelope,
and the engine ends idle with every KV block free."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402
from tests.integration.conftest import API_KEY, RunningServer, serve  # noqa: E402

# a bounded run: each operation gets this many generated cases per mode and phase
MAX_EXAMPLES = 50
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    # a short context keeps every generation the fuzzer manages to start short
    with serve(tiny_llama_dir, num_blocks=64, max_model_len=48, max_num_seqs=8) as running:
        yield running


# The schema of an app built like the served one (creating it loads no model), so pytest can
# collect one test per operation; test_served_schema_is_the_fuzzed_one holds them equal.
# (schemathesis.pytest.from_fixture would fetch it from the live server, but its lazy loader
# does not work with pytest 9.)
OPENAPI = create_app(Settings(api_keys=(API_KEY,))).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)
schema.config.generation.update(max_examples=MAX_EXAMPLES)


def test_served_schema_is_the_fuzzed_one(fuzz_server: RunningServer) -> None:
    served = fuzz_server.http().get("/openapi.json").json()
    assert served == OPENAPI
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize",
            "/detokenize", "/health", "/version", "/metrics"} <= set(OPENAPI["paths"])


def check_error_envelope(ctx: object, response: object, case: object) -> bool | None:
    """Every 4xx (and 5xx, were there one) is {"error": {message, type, param, code}}."""
    status = response.status_code  # type: ignore[attr-defined]
    if status < 400:
        return None
    body = json.loads(response.content)  # type: ignore[attr-defined]
    assert set(body) == {"error"}, f"{status} without the OpenAI envelope: {body}"
    assert set(body["error"]) == ENVELOPE_FIELDS, f"{status} envelope fields: {body}"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return True


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_envelope_on_every_4xx(case: object, fuzz_server: RunningServer) -> None:
    response = case.call(base_url=fuzz_server.base_url,  # type: ignore[attr-defined]
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    case.validate_response(response, checks=[not_a_server_error,  # type: ignore[attr-defined]
                                             check_error_envelope])


def test_engine_idle_after_fuzzing(fuzz_server: RunningServer) -> None:
    fuzz_server.wait_idle(timeout_s=5.0)
    assert fuzz_server.http().get("/health").status_code == 200

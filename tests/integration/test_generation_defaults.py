"""Sampling values a request omits come from the model's generation_config.json; values the
request sets win."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import MODEL_NAME, RunningServer, serve

MESSAGES = [{"role": "user", "content": "Continuous batching lets new requests"}]


@pytest.fixture(scope="module")
def top_k_1_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[RunningServer]:
    """The tiny llama whose generation config samples with top_k=1, i.e. greedily."""
    model_dir = tmp_path_factory.mktemp("gen-defaults") / "llama"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    config.update(do_sample=True, top_k=1, temperature=1.0)
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    with serve(model_dir, num_blocks=64) as running:
        yield running


def _text(server: RunningServer, **fields: object) -> str:
    response = server.client().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=12, **fields)  # type: ignore[call-overload]
    return str(response.choices[0].message.content)


def test_generation_config_fills_omitted_fields(top_k_1_server: RunningServer) -> None:
    assert top_k_1_server.engine.generation_defaults.get("top_k") == 1
    greedy = _text(top_k_1_server, temperature=0.0)
    # temperature 1 but top_k from the generation config (1): still the greedy text
    assert all(_text(top_k_1_server, temperature=1.0, seed=seed) == greedy for seed in (1, 2))
    # the request's own top_k wins: now it really samples
    sampled = {_text(top_k_1_server, temperature=1.0, seed=seed, extra_body={"top_k": -1})
               for seed in (1, 2, 3)}
    assert sampled - {greedy}

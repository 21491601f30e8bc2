"""Acceptance (KV pressure): with a pool of a few dozen blocks, 32 concurrent long generations
preempt one another (by recompute) yet all complete, with greedy outputs identical to the same
requests on a large pool. A prompt that can never fit is refused at admission; a context the
pool cannot hold is lowered at startup, or refused with the strict option."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from engine import EngineConfig, InvalidRequestError, LLMEngine
from server.app import create_app
from server.settings import Settings
from tests.integration.conftest import MODEL_NAME, RunningServer, serve

NUM_CLIENTS = 32
MAX_TOKENS = 120
NUM_SMALL_POOL_BLOCKS = 40  # x 16 tokens: room for ~4 of the 32 requests at full length
# greedy picks between two tokens whose logprobs agree this closely depend on float rounding,
# which differs between a recomputed prefill and step-by-step decoding
TIE_TOLERANCE = 1e-4
# every decoding row verifies proposals, whatever the batch size or acceptance: the small
# random model's outputs loop, so one-token lookups find proposals nearly every step
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
               "prompt_lookup_max": 3, "disable_by_batch_size": None, "adaptive": False}


def _counter(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"model_name": MODEL_NAME}) or 0.0


def _preemptions() -> float:
    return _counter("pagedserve_num_preemptions_total")


def _body(i: int) -> dict[str, object]:
    prompt = [(17 * i + 3 * k) % 500 + 5 for k in range(8 + i % 7)]
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True, "logprobs": 2}


Logprobs = dict[str, list]  # the legacy logprobs object: tokens, top_logprobs, ...


def _run_all(server: RunningServer) -> list[Logprobs]:
    """Every request concurrently; per request, its legacy logprobs (tokens, top 2 each)."""
    async def run() -> list[Logprobs]:
        async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers,
                                     timeout=300) as client:
            responses = await asyncio.gather(*(client.post("/v1/completions", json=_body(i))
                                               for i in range(NUM_CLIENTS)))
        outputs = []
        for response in responses:
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            assert choice["finish_reason"] == "length"
            outputs.append(choice["logprobs"])
        return outputs

    return asyncio.run(run())


@pytest.fixture(scope="module")
def small_pool_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    with serve(tiny_llama_dir, num_blocks=NUM_SMALL_POOL_BLOCKS, max_num_seqs=32) as running:
        yield running


@pytest.fixture(scope="module")
def small_pool_speculating_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    with serve(tiny_llama_dir, num_blocks=NUM_SMALL_POOL_BLOCKS, max_num_seqs=32,
               speculative_config=SPECULATIVE) as running:
        yield running


def test_preemption_under_kv_pressure_keeps_greedy_outputs(
        small_pool_server: RunningServer, server: RunningServer) -> None:
    before = _preemptions()
    squeezed = _run_all(small_pool_server)
    assert _preemptions() - before > 0, "the small pool never had to preempt"
    small_pool_server.wait_idle()
    roomy = _run_all(server)  # the shared server: 512 blocks, no preemption needed
    _assert_same_greedy_outputs(squeezed, roomy)


def test_speculation_under_kv_pressure_keeps_greedy_outputs_and_frees_every_block(
        small_pool_speculating_server: RunningServer, server: RunningServer) -> None:
    """Speculative rows ask for 1 + k slots and give back the rejected ones; under a pool that
    forces preemptions the outputs stay the plain greedy ones and no block leaks."""
    before = _preemptions()
    drafted = _counter("pagedserve_spec_decode_num_draft_tokens_total")
    accepted = _counter("pagedserve_spec_decode_num_accepted_tokens_total")
    squeezed = _run_all(small_pool_speculating_server)
    assert _preemptions() - before > 0, "the small pool never had to preempt"
    num_drafted = _counter("pagedserve_spec_decode_num_draft_tokens_total") - drafted
    num_accepted = _counter("pagedserve_spec_decode_num_accepted_tokens_total") - accepted
    assert num_drafted > 1000 and 0 < num_accepted < num_drafted, (num_drafted, num_accepted)
    small_pool_speculating_server.wait_idle()
    engine = small_pool_speculating_server.engine
    assert engine.num_free_blocks == engine.num_total_blocks
    _assert_same_greedy_outputs(squeezed, _run_all(server))


def _assert_same_greedy_outputs(squeezed: list[Logprobs], roomy: list[Logprobs]) -> None:
    assert all(len(output["tokens"]) == MAX_TOKENS for output in squeezed)
    num_ties = sum(not _same_up_to_a_tie(a, b) for a, b in zip(squeezed, roomy, strict=True))
    assert num_ties <= 2, "greedy outputs changed under preemption"


def _same_up_to_a_tie(a: Logprobs, b: Logprobs) -> bool:
    """True when the token sequences are equal. Otherwise they must part at an exact tie (the
    top two logprobs equal within TIE_TOLERANCE in both runs): then False, a tolerated case."""
    if a["tokens"] == b["tokens"]:
        return True
    k = next(i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"], strict=True)) if x != y)
    for top in (a["top_logprobs"][k], b["top_logprobs"][k]):
        best = sorted(top.values(), reverse=True)
        assert len(best) >= 2 and best[0] - best[1] < TIE_TOLERANCE, (
            f"outputs part at token {k} without a tie: {a['top_logprobs'][k]} vs "
            f"{b['top_logprobs'][k]}")
    assert set(a["top_logprobs"][k]) == set(b["top_logprobs"][k])
    return False


def test_prompt_that_can_never_fit_is_refused_at_admission(
        small_pool_server: RunningServer) -> None:
    pool_tokens = (NUM_SMALL_POOL_BLOCKS - 1) * 16  # block 0 is the reserved null block
    http = small_pool_server.http()
    models = http.get("/v1/models").json()
    assert models["data"][0]["max_model_len"] == min(512, pool_tokens)
    response = http.post("/v1/completions", json={
        "model": MODEL_NAME, "prompt": [5] * (pool_tokens + 1), "max_tokens": 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert f"maximum context length is {min(512, pool_tokens)} tokens" in error["message"]
    small_pool_server.wait_idle()


def test_max_model_len_is_lowered_to_the_pool_or_refused_when_strict(
        tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = EngineConfig.from_kwargs(str(tiny_llama_dir), dtype="float32", device="cpu",
                                      num_blocks=9)  # 8 usable blocks = 128 tokens < 512
    with caplog.at_level("WARNING", logger="engine.llm_engine"):
        lowered = LLMEngine(config)
    assert lowered.max_model_len == 128 and lowered.model_max_len == 512
    assert any("lowered from 512 to 128" in r.getMessage() for r in caplog.records)
    with pytest.raises(InvalidRequestError, match="does not fit the KV cache") as info:
        LLMEngine(config, strict_max_model_len=True)
    assert info.value.param == "max_model_len"


def test_strict_max_model_len_fails_the_server_load(tiny_llama_dir: Path) -> None:
    from fastapi.testclient import TestClient

    failures: list[BaseException] = []
    settings = Settings(model=str(tiny_llama_dir), dtype="float32", device="cpu", num_blocks=9,
                        strict_max_model_len=True)
    app = create_app(settings, on_load_failure=failures.append)
    with TestClient(app) as client:
        for _ in range(600):
            if failures:
                break
            time.sleep(0.05)
        health = client.get("/health")
    assert failures and "does not fit the KV cache" in str(failures[0])
    assert health.status_code == 503 and health.json()["error"]["code"] == "load_failed"

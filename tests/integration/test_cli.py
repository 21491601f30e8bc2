"""`pagedserve serve` as a user runs it: a subprocess on a tiny model, its startup lines (one
per stage, then the one ready line and its fields), SIGTERM → exit 0; speculative decoding in
the ready line; a model that cannot load → 503 from /health, then exit status 1."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from engine import AsyncEngine, EngineConfig
from engine.kernels.native import native_library
from server.app import announce_ready, create_app
from server.settings import Settings
from server.state import ServerState
from tests.integration.test_default_model import REPO, _free_port, _wait_healthy

PAGEDSERVE = str(Path(sys.executable).with_name("pagedserve"))


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([PAGEDSERVE, "serve", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)


def test_serve_tiny_model_subprocess(tiny_llama_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    log = tmp_path / "serve.log"
    process = _start([str(tiny_llama_dir), "--port", str(port), "--dtype", "float32",
                      "--device", "cpu", "--num-blocks", "64", "--served-model-name", "tiny",
                      "--api-key", "k1", "--log-level", "info"], log)
    try:
        _wait_healthy(process, f"http://127.0.0.1:{port}", log)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k1",
                               max_retries=0)
        response = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            extra_body={"ignore_eos": True}, extra_headers={"X-Request-Id": "cli-req-7"})
        assert response.usage is not None and response.usage.completion_tokens == 3
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=60)
    text = log.read_text()
    assert returncode == 0, text[-3000:]
    for phase in ("settings:", "config: LlamaForCausalLM", "weights loaded in", "KV cache",
                  f"listening on http://127.0.0.1:{port}", "ready: serving 'tiny'"):
        assert phase in text, f"missing startup line {phase!r}:\n{text[-3000:]}"
    assert "[cli-req-7]" in text  # the request id reaches the log lines
    (ready,) = [line for line in text.splitlines() if "ready:" in line]
    # 64 blocks less the null block; max_model_len 512 takes 32 of them
    for part in (f"serving 'tiny' at http://127.0.0.1:{port}/v1;", "float32 on cpu",
                 "no quantization", "KV cache 63 blocks = 1008 tokens",
                 "1 sequence of max_model_len 512", "kernels: torch (the native CPU kernels "
                 "take bfloat16 only)", "attention: torch", "speculative decoding: off"):
        assert part in ready, f"{part!r} missing from the ready line: {ready}"
    assert "\r" not in text  # not a terminal: log lines, no progress bars


def test_ready_line_names_quantization_kernels_and_speculation(
        tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = EngineConfig.from_kwargs(
        str(tiny_llama_dir), dtype="bfloat16", device="cpu", quantization="int8",
        num_blocks=100, block_size=8, max_model_len=256,
        speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    engine = AsyncEngine(config, served_model_name="tiny", registry=CollectorRegistry())
    state = ServerState(settings=Settings(), engine=engine, served_model_name="tiny")
    with caplog.at_level(logging.INFO, logger="server.app"):
        announce_ready(state)  # the URL is not known yet: no line
        state.url = "http://127.0.0.1:8123"
        announce_ready(state)
    (ready,) = [record.getMessage() for record in caplog.records if record.name == "server.app"]
    native = native_library() is not None  # built or not, as on this machine
    for part in ("serving 'tiny' at http://127.0.0.1:8123/v1;", "bfloat16 on cpu",
                 "quantization int8", "KV cache 99 blocks = 792 tokens",
                 "3 sequences of max_model_len 256",  # 32 blocks each
                 "int8 matmuls on the native VNNI kernel" if native
                 else "int8 matmuls on the torch fallback (slow)",
                 "native CPU kernels (RMSNorm" if native else "torch fallbacks (",
                 "attention: torch", "speculative decoding: ngram, up to 3 tokens"):
        assert part in ready, f"{part!r} missing from the ready line: {ready}"


def test_serve_unloadable_model_exits_1(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    process = _start([str(tmp_path / "no-such-model"), "--port", str(_free_port())], log)
    assert process.wait(timeout=120) == 1
    assert "failed to load" in log.read_text()


def test_health_503_while_model_unavailable(tmp_path: Path) -> None:
    failures: list[BaseException] = []
    app = create_app(Settings(model=str(tmp_path / "missing")), on_load_failure=failures.append)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        deadline = time.monotonic() + 60
        while not failures:
            assert time.monotonic() < deadline
            health = httpx.get(f"{base}/health")  # loading: 503, model_loading
            assert health.status_code == 503 and health.json()["error"]["code"] in (
                "model_loading", "load_failed")
            time.sleep(0.05)
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "load_failed"
        chat = httpx.post(f"{base}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "x"}]})
        assert chat.status_code == 503 and int(chat.headers["retry-after"]) >= 1
        assert set(chat.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert failures

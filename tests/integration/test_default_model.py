"""Acceptance 5: `pagedserve serve` with the embedded default model, as a user starts it,
answers a chat request through the OpenAI SDK with sensible text."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
# the first run assembles, verifies and converts the GGUF; later runs load from the cache
STARTUP_TIMEOUT_S = 30 * 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _require_default_model() -> None:
    from engine.default_model import find_part_files
    from engine.errors import UnsupportedModelError

    try:
        find_part_files()
    except UnsupportedModelError as exc:
        pytest.skip(f"default model packages not installed: {exc}")


def _wait_healthy(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"pagedserve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"/health not 200 after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
@pytest.mark.default_model
def test_pagedserve_serve_answers_with_the_default_model(tmp_path: Path) -> None:
    _require_default_model()
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = tmp_path / "pagedserve.log"
    command = [str(Path(sys.executable).with_name("pagedserve")), "serve",
               "--config", "configs/default.yaml", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PAGEDSERVE_API_KEY": "sk-default"})
    try:
        _wait_healthy(process, base_url, log)
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-default", max_retries=0,
                               timeout=600)
        assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_NAME]
        answer = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": "What is the capital of France? "
                                                  "Answer with one word."}])
        assert "paris" in (answer.choices[0].message.content or "").lower()
        code = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=64,
            messages=[{"role": "user", "content": "Write a Python function add(a, b) that "
                                                  "returns a + b. Only code."}])
        assert "def add" in (code.choices[0].message.content or "")
        assert code.choices[0].finish_reason in ("stop", "length")
    finally:
        process.send_signal(signal.SIGTERM)  # what Kubernetes and systemd send
        try:
            returncode = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    text = log.read_text()
    for phase in ("settings:", "KV cache", "listening on http://127.0.0.1", "ready: serving"):
        assert phase in text, f"startup phase line {phase!r} missing:\n{text[-4000:]}"
    assert returncode == 0, text[-4000:]

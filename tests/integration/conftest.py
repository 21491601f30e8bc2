"""A real uvicorn server on a free loopback port, serving a tiny random model through the real
engine; tests talk to it with the `openai` SDK and httpx like any client would."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from engine import AsyncEngine, EngineConfig
from server.app import create_app
from server.settings import Settings
from tests.tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-key"
MODEL_NAME = "tiny-llama"
MAX_BODY_BYTES = 4 * 1024 * 1024
STARTUP_TIMEOUT_S = 60.0


@dataclass(slots=True)
class RunningServer:
    base_url: str
    engine: AsyncEngine
    model_dir: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def client(self) -> openai.OpenAI:
        # no retries: a 429 or 5xx must show up in the test, not be papered over
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=API_KEY, max_retries=0,
                             timeout=120)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=API_KEY,
                                  max_retries=0, timeout=120)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=120)

    def wait_idle(self, timeout_s: float = 2.0) -> float:
        """Seconds until no request runs or waits and every KV block is free; fails after
        `timeout_s`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.is_idle():
                return time.monotonic() - start
            time.sleep(0.01)
        pytest.fail(f"engine not idle after {timeout_s}s: running={self.engine.num_running} "
                    f"waiting={self.engine.num_waiting} free={self.engine.num_free_blocks}/"
                    f"{self.engine.num_total_blocks}")

    def is_idle(self) -> bool:
        engine = self.engine
        return (engine.num_running == 0 and engine.num_waiting == 0
                and engine.num_free_blocks == engine.num_total_blocks)


@contextlib.contextmanager
def serve(model_dir: Path, server_settings: Mapping[str, object] | None = None,
          **engine_args: object) -> Iterator[RunningServer]:
    """Build the engine here (blocking load), hand it to create_app, run uvicorn in a thread on
    an OS-chosen port, and wait for /health to say ready. `server_settings` overrides Settings
    fields that are the server's own (request_timeout, engine_stall_timeout, ...)."""
    config = EngineConfig.from_kwargs(model=str(model_dir), dtype="float32", device="cpu",
                                      seed=0, **engine_args)
    fields: dict[str, object] = {
        "model": str(model_dir), "served_model_name": MODEL_NAME, "api_keys": (API_KEY,),
        "max_request_body_bytes": MAX_BODY_BYTES, "log_level": "warning",
        **(server_settings or {})}
    settings = Settings.model_validate(fields)
    # as the app would build it from these settings
    engine = AsyncEngine(config, served_model_name=MODEL_NAME,
                         metric_names=settings.metrics_names)
    app = create_app(settings, engine=engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None,
                                           access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        base_url = _wait_until_ready(server)
        yield RunningServer(base_url, engine, model_dir)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _wait_until_ready(server: uvicorn.Server) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{base_url}/health").status_code != 200:
        assert time.monotonic() < deadline, "/health never turned 200"
        time.sleep(0.05)
    return base_url


@pytest.fixture(scope="session")
def server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    """The tiny llama (512-token context) behind a real server, shared by the API tests."""
    with serve(tiny_llama_dir, num_blocks=512, max_num_seqs=32) as running:
        yield running


@pytest.fixture(scope="session")
def long_context_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A somewhat wider tiny llama with 4096 positions: 2000-token generations fit its context,
    and its decode steps (~10 ms on one CPU thread) are slow enough that finishing 2000 tokens
    takes far longer than the 2 s the disconnect tests allow for aborts."""
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-4k") / "llama",
                           max_position_embeddings=4096, hidden_size=512,
                           intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4)


@dataclass(slots=True)
class ServerProcess:
    """`python -m server serve …` as a child process, as an operator starts it."""

    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def rss_bytes(self) -> int:
        """The server process's resident set size, from /proc (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serve_process(model_dir: Path, log: Path, *args: str) -> Iterator[ServerProcess]:
    """Start the CLI on a free port with the test API key, wait for /health, and make sure the
    process is gone afterwards (SIGKILL if a test left it running)."""
    port = _free_port()
    if not {"--num-blocks", "--kv-cache-memory-gb"} & set(args):
        # a small pool: zeroing the default 2 GiB takes 2-5 s of each start here, and no
        # test of a tiny model comes near 0.25 GiB (a million tokens of the tiny Llama)
        args = ("--kv-cache-memory-gb", "0.25", *args)
    command = [sys.executable, "-m", "server", "serve", str(model_dir), "--dtype", "float32",
               "--device", "cpu", "--port", str(port), "--api-key", API_KEY,
               "--served-model-name", MODEL_NAME, *args]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    running = ServerProcess(process, f"http://127.0.0.1:{port}", log)
    try:
        _wait_process_healthy(running)
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_process_healthy(running: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            pytest.fail(f"the server exited with {running.process.returncode}:\n"
                        f"{running.log_text()[-4000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{running.base_url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"/health not 200 after {STARTUP_TIMEOUT_S}s:\n{running.log_text()[-4000:]}")


def poison_tokenizer(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the server's tokenizer raise on any text holding "POISON" (before the engine sees
    the request), for the rest of the test."""
    tokenizer = engine.tokenizer
    real_encode = tokenizer.encode

    def encode(text: str, *args: object, **kwargs: object) -> list[int]:
        if "POISON" in text:
            raise RuntimeError("injected tokenizer fault")
        return real_encode(text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tokenizer, "encode", encode)

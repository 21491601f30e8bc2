"""Parallel groups for real: two processes over gloo on the loopback (rank 0 is the engine, rank 1
a spawned worker). Tensor parallel, pipeline parallel and expert parallel give the greedy tokens
(and logprobs) of one process, with prefix caching, chunked prefill and preemption at work; a
killed worker fails every client at once, turns /health 503 and ends the server non-zero;
SIGTERM stops the group cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from engine import LLM, SamplingParams
from tests.integration.conftest import (
    API_KEY,
    MODEL_NAME,
    REPO,
    ServerProcess,
    _free_port,
    _wait_process_healthy,
    serve_process,
)
from tests.tiny_models import save_tiny_model

# a shared 24-token prefix (prefix cache hits), prompts longer than the 16-token step budget
# (chunked prefill), and more KV than the pool holds at once (preemption)
_PREFIX = list(range(40, 64))
PROMPTS = [_PREFIX + [70 + i, 80 + i, 90 + i] for i in range(6)] + [
    list(range(100, 140)), [7, 8, 9], list(range(200, 233))]
NUM_TOKENS = 12
ENGINE_ARGS = dict(dtype="float32", device="cpu", block_size=4, num_blocks=20,
                   max_num_batched_tokens=16, max_num_seqs=6, seed=0)

CASES = [  # (architecture, parallel settings)
    ("llama", dict(tensor_parallel_size=2)),
    ("llama", dict(pipeline_parallel_size=2)),
    ("qwen2", dict(tensor_parallel_size=2)),
    ("qwen2", dict(pipeline_parallel_size=2)),
    ("qwen3", dict(tensor_parallel_size=2)),
    ("qwen3", dict(pipeline_parallel_size=2)),
    ("gpt2", dict(tensor_parallel_size=2)),
    ("gpt2", dict(pipeline_parallel_size=2)),
    ("mixtral", dict(tensor_parallel_size=2)),
    ("qwen2_moe", dict(tensor_parallel_size=2, enable_expert_parallel=True)),
    ("qwen3_moe", dict(tensor_parallel_size=2)),
    ("qwen3_moe", dict(tensor_parallel_size=2, enable_expert_parallel=True)),
]


def _run(model_dir: Path, **parallel: object) -> tuple[list[list[int]], list[list[float]], LLM]:
    """Greedy tokens and the sampled tokens' logprobs of PROMPTS, and the (closed) LLM."""
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=1)
    with LLM(str(model_dir), **ENGINE_ARGS, **parallel) as llm:  # type: ignore[arg-type]
        outputs = llm.generate(PROMPTS, params)
    assert sum(o.num_cached_tokens or 0 for o in outputs) > 0, "no prefix cache hit"
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[entry[token].logprob for entry, token in zip(o.outputs[0].logprobs or [],
                                                              o.outputs[0].token_ids,
                                                              strict=True)]
                for o in outputs]
    return tokens, logprobs, llm


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel-models")
    return {arch: save_tiny_model(arch, root / arch) for arch in {a for a, _ in CASES}}


@pytest.fixture(scope="module")
def single_process(model_dirs: dict[str, Path]
                   ) -> dict[str, tuple[list[list[int]], list[list[float]]]]:
    results = {}
    for arch, model_dir in model_dirs.items():
        tokens, logprobs, _ = _run(model_dir)
        results[arch] = (tokens, logprobs)
    return results


@pytest.mark.parametrize(("arch", "parallel"), CASES,
                         ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in p.items())}"
                              for a, p in CASES])
def test_parallel_group_matches_one_process(
        arch: str, parallel: dict[str, object], model_dirs: dict[str, Path],
        single_process: dict[str, tuple[list[list[int]], list[list[float]]]]) -> None:
    tokens, logprobs, llm = _run(model_dirs[arch], **parallel)
    expected_tokens, expected_logprobs = single_process[arch]
    assert tokens == expected_tokens
    for got, expected in zip(logprobs, expected_logprobs, strict=True):
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4
    core = llm.llm_engine.core
    assert core.scheduler.num_preemptions > 0, "the pool was large enough: no preemption"
    assert core.kv_cache_manager.num_free_blocks == core.kv_cache_manager.num_total_blocks
    workers = llm.llm_engine.workers
    assert workers is not None and workers.processes
    assert [p.exitcode for p in workers.processes] == [0], "the worker did not stop cleanly"


def test_sizes_the_model_cannot_split_are_refused(model_dirs: dict[str, Path]) -> None:
    """4 attention heads do not split over 3 ranks: the error names the numbers, and no
    worker outlives the failed start."""
    with pytest.raises(Exception, match="tensor parallel size 3") as error:
        LLM(str(model_dirs["llama"]), **ENGINE_ARGS, tensor_parallel_size=3)  # type: ignore[arg-type]
    assert "heads" in str(error.value)
    assert not _workers(os.getpid()), "a worker outlived the failed start"


# ---- the served group: faults and shutdown -------------------------------------------------


def _workers(pid: int) -> list[int]:
    """The live spawned processes (multiprocessing's spawn_main) under `pid` (Linux /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.extend(int(child) for child in (task / "children").read_text().split())
    workers = []
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
        except OSError:
            continue  # gone meanwhile
    return [w for w in workers if not _is_zombie(w)]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _worker_pid(server: ServerProcess) -> int:
    """The spawned rank 1: the server's child running the group's worker (not the multiprocessing
    resource tracker)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        workers = _workers(server.process.pid)
        if workers:
            return workers[0]
        time.sleep(0.1)
    raise AssertionError("no worker process under the server")


def _stream_clients(server: ServerProcess, count: int, max_tokens: int,
                    results: list[dict[str, object]], started: threading.Semaphore) -> None:
    async def one(client: httpx.AsyncClient, index: int) -> None:
        body = {"model": MODEL_NAME, "prompt": [20 + index, 30, 40], "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": index % 2 == 0}
        result: dict[str, object] = {"events": []}
        results.append(result)
        if not body["stream"]:
            started.release()
            response = await client.post("/v1/completions", json=body)
            result.update(status=response.status_code, body=response.json(),
                          ended=time.monotonic())
            return
        async with client.stream("POST", "/v1/completions", json=body) as response:
            result["status"] = response.status_code
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events = result["events"]
                    assert isinstance(events, list)
                    events.append(line.removeprefix("data: "))
                    if len(events) == 2:
                        started.release()
        result["ended"] = time.monotonic()

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60, headers={
                "Authorization": f"Bearer {API_KEY}"}) as client:
            await asyncio.gather(*(one(client, i) for i in range(count)),
                                 return_exceptions=True)

    asyncio.run(run())


def _start_clients(server: ServerProcess, count: int, max_tokens: int
                   ) -> tuple[threading.Thread, list[dict[str, object]]]:
    """Run `count` clients (even ones streamed) in a thread; return once each is under way."""
    results: list[dict[str, object]] = []
    started = threading.Semaphore(0)
    clients = threading.Thread(target=_stream_clients,
                               args=(server, count, max_tokens, results, started), daemon=True)
    clients.start()
    for _ in range(count):
        assert started.acquire(timeout=60), "a client never started"
    return clients, results


def test_killed_worker_fails_every_client_and_ends_the_server(
        long_context_llama_dir: Path, tmp_path: Path) -> None:
    """2000-token answers (of ~10 ms steps) are all still running when the worker dies."""
    with serve_process(long_context_llama_dir, tmp_path / "server.log",
                       "--tensor-parallel-size", "2", "--max-num-seqs", "8") as server:
        worker = _worker_pid(server)
        clients, results = _start_clients(server, 4, 2000)
        os.kill(worker, signal.SIGKILL)
        killed_at = time.monotonic()
        assert _health_turns_503(server), "/health never said 503 before the exit"
        clients.join(timeout=10)
        assert not clients.is_alive(), "a client still waits on the dead group"
        assert len(results) == 4
        for result in results:
            ended = result.get("ended")
            assert isinstance(ended, float), result
            assert ended - killed_at < 2.0, "a client waited on the dead group"
            if result.get("body") is not None:  # not streamed: the 500 envelope
                assert result["status"] == 500
                assert result["body"]["error"]["code"] == "engine_dead"  # type: ignore[index]
            else:  # streamed: an error event, then [DONE]
                events = result["events"]
                assert isinstance(events, list) and events[-1] == "[DONE]"
                assert json.loads(events[-2])["error"]["code"] == "engine_dead"
        assert server.process.wait(timeout=20) != 0
        assert not Path(f"/proc/{worker}").exists() or _is_zombie(worker)
    assert "parallel group broken" in server.log_text()


def test_hung_worker_breaks_the_group_after_the_distributed_timeout(
        long_context_llama_dir: Path, tmp_path: Path) -> None:
    """A stopped (SIGSTOP) worker never answers: the step's collective gives up after
    --distributed-timeout, the clients get their errors, and the server exits non-zero,
    killing the hung worker on its way out."""
    with serve_process(long_context_llama_dir, tmp_path / "server.log",
                       "--tensor-parallel-size", "2", "--distributed-timeout", "2") as server:
        worker = _worker_pid(server)
        clients, results = _start_clients(server, 2, 2000)
        os.kill(worker, signal.SIGSTOP)
        stopped_at = time.monotonic()
        clients.join(timeout=30)
        assert not clients.is_alive(), "a client still waits on the hung group"
        for result in results:
            ended = result.get("ended")
            assert isinstance(ended, float) and ended - stopped_at < 2.0 + 3.0, result
        assert server.process.wait(timeout=30) != 0
        assert not Path(f"/proc/{worker}").exists() or _is_zombie(worker)
    assert "WorkerGroupError" in server.log_text()


def _health_turns_503(server: ServerProcess) -> bool:
    """Poll /health until it says 503 (True) or the server is gone (False)."""
    while server.process.poll() is None:
        try:
            if httpx.get(f"{server.base_url}/health", timeout=1).status_code == 503:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    return False


def test_sigterm_stops_the_group_cleanly(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with serve_process(model_dirs["llama"], tmp_path / "server.log",
                       "--tensor-parallel-size", "2", "--max-num-seqs", "8") as server:
        worker = _worker_pid(server)
        clients, results = _start_clients(server, 2, 64)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        clients.join(timeout=10)
        assert all(r["status"] == 200 for r in results)
        assert not Path(f"/proc/{worker}").exists() or _is_zombie(worker)
    assert "parallel group stopped" in server.log_text()
    assert "; tensor parallel 2 x pipeline parallel 1 over gloo" in server.log_text()


def test_torchrun_world_serves_like_one_process(model_dirs: dict[str, Path],
                                                tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m server serve MODEL --tensor-parallel-size 2`: rank 0
    serves HTTP, rank 1 runs the model only; the greedy tokens are one process's, and
    SIGTERM to torchrun (which signals both ranks) drains rank 0, which then stops rank 1."""
    prompt = PROMPTS[0]
    with LLM(str(model_dirs["qwen2"]), **ENGINE_ARGS) as llm:  # type: ignore[arg-type]
        expected = list(llm.generate([prompt], SamplingParams(
            temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True))[0].outputs[0].token_ids)
    port = _free_port()
    log = tmp_path / "torchrun.log"
    command = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
               "--nproc-per-node", "2", "-m", "server", "serve", str(model_dirs["qwen2"]),
               "--tensor-parallel-size", "2", "--dtype", "float32", "--device", "cpu",
               "--port", str(port), "--served-model-name", MODEL_NAME]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_process_healthy(ServerProcess(process, f"http://127.0.0.1:{port}", log))
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": NUM_TOKENS,
            "temperature": 0.0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True})
        assert reply.status_code == 200, reply.text
        tokens = reply.json()["choices"][0]["logprobs"]["tokens"]  # "token_id:N" each
        assert [int(t.removeprefix("token_id:")) for t in tokens] == expected
        # torchrun passes SIGTERM to both ranks: rank 0 drains and stops rank 1, which waits
        # for that (torchrun itself then exits non-zero, as it does on any signal)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        text = log.read_text()
        assert "parallel group stopped" in text and "rank 1 stopping" in text, text[-3000:]
        assert "rank 1 failed" not in text
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)

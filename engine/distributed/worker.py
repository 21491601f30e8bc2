"""A worker rank (1..N-1): load this rank's shards, size the same KV pool as rank 0, then run
the model calls rank 0 announces until told to stop. It schedules and samples nothing."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.distributed.group import init_ranks
from engine.distributed.messages import Channel, ComputeLogits, ForwardStep, Shutdown
from engine.distributed.parallel import Parallel
from engine.loader import load_model
from engine.model_runner import ModelRunner
from engine.model_source import resolve_model_dir

logger = logging.getLogger(__name__)

_PARENT_POLL_S = 0.2


def worker_main(rank: int, world_size: int, init_method: str, config: EngineConfig,
                model_dir: str, log_level: int = logging.INFO) -> None:
    """The entry point of a spawned rank; exits 1 on any failure (rank 0 notices)."""
    _die_with_parent()
    # a signal to the whole process group (Ctrl-C, systemd, torchrun) must not end a worker
    # under a draining rank 0: rank 0 stops the workers once it has drained
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    try:
        parallel = init_ranks(rank, world_size, init_method, config.parallel,
                              config.model.device)
        run_worker(parallel, config, model_dir)
    except BaseException:
        logger.exception("rank %d failed", rank)
        sys.exit(1)
    _leave()


def _leave() -> None:
    """Leave the process groups and end this process at once, exit code 0. The interpreter's
    own teardown is skipped on purpose: it destroys torch's C++ state while communication
    threads of the groups may still be joinable, which ends the process in std::terminate
    (exit -6) now and then. A worker has nothing left to write but its log."""
    if dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve_worker_rank(config: EngineConfig) -> None:
    """A rank other than 0 of a world torchrun started (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT): join it and serve rank 0's messages until it stops."""
    model = config.model.model
    if model is None:
        from engine.default_model import ensure_default_model

        model = str(ensure_default_model())
    worker_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", config,
                str(resolve_model_dir(model)), logging.getLogger().level)


def run_worker(parallel: Parallel, config: EngineConfig, model_dir: str) -> None:
    """Load, size the KV cache (agreeing with every rank), then serve rank 0's messages."""
    from engine.llm_engine import model_max_len  # the same limit rank 0 computes

    model = config.model
    loaded = load_model(model_dir, dtype=model.dtype, device=model.device,
                        allow_pickle=model.allow_pickle,
                        trust_remote_code=model.trust_remote_code, tokenizer=model.tokenizer,
                        attn_backend=model.attention_backend, quantization=model.quantization,
                        parallel=parallel)
    runner = ModelRunner(loaded, config, model_max_len(loaded, model.max_model_len))
    logger.info("rank %d ready: %d KV blocks", parallel.rank, runner.num_blocks)
    WorkerLoop(runner, Channel(parallel.control_group, config.parallel.distributed_timeout_s)
               ).run()


class WorkerLoop:
    def __init__(self, runner: ModelRunner, channel: Channel) -> None:
        self.runner = runner
        self.channel = channel
        self.model = runner.model
        self.parallel = self.model.parallel
        self.hidden_size = int(self.model.hf_config.hidden_size)

    def run(self) -> None:
        with torch.inference_mode():
            while True:
                message = self.channel.receive()
                if isinstance(message, Shutdown):
                    break
                if isinstance(message, ForwardStep):
                    self.forward(message)
                elif isinstance(message, ComputeLogits):
                    self.compute_logits(message.num_rows)
        logger.info("rank %d stopping", self.parallel.rank)

    def forward(self, step: ForwardStep) -> None:
        runner = self.runner
        device = runner.device
        caches = runner.scratch_kv_caches() if step.scratch else runner.kv_caches
        metadata = step.metadata(device)
        metadata.decode_plan = runner.plan_decode(metadata, caches)
        input_ids = torch.tensor(step.input_ids, dtype=torch.long, device=device)
        positions = torch.tensor(step.positions, dtype=torch.long, device=device)
        self.model(input_ids, positions, caches, metadata)

    def compute_logits(self, num_rows: int) -> None:
        """This rank's vocabulary slice of the LM head over rank 0's rows (first stage only:
        the head lives there)."""
        if not self.parallel.is_first_stage:
            return
        rows = torch.empty(num_rows, self.hidden_size, dtype=self.runner.dtype,
                           device=self.runner.device)
        self.parallel.broadcast_from_first(rows)
        self.model.compute_logits(rows)


def _die_with_parent() -> None:
    """End this process soon after its parent, however the parent ends (SIGKILL included), so
    a worker never outlives the engine: a thread watches for this process being re-parented.
    (Linux's PDEATHSIG would fire when the spawning *thread* ends, which the engine's loading
    thread does.)"""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="pagedserve-parent-watch", daemon=True).start()

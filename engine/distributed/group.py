"""Starting, watching and stopping a parallel group. Rank 0 (the engine's process) spawns the
other ranks with torch.multiprocessing, or joins a world that torchrun started; either way
every rank then joins the same process groups (init_ranks) and loads only its shards."""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import EngineConfig, ParallelConfig
from engine.distributed.messages import Channel, Shutdown
from engine.distributed.parallel import Parallel
from engine.errors import InvalidRequestError

logger = logging.getLogger(__name__)

# the control group's timeout: idle workers wait on it for the next step without limit
_CONTROL_TIMEOUT = timedelta(days=365)
_JOIN_TIMEOUT = timedelta(minutes=10)  # for every rank to start and join the world
_LEAVE_TIMEOUT_S = 10.0  # for workers to leave after the shutdown message


def torchrun_rank() -> int | None:
    """This process's rank when torchrun (or another launcher) set the environment, else
    None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ else None


def init_ranks(rank: int, world_size: int, init_method: str, config: ParallelConfig,
               device: str) -> Parallel:
    """Join the world and build the groups every rank builds, in the same order: one TP group
    per stage, and the control group. Sets this rank's CUDA device and CPU threads."""
    if world_size != config.world_size:
        raise InvalidRequestError(
            f"the world has {world_size} ranks, tensor x pipeline parallel size is "
            f"{config.tensor_parallel_size} x {config.pipeline_parallel_size}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    else:  # each rank its share of the cores: together they never oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # joining waits for every rank to start and import (slow machines, other nodes); the
    # groups the steps use give up on a hung peer after distributed_timeout_s
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method, rank=rank,
                            world_size=world_size, timeout=_JOIN_TIMEOUT)
    step_timeout = timedelta(seconds=config.distributed_timeout_s)
    tp = config.tensor_parallel_size
    tp_groups = [dist.new_group(list(range(stage * tp, (stage + 1) * tp)), timeout=step_timeout)
                 for stage in range(config.pipeline_parallel_size)]
    stages = dist.new_group(list(range(world_size)), timeout=step_timeout)  # hidden states
    control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)
    pp_rank, tp_rank = divmod(rank, tp)
    return Parallel(tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank,
                    pp_size=config.pipeline_parallel_size,
                    expert_parallel=config.enable_expert_parallel, tp_group=tp_groups[pp_rank],
                    stage_group=stages, control_group=control)


class WorkerGroup:
    """Rank 0's handle on the group: its Parallel, the channel to the workers, and the worker
    processes it spawned (none under torchrun, whose agent watches the ranks itself)."""

    def __init__(self, parallel: Parallel, processes: list[BaseProcess],
                 timeout_s: float) -> None:
        self.parallel = parallel
        self.channel = Channel(parallel.control_group, timeout_s)
        self.processes = processes
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None

    @classmethod
    def start(cls, config: EngineConfig, model_dir: Path) -> WorkerGroup:
        """Spawn ranks 1..N-1 (or join torchrun's world as rank 0) and join the groups."""
        parallel_config = config.parallel
        world_size = parallel_config.world_size
        processes: list[BaseProcess] = []
        if torchrun_rank() is not None:
            init_method = "env://"
            world_size = int(os.environ.get("WORLD_SIZE", world_size))
        else:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            context = mp.get_context("spawn")
            from engine.distributed.worker import worker_main  # the spawned processes' entry

            for rank in range(1, world_size):
                process = context.Process(
                    target=worker_main, name=f"pagedserve-rank{rank}", daemon=True,
                    args=(rank, world_size, init_method, config, str(model_dir),
                          logging.getLogger().getEffectiveLevel()))
                process.start()
                processes.append(process)
            logger.info("parallel group: tensor parallel %d x pipeline parallel %d; spawned "
                        "ranks 1-%d (pids %s)", parallel_config.tensor_parallel_size,
                        parallel_config.pipeline_parallel_size, world_size - 1,
                        ", ".join(str(p.pid) for p in processes))
        try:
            parallel = init_ranks(0, world_size, init_method, parallel_config,
                                  config.model.device)
        except BaseException:
            _kill(processes)
            raise
        return cls(parallel, processes, parallel_config.distributed_timeout_s)

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """Call on_failure(message) from a thread as soon as a spawned worker exits while the
        group is not closing."""
        if not self.processes or self._watcher is not None:
            return

        def watch() -> None:
            by_sentinel = {p.sentinel: p for p in self.processes}
            ready = multiprocessing.connection.wait(list(by_sentinel))
            if self._closing.is_set():
                return
            process = by_sentinel[ready[0]]  # type: ignore[index]
            process.join(0.1)
            message = f"{process.name} (pid {process.pid}) exited with code {process.exitcode}"
            logger.error("parallel group broken: %s", message)
            on_failure(message)

        self._watcher = threading.Thread(target=watch, name="pagedserve-workers", daemon=True)
        self._watcher.start()

    def close(self, healthy: bool = True) -> None:
        """Stop the workers: a shutdown message when the group still works (`healthy`), then
        wait for them, killing any that stay; leave the process groups."""
        if self._closing.is_set():
            return
        self._closing.set()
        if healthy and all(p.is_alive() for p in self.processes):
            sender = threading.Thread(target=self._send_shutdown, daemon=True)
            sender.start()
            sender.join(_LEAVE_TIMEOUT_S)
        for process in self.processes:
            process.join(_LEAVE_TIMEOUT_S if healthy else 0.5)
        _kill(self.processes)
        if dist.is_initialized() and healthy:
            dist.destroy_process_group()
        logger.info("parallel group stopped")

    def _send_shutdown(self) -> None:
        try:
            self.channel.send(Shutdown())
        except Exception as exc:  # a worker died meanwhile: it is killed below anyway
            logger.warning("the workers did not take the shutdown message: %r", exc)


def _kill(processes: list[BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            logger.warning("killing %s (pid %s)", process.name, process.pid)
            process.kill()
            process.join(5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])

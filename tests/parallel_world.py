"""A world of real processes (torch.distributed over gloo on 127.0.0.1) that runs tensor and
pipeline parallel models side by side with single-process ones: every rank loads its part of
a checkpoint and runs the same paged steps (a prefill of two sequences, then decodes); rank 0
compares its logits with the whole model's. One world serves many cases, since spawning
processes costs seconds."""

from __future__ import annotations

import random
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.attention.base import AttentionMetadata
from engine.distributed.parallel import SINGLE, Parallel
from engine.loader import load_model
from engine.models import kv_cache_spec
from engine.models.base import CausalLM, KVCaches
from tests.tiny_models import VOCAB_SIZE

WORLD_SIZE = 2
BLOCK_SIZE = 4
NUM_BLOCKS = 8
# (block ids, prompt length) per sequence: 11 + 9 prompt tokens, then DECODE_STEPS decodes
SEQUENCES = (([0, 2, 4, 6], 11), ([7, 5, 3, 1], 9))
DECODE_STEPS = 2


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    model_dir: str
    tp_size: int = 1
    pp_size: int = 1
    expert_parallel: bool = False
    quantization: str | None = None  # of the parallel model; the reference stays float32
    atol: float = 1e-4
    check_argmax: bool = True  # off where quantization moves near-ties


@dataclass(frozen=True, slots=True)
class CaseResult:
    name: str
    max_abs_diff: float
    same_argmax: bool
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff < self.atol and self.same_argmax


def run_world(cases: list[Case], timeout_s: float = 240) -> list[CaseResult]:
    """Run `cases` in a spawned world of WORLD_SIZE ranks; rank 0's comparisons. Raises with
    the failing rank's traceback if any rank failed."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank_main, args=(rank, port, cases, results))
                 for rank in range(WORLD_SIZE)]
    for process in processes:
        process.start()
    try:
        reports = [results.get(timeout=timeout_s) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    errors = [report for _, report in reports if isinstance(report, str)]
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return next(report for rank, report in reports if rank == 0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rank_main(rank: int, port: int, cases: list[Case], results: mp.Queue) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
        tp_group = dist.new_group(list(range(WORLD_SIZE)))
        compared = [_run_case(case, rank, tp_group) for case in cases]
        results.put((rank, [result for result in compared if result is not None]))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_case(case: Case, rank: int, tp_group: dist.ProcessGroup) -> CaseResult | None:
    parallel = Parallel(tp_rank=rank % case.tp_size, tp_size=case.tp_size,
                        pp_rank=rank // case.tp_size, pp_size=case.pp_size,
                        expert_parallel=case.expert_parallel,
                        tp_group=tp_group if case.tp_size > 1 else None,
                        stage_group=dist.group.WORLD)
    logits = run_steps(_load(case.model_dir, parallel, case.quantization))
    if rank != 0:
        return None
    expected = run_steps(_load(case.model_dir, SINGLE, None))
    actual_all = torch.cat([step for step in logits if step is not None])
    expected_all = torch.cat([step for step in expected if step is not None])
    assert actual_all.shape == expected_all.shape, (case.name, actual_all.shape)
    return CaseResult(case.name, (actual_all - expected_all).abs().max().item(),
                      not case.check_argmax
                      or bool(torch.equal(actual_all.argmax(-1), expected_all.argmax(-1))),
                      case.atol)


def _load(model_dir: str, parallel: Parallel, quantization: str | None) -> CausalLM:
    return load_model(model_dir, dtype="float32", device="cpu", quantization=quantization,
                      parallel=parallel).model


@torch.inference_mode()
def run_steps(model: CausalLM) -> list[torch.Tensor | None]:
    """Logits [num_tokens, vocab_size] of each step (None off the first pipeline stage): the
    prompts' prefill, then DECODE_STEPS decodes of fixed tokens, in a paged cache."""
    spec = kv_cache_spec(model.hf_config, model.parallel)
    shape = (NUM_BLOCKS, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim)
    kv_caches: KVCaches = [(torch.zeros(shape), torch.zeros(shape))
                           for _ in range(spec.num_layers)]
    rng = random.Random(0)  # the same tokens on every rank
    prompts = [[rng.randrange(VOCAB_SIZE) for _ in range(length)] for _, length in SEQUENCES]
    steps = [[(0, prompt) for prompt in prompts]]
    for step in range(DECODE_STEPS):
        steps.append([(len(prompt) + step, [rng.randrange(VOCAB_SIZE)]) for prompt in prompts])
    logits: list[torch.Tensor | None] = []
    for step_seqs in steps:
        input_ids, positions, metadata = _batch(step_seqs)
        hidden_states = model(input_ids, positions, kv_caches, metadata)
        is_first = model.parallel.is_first_stage
        logits.append(model.compute_logits(hidden_states) if is_first else None)
    return logits


def _batch(seqs: list[tuple[int, list[int]]]
           ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """input_ids, positions and metadata of sequences (num_cached, new_token_ids) in the
    blocks of SEQUENCES."""
    input_ids, positions, slots, cu_seqlens_q = [], [], [], [0]
    for (block_ids, _), (num_cached, new_ids) in zip(SEQUENCES, seqs, strict=True):
        for position in range(num_cached, num_cached + len(new_ids)):
            positions.append(position)
            slots.append(block_ids[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE)
        input_ids.extend(new_ids)
        cu_seqlens_q.append(cu_seqlens_q[-1] + len(new_ids))
    query_lens = [len(new_ids) for _, new_ids in seqs]
    seq_lens = [num_cached + len(new_ids) for num_cached, new_ids in seqs]
    metadata = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        cu_seqlens_q=torch.tensor(cu_seqlens_q, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([block_ids for block_ids, _ in SEQUENCES], dtype=torch.int32),
        max_seqlen_q=max(query_lens), max_seqlen_k=max(seq_lens),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
    return (torch.tensor(input_ids, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.int64), metadata)

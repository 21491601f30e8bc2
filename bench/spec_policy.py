"""What verifying speculative tokens costs: the engine's decode step timed with 1 + k tokens per
row against 1 token per row, at several batch sizes, on the real runner and KV cache.

    python bench/spec_policy.py [--model DIR] [--dtype bfloat16] [--batch-sizes 1,2,4,8,16]
        [--num-tokens 1,2,4,6] [--context 300] [--repeats 7] [--threads 2]

Prints, per batch size, the step time for each tokens-per-row count, its ratio to one token per
row, and the marginal cost c of one more verified token per row as a fraction of a one-token
step (the least-squares slope of ratio against k). engine/spec_decode/policy.py uses c: a
sequence speculates only where its acceptance rate beats it, and the batch size where c grows
large is where `disable_by_batch_size` belongs. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRow
from engine.sequence import Sequence


def decode_rows(batch_size: int, tokens_per_row: int, context: int, block_size: int,
                vocab_size: int) -> tuple[list[ScheduledRow], dict[str, list[int]]]:
    """batch_size decode rows of `context` tokens each verifying tokens_per_row - 1
    proposals, on disjoint blocks of the pool."""
    params = SamplingParams(temperature=0.0, max_tokens=context)
    blocks_per_row = -(-(context + tokens_per_row) // block_size)
    rows, block_ids = [], {}
    for index in range(batch_size):
        prompt = [(7 * index + 13 * position) % vocab_size for position in range(context)]
        sequence = Sequence(f"row-{index}", prompt, params, 0.0, context)
        sequence.num_computed_tokens = context - 1
        first = 1 + index * blocks_per_row
        block_ids[sequence.sequence_id] = list(range(first, first + blocks_per_row))
        proposals = tuple(prompt[:tokens_per_row - 1])
        rows.append(ScheduledRow(sequence, context - 1, context + tokens_per_row - 1,
                                 proposals))
    return rows, block_ids


def time_step(engine: LLMEngine, rows: list[ScheduledRow], block_ids: dict[str, list[int]],
              repeats: int) -> float:
    runner = engine.core.runner
    runner.execute(rows, block_ids)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.execute(rows, block_ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def slope(ks: list[int], ratios: list[float]) -> float:
    """Least-squares slope of ratio - 1 against k, through the origin."""
    return sum(k * (r - 1.0) for k, r in zip(ks, ratios, strict=True)) / sum(k * k for k in ks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model dir (default: the embedded one)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--num-tokens", default="1,2,4,6", help="tokens per row (1 + k)")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    num_tokens = [int(n) for n in args.num_tokens.split(",")]
    assert num_tokens[0] == 1, "the first count is the one-token baseline"
    block_size = 16
    blocks_needed = max(batch_sizes) * -(-(args.context + max(num_tokens)) // block_size) + 1
    engine = LLMEngine(EngineConfig.from_kwargs(
        args.model, dtype=args.dtype, device="cpu", num_blocks=blocks_needed,
        block_size=block_size))
    vocab_size = engine.core.runner.vocab_size
    print(f"model {engine.loaded.model_dir}, {args.dtype}, context {args.context}, "
          f"{args.threads} threads")
    print("batch | " + " | ".join(f"{n} tok/row ms (ratio)" for n in num_tokens) + " | c")
    for batch_size in batch_sizes:
        times = [time_step(engine, *decode_rows(batch_size, n, args.context, block_size,
                                                vocab_size), args.repeats)
                 for n in num_tokens]
        ratios = [t / times[0] for t in times]
        cells = " | ".join(f"{1000 * t:.1f} ({r:.2f})" for t, r in zip(times, ratios,
                                                                         strict=True))
        print(f"{batch_size} | {cells} | {slope([n - 1 for n in num_tokens[1:]], ratios[1:]):.3f}",
              flush=True)


if __name__ == "__main__":
    main()

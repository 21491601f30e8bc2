"""Roofline: this machine's memory bandwidth and matmul rate, and the speed limits they put on
a model's decode (bandwidth-bound at batch 1) and on a serving workload (compute-bound).

    python bench/roofline.py [--model DIR] [--dtype bfloat16] [--threads N]
                             [--prompt-len 230] [--output-len 128] [--skinny] [--json OUT]

Bandwidth is measured twice: a large tensor copy, counted as bytes read + bytes written
(STREAM "copy"), and a sum over a 2 GiB buffer, bytes read only: decode reads its weights and
writes next to nothing, so the read figure is the one its bound is made of.
The matmul rate is a square GEMM (2 * n^3 flops). The model's figures come from config.json
alone: weight bytes read per decoded token (every weight except the input embedding table;
the LM head counts, tied or not) and flops per prompt and per output token.
--skinny also times F.linear at the model's own shapes for M = 1, 16, 256 rows in bf16 and
fp32: the decode matmuls are skinny, and their efficiency is what batch decode lives on.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the roofline needs from config.json."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool

    @classmethod
    def from_config(cls, path: Path) -> ModelShape:
        config = json.loads((path / "config.json").read_text())
        heads = config["num_attention_heads"]
        return cls(hidden_size=config["hidden_size"],
                   intermediate_size=config["intermediate_size"],
                   num_layers=config["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   vocab_size=config["vocab_size"],
                   tied=bool(config.get("tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each matmul, with q/k/v and gate/up fused."""
        h, q = self.hidden_size, self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h),
                "gate_up_proj": (h, 2 * self.intermediate_size),
                "down_proj": (self.intermediate_size, h), "lm_head": (h, self.vocab_size)}

    @property
    def layer_params(self) -> int:
        """Matmul weights of all decoder layers (norms and biases are noise)."""
        shapes = self.linear_shapes()
        per_layer = sum(i * o for name, (i, o) in shapes.items() if name != "lm_head")
        return per_layer * self.num_layers

    @property
    def lm_head_params(self) -> int:
        return self.hidden_size * self.vocab_size


def _timed(fn: Callable[[], object], min_seconds: float = 0.5) -> float:
    """Seconds per call: warm up, then repeat until min_seconds have passed; best of 3."""
    fn()
    best = float("inf")
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / 3:
                break
        best = min(best, elapsed / calls)
    return best


def copy_bandwidth(num_bytes: int = 512 << 20) -> float:
    """GB/s of a large copy, read + write bytes counted."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src))
    return 2 * num_bytes / seconds / 1e9


def read_bandwidth(num_bytes: int = 2 << 30, threads: int | None = None,
                   repeats: int = 5) -> float:
    """GB/s of summing an fp32 buffer far larger than the caches, best of `repeats`, on
    `threads` intra-op threads (default: torch's, which is also what the server runs with)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        buffer = torch.ones(num_bytes // 4, dtype=torch.float32)
        buffer.sum()  # warm-up: page faults and the thread team
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - start)
        del buffer
    finally:
        torch.set_num_threads(previous)
    return num_bytes / best / 1e9


def decode_weight_bytes(shape: ModelShape, dtype: torch.dtype) -> int:
    """Weight bytes one batch-1 decode step reads: every matmul weight, the LM head included
    (the input embedding is a gather of one row)."""
    return (shape.layer_params + shape.lm_head_params) * dtype.itemsize


def gemm_rate(n: int, dtype: torch.dtype) -> float:
    """GFLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    seconds = _timed(lambda: torch.mm(a, b))
    return 2 * n**3 / seconds / 1e9


def skinny_rates(shape: ModelShape, rows: tuple[int, ...]) -> list[dict[str, object]]:
    """F.linear at the model's shapes: GFLOP/s and the weight-read GB/s it implies."""
    results: list[dict[str, object]] = []
    for name, (in_features, out_features) in shape.linear_shapes().items():
        for dtype_name, dtype in _DTYPES.items():
            weight = torch.randn(out_features, in_features).to(dtype)
            for m in rows:
                x = torch.randn(m, in_features).to(dtype)
                seconds = _timed(lambda x=x, weight=weight: F.linear(x, weight), 0.3)
                flops = 2 * m * in_features * out_features
                results.append({"layer": name, "dtype": dtype_name, "rows": m,
                                "ms": seconds * 1e3, "gflops": flops / seconds / 1e9,
                                "weight_gb_s": weight.nbytes / seconds / 1e9})
    return results


def model_roofline(shape: ModelShape, dtype: torch.dtype, bandwidth: float, rate: float,
                   prompt_len: int, output_len: int) -> dict[str, float]:
    """Batch-1 decode bound (weights streamed once per token) and the serving bound (every
    flop of the workload done at the GEMM rate), in tokens/s."""
    weight_bytes = decode_weight_bytes(shape, dtype)
    prefill_flops = 2 * shape.layer_params  # per prompt token: logits only for the last
    decode_flops = 2 * (shape.layer_params + shape.lm_head_params)  # per output token
    flops_per_output = prefill_flops * prompt_len / output_len + decode_flops
    return {"decode_weight_gb": weight_bytes / 1e9,
            "prefill_gflop_per_token": prefill_flops / 1e9,
            "decode_gflop_per_token": decode_flops / 1e9,
            "batch1_decode_bound_tok_s": bandwidth * 1e9 / weight_bytes,
            "serving_bound_output_tok_s": rate * 1e9 / flops_per_output,
            "prefill_bound_tok_s": rate * 1e9 / prefill_flops}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model directory (default: the embedded default model)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--prompt-len", type=int, default=230)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--skinny", action="store_true",
                        help="also time F.linear at the model's shapes, M = 1, 16, 256")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else _default_model_dir()
    shape = ModelShape.from_config(model_dir)
    dtype = _DTYPES[args.dtype]
    results: dict[str, object] = {"threads": args.threads, "dtype": args.dtype,
                                  "model": str(model_dir), "shape": asdict(shape)}
    results["copy_gb_s"] = copy_bandwidth()
    results["read_gb_s"] = bandwidth = read_bandwidth()
    results["gemm_gflops"] = rate = gemm_rate(args.gemm_size, dtype)
    results.update(model_roofline(shape, dtype, bandwidth, rate, args.prompt_len,
                                  args.output_len))
    print(f"{args.threads} threads, {args.dtype}, {model_dir.name}")
    for name, value in results.items():
        if isinstance(value, float):
            print(f"  {name:30s} {value:10.2f}")
    if args.skinny:
        results["skinny"] = skinny = skinny_rates(shape, (1, 16, 256))
        print(f"  {'layer':14s} {'dtype':9s} {'rows':>5s} {'ms':>8s} {'GFLOP/s':>8s} "
              f"{'weight GB/s':>11s}")
        for row in skinny:
            print(f"  {row['layer']:14s} {row['dtype']:9s} {row['rows']:5d} {row['ms']:8.3f} "
                  f"{row['gflops']:8.1f} {row['weight_gb_s']:11.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


def _default_model_dir() -> Path:
    from engine.default_model import ensure_default_model

    return Path(ensure_default_model())


if __name__ == "__main__":
    main()

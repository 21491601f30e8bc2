"""Roofline: this machine's memory bandwidth and matmul rate, and the speed limits they put on
a model's decode (bandwidth-bound at batch 1) and on a serving workload (compute-bound).

    python bench/roofline.py [--model DIR] [--dtype bfloat16] [--threads N]
                             [--prompt-len 230] [--output-len 128] [--skinny]
                             [--prefill] [--prefill-rows 512,2048] [--int4] [--json OUT]

Bandwidth is measured twice: a large tensor copy, counted as bytes read + bytes written
(STREAM "copy"), and a sum over a 2 GiB buffer, bytes read only: decode reads its weights and
writes next to nothing, so the read figure is the one its bound is made of.
The matmul rate is a square GEMM (2 * n^3 flops). The model's figures come from config.json
alone: weight bytes read per decoded token (every weight except the input embedding table;
the LM head counts, tied or not) and flops per prompt and per output token.
--skinny also times F.linear at the model's own shapes for M = 1, 16, 256 rows in bf16 and
fp32: the decode matmuls are skinny, and their efficiency is what batch decode lives on.
--prefill times the decoder's matmuls (qkv, o, gate_up, down; not the LM head, which prefill
runs for one row) at prefill's row counts in --dtype, twice: plain F.linear, and the engine's
own Linear as the loader leaves it (oneDNN-prepacked where `can_prepack` says so, else the
same F.linear, with the reason shown). Each rate is also a fraction of the square-GEMM rate,
and the model's prefill time per token follows from each set of rates. The engine's MLP runs
long prefills in slices of engine.models.llama.MLP_CHUNK_TOKENS rows, so for gate_up and
down that row count is the one it meets.
--int4 times the int4 matmul (`--quantization int4`: the portable kernel with int8 activations
where it runs, else the dequantizing reference) at each matmul shape for M = 1, 4, 16 rows,
against float32 F.linear and against the portable kernel with float activations (the
alternative it replaced): the packed bytes (weights, scales, zeros) it reads per call as GB/s
and as a fraction of the read bandwidth, and the batch-1 decode bound these times and the
bandwidth put on the model (tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.kernels import w4a16
from engine.layers.linear import PREPACK_ENV, Linear, can_prepack

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PREFILL_LAYERS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # the LM head: 1 row


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


class BandwidthProbe:
    """Read bandwidth over a buffer far larger than the caches, kept for the probe's life, so
    that a measure costs only its sums: small enough a buffer (bench/decode_profile.py's 512
    MB) and one fits between two decode steps."""

    def __init__(self, num_bytes: int) -> None:
        self.buffer = torch.ones(num_bytes // 4, dtype=torch.float32)
        self.buffer.sum()  # warm-up: page faults and the thread team

    def __call__(self, repeats: int = 2) -> float:
        """GB/s of summing the buffer, best of `repeats`."""
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.buffer.sum()
            best = min(best, time.perf_counter() - start)
        return self.buffer.numel() * 4 / best / 1e9


def read_bandwidth(num_bytes: int = 2 << 30, threads: int | None = None,
                   repeats: int = 5) -> float:
    """GB/s of summing an fp32 buffer far larger than the caches, best of `repeats`, on
    `threads` intra-op threads (default: torch's, which is also what the server runs with)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return BandwidthProbe(num_bytes)(repeats)
    finally:
        torch.set_num_threads(previous)


def decode_weight_bytes(shape: ModelShape, dtype: torch.dtype) -> int:
    """Weight bytes one batch-1 decode step reads: every matmul weight, the LM head included
    (the input embedding is a gather of one row)."""
    return (shape.layer_params + shape.lm_head_params) * dtype.itemsize


def gemm_rate(n: int, dtype: torch.dtype) -> float:
    """GFLOP/s of an n x n x n matmul, the right operand laid out as a linear layer's weight
    (transposed): CPUs without native bf16 take a path ~15x slower for a row-major one."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    seconds = _timed(lambda: torch.mm(a, b.t()))
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


def prepack_skip_reason(dtype: torch.dtype) -> str | None:
    """Why the engine would not prepack a CPU weight of `dtype`; None where it would."""
    if can_prepack(dtype, torch.device("cpu")):
        return None
    if os.environ.get(PREPACK_ENV, "1") == "0":
        return f"{PREPACK_ENV}=0"
    if dtype != torch.bfloat16:
        return f"{str(dtype).removeprefix('torch.')} runs F.linear"
    if not torch.backends.mkldnn.is_available():
        return "no oneDNN in this torch"
    return "CPU lacks native bf16"


def engine_linear(weight: torch.Tensor) -> Linear:
    """The engine's layer over `weight` as the loader leaves it: prepacked where it prepacks
    (as prepack_linears does to each loaded layer), else running F.linear on the dense weight."""
    if prepack_skip_reason(weight.dtype) is None:
        return Linear.packed_from(weight)
    return Linear.over(weight)


INT4_ROWS = (1, 4, 16)


def int4_rates(shape: ModelShape, bandwidth: float,
               rows: Sequence[int] = INT4_ROWS) -> list[dict[str, object]]:
    """The int4 matmul against float32 F.linear at each of the model's shapes and row
    counts: ms per call, the GB/s of packed bytes it reads, and that as a fraction of the read
    bandwidth."""
    results: list[dict[str, object]] = []
    with torch.inference_mode():
        for name, (in_features, out_features) in shape.linear_shapes().items():
            weight = torch.randn(out_features, in_features) * 0.02
            quantized = w4a16.quantize_weight(weight)
            num_bytes = (quantized.packed.nbytes + quantized.kernel_scales.nbytes
                         + quantized.kernel_zero_scaled.nbytes)
            for m in rows:
                x = torch.randn(m, in_features)
                int4_s = _timed(partial(w4a16.linear, x, quantized, None), 0.3)
                float_s = _timed(partial(F.linear, x, weight), 0.3)
                kernel = w4a16.takes_kernel(x, quantized)
                float_kernel_s = (_timed(partial(w4a16.kernel_linear, x, quantized, None), 0.3)
                                  if kernel else None)
                results.append({"layer": name, "rows": m, "int4_ms": int4_s * 1e3,
                                "float32_ms": float_s * 1e3, "speedup": float_s / int4_s,
                                "float_activations_ms": (None if float_kernel_s is None
                                                         else float_kernel_s * 1e3),
                                "kernel": kernel,
                                "int4_gb_s": num_bytes / int4_s / 1e9,
                                "of_read_bandwidth": num_bytes / int4_s / 1e9 / bandwidth})
    return results


def int4_decode_bound(shape: ModelShape, rates: Sequence[dict[str, object]],
                      bandwidth: float) -> dict[str, float]:
    """Batch-1 decode from the int4 matmul times at 1 row (every decoder layer's matmuls and
    the LM head once per token), and the bound the bandwidth alone puts on the same bytes."""
    at_one = {str(r["layer"]): r for r in rates if r["rows"] == 1}
    seconds = sum(float(r["int4_ms"]) / 1e3 * (1 if name == "lm_head" else shape.num_layers)
                  for name, r in at_one.items())
    num_bytes = sum(float(r["int4_gb_s"]) * 1e9 * float(r["int4_ms"]) / 1e3
                    * (1 if name == "lm_head" else shape.num_layers)
                    for name, r in at_one.items())
    return {"int4_matmul_ms_per_token": seconds * 1e3,
            "int4_matmul_bound_tok_s": 1 / seconds,
            "int4_weight_gb_per_token": num_bytes / 1e9,
            "int4_bandwidth_bound_tok_s": bandwidth * 1e9 / num_bytes}


@dataclass(frozen=True, slots=True)
class PrefillRate:
    """One decoder matmul at one prefill row count: F.linear's rate and the engine Linear's."""

    layer: str
    rows: int
    in_features: int
    out_features: int
    torch_gflops: float
    engine_gflops: float
    torch_of_gemm: float  # fractions of the square-GEMM rate of the same run
    engine_of_gemm: float
    not_prepacked_reason: str | None  # None: the engine's layer ran prepacked

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.in_features * self.out_features


def prefill_rates(shape: ModelShape, dtype: torch.dtype, rows: Sequence[int],
                  gemm_gflops: float, min_seconds: float = 1.0) -> list[PrefillRate]:
    """F.linear and the engine's Linear at each decoder matmul shape and row count."""
    skip_reason = prepack_skip_reason(dtype)
    shapes = shape.linear_shapes()
    results: list[PrefillRate] = []
    with torch.inference_mode():
        for name in PREFILL_LAYERS:
            in_features, out_features = shapes[name]
            weight = torch.randn(out_features, in_features).to(dtype)
            layer = engine_linear(weight)
            for m in rows:
                x = torch.randn(m, in_features).to(dtype)  # [num_tokens, in_features]
                flops = 2 * m * in_features * out_features
                torch_s = _timed(partial(F.linear, x, weight), min_seconds)
                engine_s = _timed(partial(layer, x), min_seconds)
                torch_gflops, engine_gflops = flops / torch_s / 1e9, flops / engine_s / 1e9
                results.append(PrefillRate(name, m, in_features, out_features, torch_gflops,
                                           engine_gflops, torch_gflops / gemm_gflops,
                                           engine_gflops / gemm_gflops, skip_reason))
    return results


def prefill_totals(shape: ModelShape, rates: Sequence[PrefillRate],
                   gemm_gflops: float) -> list[dict[str, float]]:
    """Per row count: the model's matmul time per prefill token (sum over the decoder layers of
    2 * in * out flops / rate) at the F.linear rates, the engine's, and the square GEMM's."""
    totals: list[dict[str, float]] = []
    for m in sorted({rate.rows for rate in rates}):
        at_m = [rate for rate in rates if rate.rows == m]
        # per token and per decoder layer stack: a row's flops / rows * num_layers
        flops = [rate.flops / m * shape.num_layers for rate in at_m]
        torch_s = sum(f / (rate.torch_gflops * 1e9) for f, rate in zip(flops, at_m, strict=True))
        engine_s = sum(f / (rate.engine_gflops * 1e9)
                       for f, rate in zip(flops, at_m, strict=True))
        totals.append({"rows": m, "torch_ms_per_token": torch_s * 1e3,
                       "engine_ms_per_token": engine_s * 1e3,
                       "gemm_ms_per_token": sum(flops) / (gemm_gflops * 1e9) * 1e3})
    return totals


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
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES),
                        help="dtype of the weights, the GEMM and --prefill's matmuls")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads (default: torch's)")
    parser.add_argument("--gemm-size", type=int, default=2048,
                        help="n of the square n x n x n GEMM whose rate is the compute peak")
    parser.add_argument("--prompt-len", type=int, default=230,
                        help="prompt tokens per request of the serving bound")
    parser.add_argument("--output-len", type=int, default=128,
                        help="output tokens per request of the serving bound")
    parser.add_argument("--skinny", action="store_true",
                        help="also time F.linear at the model's shapes, M = 1, 16, 256")
    parser.add_argument("--prefill", action="store_true",
                        help="also time the decoder's matmuls at --prefill-rows rows, F.linear "
                             "and the engine's (prepacked) Linear, against the GEMM rate")
    parser.add_argument("--prefill-rows", type=_row_counts, default=(512, 2048),
                        help="comma-separated row counts for --prefill (default: 512,2048)")
    parser.add_argument("--int4", action="store_true",
                        help="also time the int4 matmul at the model's shapes, M = 1, 4, 16, "
                             "against float32 F.linear and the read bandwidth")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    return parser.parse_args()


def _row_counts(text: str) -> tuple[int, ...]:
    try:
        rows = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of ints: {text!r}") from None
    if not rows or min(rows) < 1:
        raise argparse.ArgumentTypeError(f"row counts must be >= 1: {text!r}")
    return rows


def _print_prefill(rates: Sequence[PrefillRate], totals: Sequence[dict[str, float]]) -> None:
    print(f"  {'layer':14s} {'rows':>5s} {'F.linear GFLOP/s':>16s} {'of GEMM':>7s}  "
          f"{'engine GFLOP/s':>14s} {'of GEMM':>7s}  engine Linear")
    for r in rates:
        form = ("prepacked" if r.not_prepacked_reason is None
                else f"not prepacked ({r.not_prepacked_reason})")
        print(f"  {r.layer:14s} {r.rows:5d} {r.torch_gflops:16.1f} {r.torch_of_gemm:7.0%}  "
              f"{r.engine_gflops:14.1f} {r.engine_of_gemm:7.0%}  {form}")
    for t in totals:
        print(f"  prefill matmuls at {t['rows']:.0f} rows: {t['torch_ms_per_token']:.3f} ms/token "
              f"F.linear, {t['engine_ms_per_token']:.3f} engine, "
              f"{t['gemm_ms_per_token']:.3f} at the GEMM rate")


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
    if args.prefill:
        rates = prefill_rates(shape, dtype, args.prefill_rows, rate)
        totals = prefill_totals(shape, rates, rate)
        results["prefill"] = {"rates": [asdict(r) for r in rates], "totals": totals}
        _print_prefill(rates, totals)
    if args.int4:
        results["int4"] = int4 = int4_rates(shape, bandwidth)
        results["int4_decode"] = bound = int4_decode_bound(shape, int4, bandwidth)
        print(f"  {'layer':14s} {'rows':>5s} {'int4 ms':>8s} {'fp32 ms':>8s} {'speedup':>7s} "
              f"{'f-act ms':>8s} {'int4 GB/s':>9s} {'of read bw':>10s}  path")
        for r in int4:
            float_activations = ("-" if r["float_activations_ms"] is None
                                 else f"{r['float_activations_ms']:.3f}")
            print(f"  {r['layer']:14s} {r['rows']:5d} {r['int4_ms']:8.3f} "
                  f"{r['float32_ms']:8.3f} {r['speedup']:7.2f} {float_activations:>8s} "
                  f"{r['int4_gb_s']:9.1f} {r['of_read_bandwidth']:10.0%}  "
                  f"{'kernel' if r['kernel'] else 'dequantize + matmul'}")
        for name, value in bound.items():
            print(f"  {name:30s} {value:10.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


def _default_model_dir() -> Path:
    from engine.default_model import ensure_default_model

    return Path(ensure_default_model())


if __name__ == "__main__":
    main()

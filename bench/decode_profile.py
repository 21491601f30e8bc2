"""Where a batch-1 decode step's time goes, in the running engine: each matmul kind's time per
step, its weight bytes, the bandwidth it streamed them at and that as a fraction of the read
bandwidth measured just before and after the round; then the LM head and the rest of the step.

    python bench/decode_profile.py [--model DIR] [--dtype bfloat16] [--quantization Q]
                                   [--prompt-tokens 230] [--output-tokens 128] [--rounds 3]

Each round times decode steps twice (greedy generations of --output-tokens and of 2 tokens from
the same prompt; their difference over the steps between): once as the engine runs them (what
users see), and once through the decoder-layer modules (the native decode stack off, as it runs
a layer's kernels in one call or four), with the wall-clock time of every Linear's forward,
its Python included, summed per kind (qkv_proj, o_proj, gate_up_proj, down_proj, the LM head).
Only one-row calls count, so the prompt's prefill does not: a step's figure is the mean time
of one-row calls times the layers that make one. The read bandwidth (bench/roofline.py's sum
over a 2 GiB buffer) is taken before and after each round, as this machine's swings by 2x
within minutes. Figures are medians over the rounds. Bytes are each weight's stored bytes (the
packed copy, or the int8/int4 values with their scales and zero points): what a one-row matmul
streams. `PAGEDSERVE_PACKED_BF16=0` in the environment gives bf16's matmuls to oneDNN's call
(engine/kernels/packed_bf16.py), the table from before that kernel.

Last, each round generates once more step by step, the read bandwidth probed (two sums over 512
MB, ~20-35 ms) between every two decode steps, and each step is set against the
roofline of its own bandwidth: the median over the steps whose two probes agree, overall and for
the steps below and above their median bandwidth. Where the bandwidth swings within seconds
(between two levels on the Zen 4 these figures come from), a bound read around a whole round
often belongs to the other level, and only this pairing says how near the step comes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.roofline import BandwidthProbe, read_bandwidth  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.layers.linear import Linear  # noqa: E402

KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def kind_of(name: str) -> str | None:
    """The matmul kind of a Linear's module name; None for any other Linear."""
    leaf = name.rpartition(".")[2]
    if leaf in ("lm_head", "tied_output_head"):
        return "lm_head"
    return leaf if leaf in KINDS else None


def weight_bytes(layer: Linear) -> int:
    """The bytes one call of `layer` reads for its weight: the oneDNN-packed copy, the dense
    weight, or the int8/int4 values with their scales (and zero points)."""
    if layer.int8_weight is not None:
        return layer.int8_weight.nbytes
    if layer.int4_weight is not None:
        return layer.int4_weight.nbytes
    weight = layer.packed_weight if layer.packed_weight is not None else layer.weight
    return weight.numel() * weight.element_size()


class MatmulTimers:
    """Wall-clock time and count of the one-row forward calls of every Linear of `model`,
    summed per kind, through forward pre/post hooks (the LM head's float_forward, which
    compute_logits calls instead, through a wrapper); `remove` takes them off."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes_per_call: dict[str, dict[str, int]] = defaultdict(dict)
        self._started: dict[str, float] = {}
        self._handles = []
        self._wrapped: list[Linear] = []
        for name, module in model.named_modules():
            kind = kind_of(name)
            if kind is None or not isinstance(module, Linear):
                continue
            self.bytes_per_call[kind][name] = weight_bytes(module)
            pre, post = self._pre(name), self._post(name, kind)
            self._handles.append(module.register_forward_pre_hook(pre))
            self._handles.append(module.register_forward_hook(post))
            if kind == "lm_head":
                self._wrap_float_forward(module, pre, post)

    def _wrap_float_forward(self, module: Linear, pre, post) -> None:  # noqa: ANN001
        unwrapped = module.float_forward

        def timed(x: torch.Tensor) -> torch.Tensor:
            pre(module, (x,))
            output = unwrapped(x)
            post(module, (x,), output)
            return output

        module.float_forward = timed  # type: ignore[method-assign]
        self._wrapped.append(module)

    def _pre(self, name: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if args[0].reshape(-1, args[0].shape[-1]).shape[0] == 1:
                self._started[name] = time.perf_counter()
        return hook

    def _post(self, name: str, kind: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            started = self._started.pop(name, None)
            if started is not None:
                self.seconds[kind] += time.perf_counter() - started
                self.calls[kind] += 1
        return hook

    def per_step(self, kind: str) -> tuple[float, int]:
        """(seconds, bytes) of `kind` in one decode step: its mean one-row call times the
        layers that have it (a step calls each once), and their weights' bytes."""
        layers = self.bytes_per_call[kind]
        calls = self.calls[kind]
        seconds = self.seconds[kind] / calls * len(layers) if calls else 0.0
        return seconds, sum(layers.values())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._wrapped:
            del module.float_forward  # the class's again


def set_native_decode(model: torch.nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if hasattr(module, "native_decode_enabled"):
            setattr(module, "native_decode_enabled", enabled)  # noqa: B010


def decode_step_seconds(llm: LLM, prompt: list[int], output_tokens: int) -> float:
    """Seconds per decode step: a greedy generation of `output_tokens` less one of 2 tokens
    (the same prefill, first step and per-request costs; the quickest of three, so that a
    stall in it cannot take more than the steps between from the difference), over the steps
    between them."""
    def generation_seconds(max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        started = time.perf_counter()
        llm.generate([prompt], params)
        return time.perf_counter() - started

    baseline = min(generation_seconds(2) for _ in range(3))
    return (generation_seconds(output_tokens) - baseline) / (output_tokens - 2)


def paired_steps(llm: LLM, prompt: list[int], output_tokens: int,
                 probe: BandwidthProbe) -> list[tuple[float, float, float]]:
    """(seconds, GB/s before, GB/s after) of each decode step of a greedy generation, the
    bandwidth probed just before and just after the step. This machine's read bandwidth moves
    between two levels ~1.6x apart within seconds, so a bound read around a whole generation
    (`profile`'s rounds, bench/compare.py's passes) often belongs to another level than the
    steps it is set against; around one step it is tens of milliseconds away."""
    engine = llm.llm_engine
    request_id = f"paired-{time.monotonic_ns()}"
    engine.add_request(request_id, prompt, SamplingParams(
        max_tokens=output_tokens, temperature=0.0, ignore_eos=True))
    steps, decoding, before = [], False, probe()
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - started
        after = probe()  # also the next step's "before"
        if decoding:  # the prompt's prefill gave the first token: this step decoded
            steps.append((seconds, before, after))
        decoding = decoding or any(output.request_id == request_id
                                   and output.outputs[0].num_tokens for output in outputs)
        before = after
    return steps


def paired_fractions(steps: list[tuple[float, float, float]], weight_bytes: int,
                     steady: float = 0.05) -> dict[str, object]:
    """Each step's decode rate over the roofline of its own bandwidth (the mean of its two
    probes): weight bytes / (GB/s x step seconds), over the steps whose probes agree within
    `steady` (the level held through the step). The median of those, and (bandwidth, median
    fraction) of the steadies below and at or above their median bandwidth: the two levels."""
    kept = [(weight_bytes / ((before + after) / 2 * 1e9 * seconds), (before + after) / 2)
            for seconds, before, after in steps
            if abs(before - after) <= steady * max(before, after)]
    result: dict[str, object] = {"steps": len(steps), "steady": len(kept)}
    if not kept:
        return result
    middle = statistics.median(gb_s for _, gb_s in kept)
    result["fraction"] = statistics.median(fraction for fraction, _ in kept)
    for name, part in (("low", [k for k in kept if k[1] < middle]),
                       ("high", [k for k in kept if k[1] >= middle])):
        if part:
            result[name] = (statistics.median(gb_s for _, gb_s in part),
                            statistics.median(fraction for fraction, _ in part))
    return result


def profile(llm: LLM, prompt_tokens: int, output_tokens: int, rounds: int,
            bandwidth_bytes: int = 2 << 30,
            probe_bytes: int = 512 << 20) -> dict[str, object]:
    """The medians over `rounds` of: the read bandwidth (GB/s), the engine's decode step (s),
    the modules path's step (s, hooks included), and per kind (seconds, bytes) per step; and
    the engine's steps against the bandwidth probed around each (`paired_fractions`)."""
    model = llm.llm_engine.core.runner.model
    rng = random.Random(0)
    vocab_size = int(model.hf_config.vocab_size)
    prompt = [rng.randrange(vocab_size // 20, vocab_size // 2) for _ in range(prompt_tokens)]
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))
    bandwidth, engine_step, modules_step = [], [], []
    kinds: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for _ in range(rounds):
        before = read_bandwidth(bandwidth_bytes, repeats=3)
        engine_step.append(decode_step_seconds(llm, prompt, output_tokens))
        set_native_decode(model, False)
        timers = MatmulTimers(model)
        try:
            modules_step.append(decode_step_seconds(llm, prompt, output_tokens))
        finally:
            timers.remove()
            set_native_decode(model, True)
        for kind in KINDS:
            if timers.bytes_per_call[kind]:
                kinds[kind].append(timers.per_step(kind))
        bandwidth.append((before + read_bandwidth(bandwidth_bytes, repeats=3)) / 2)
    probe = BandwidthProbe(probe_bytes)
    steps = [step for _ in range(rounds)
             for step in paired_steps(llm, prompt, output_tokens, probe)]
    del probe
    step_bytes = sum(values[0][1] for values in kinds.values())
    return {"read_gb_s": statistics.median(bandwidth),
            "engine_step_s": statistics.median(engine_step),
            "modules_step_s": statistics.median(modules_step),
            "kinds": {kind: (statistics.median(s for s, _ in values), values[0][1])
                      for kind, values in kinds.items()},
            "paired": paired_fractions(steps, step_bytes)}


def table(result: dict[str, object]) -> str:
    bandwidth = float(result["read_gb_s"])  # type: ignore[arg-type]
    kinds: dict[str, tuple[float, int]] = result["kinds"]  # type: ignore[assignment]
    step = float(result["modules_step_s"])  # type: ignore[arg-type]
    lines = ["matmul | ms/step | MB/step | GB/s | x read bandwidth",
             "--- | --- | --- | --- | ---"]
    matmul_seconds = matmul_bytes = 0.0
    for kind, (seconds, num_bytes) in kinds.items():
        matmul_seconds += seconds
        matmul_bytes += num_bytes
        rate = num_bytes / seconds / 1e9 if seconds else float("nan")
        lines.append(f"{kind} | {seconds * 1e3:.2f} | {num_bytes / 1e6:.1f} | {rate:.1f} | "
                     f"{rate / bandwidth:.2f}")
    rate = matmul_bytes / matmul_seconds / 1e9 if matmul_seconds else float("nan")
    lines.append(f"all matmuls | {matmul_seconds * 1e3:.2f} | {matmul_bytes / 1e6:.1f} | "
                 f"{rate:.1f} | {rate / bandwidth:.2f}")
    lines.append(f"rest of the step | {(step - matmul_seconds) * 1e3:.2f} | | |")
    engine = float(result["engine_step_s"])  # type: ignore[arg-type]
    bound = matmul_bytes / (bandwidth * 1e9)
    lines += ["", f"read bandwidth {bandwidth:.1f} GB/s: the weights' roofline is "
              f"{bound * 1e3:.2f} ms a step ({1 / bound:.1f} tok/s)",
              f"decode step as the engine runs it {engine * 1e3:.2f} ms "
              f"({1 / engine:.1f} tok/s, {bound / engine:.2f} of the roofline); through the "
              f"modules with the timers {step * 1e3:.2f} ms"]
    paired: dict[str, object] = result.get("paired") or {}  # type: ignore[assignment]
    if "fraction" in paired:
        levels = "; ".join(f"{name} {level[0]:.1f} GB/s: {level[1]:.2f}"  # type: ignore[index]
                           for name in ("low", "high") if (level := paired.get(name)))
        lines.append(f"each step against the bandwidth probed just before and after it: "
                     f"{paired['fraction']:.2f} of the roofline (median of {paired['steady']} "
                     f"of {paired['steps']} steps, the level held; {levels})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=230)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.output_tokens < 3 or args.rounds < 1:
        parser.error("--output-tokens must be >= 3 and --rounds >= 1")
    return args


def main() -> None:
    args = parse_args()
    if args.model is None:
        from engine.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization,
              kv_cache_memory_gb=0.5)
    result = profile(llm, args.prompt_tokens, args.output_tokens, args.rounds)
    print(f"{args.model}, {args.dtype}{', ' + args.quantization if args.quantization else ''}, "
          f"1 stream, {args.prompt_tokens}-token prompt, {args.output_tokens} tokens, "
          f"{torch.get_num_threads()} threads, medians of {args.rounds} rounds\n")
    print(table(result))


if __name__ == "__main__":
    main()

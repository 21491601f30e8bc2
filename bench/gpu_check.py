"""The GPU check: does the CUDA path compute the same thing as the CPU path, and how fast is it.

    python3 bench/gpu_check.py [--out PATH] [--budget-s 470] [--skip-pytest]
    python3 bench/gpu_check.py --device cpu --smoke      # rehearsal on CPU (Triton interpreter)

Sections, in order; the JSON report is rewritten after each, so a run cut short keeps what
it measured ($OUT/gpu_check.json when $OUT is set, else ./gpu_check.json, or --out):
  kernels   Triton paged attention vs a dense float64 reference, fresh random inputs per case
  greedy    engine.LLM on the device in fp32 vs transformers greedy, every tiny architecture
  device    copy bandwidth and bf16 matmul rate
  decode    one decode step of a Qwen2.5-0.5B-sized random model at batch 1/16/64/256:
            eager (Triton and the SDPA reference) and CUDA-graphed, the engine's own
            tokens/s, and the bandwidth roofline (weights + KV read once per step)
  prefill   1x2048 and 16x512 tokens, against the matmul-rate roofline
  pytest    tests/unit with PAGEDSERVE_TEST_DEVICE=<device>, in what time is left
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _prepare_environment(argv: list[str]) -> None:
    """On CPU the kernels can only run interpreted, and Triton reads that when imported."""
    import os

    if "--device" in argv and argv[argv.index("--device") + 1:][:1] == ["cpu"]:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("PAGEDSERVE_ATTENTION_BACKEND", "triton")


_prepare_environment(sys.argv)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

from engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from engine.attention import TorchAttentionBackend, get_attention_backend  # noqa: E402
from engine.attention.base import AttentionBackend, AttentionMetadata  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.loader import LoadedModel, build_empty_model  # noqa: E402
from engine.models import CausalLM, get_model_class  # noqa: E402
from tests.tiny_models import ARCHITECTURES, save_tiny_model  # noqa: E402

logger = logging.getLogger("gpu_check")

JsonDict = dict[str, object]
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                   max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True)


@dataclass(frozen=True, slots=True)
class Sizes:
    """Everything that scales the run; --smoke swaps in a CPU-sized copy."""

    model_config: dict[str, object] = field(default_factory=lambda: dict(QWEN25_05B))
    decode_batches: tuple[int, ...] = (1, 16, 64, 256)
    decode_context: int = 512  # tokens already in each sequence's cache
    prefill_shapes: tuple[tuple[int, int], ...] = ((1, 2048), (16, 512))
    timing_iters: int = 20
    engine_steps: int = 32
    copy_bytes: int = 2 << 30
    matmul_n: int = 8192
    architectures: tuple[str, ...] = ARCHITECTURES
    greedy_tokens: int = 24
    prompt_lengths: tuple[int, ...] = (3, 9, 17, 33, 57, 80)
    kernel_scale: int = 1  # divides the kernel cases' lengths


SMOKE = Sizes(model_config=dict(SMOKE_MODEL), decode_batches=(1, 4), decode_context=24,
              prefill_shapes=((1, 32), (2, 16)), timing_iters=2, engine_steps=3,
              copy_bytes=1 << 20, matmul_n=128, architectures=("llama",), greedy_tokens=3,
              prompt_lengths=(3, 17), kernel_scale=50)


# ---- the report and the clock ---------------------------------------------------------------


@dataclass(slots=True)
class Report:
    """The JSON report: run facts, then one entry per section; saved after every section."""

    path: Path
    deadline: float
    data: JsonDict = field(default_factory=dict)

    def run(self, name: str, section: Callable[[], JsonDict], min_seconds: float) -> None:
        sections = self.data.setdefault("sections", {})
        assert isinstance(sections, dict)
        if self.seconds_left() < min_seconds:
            sections[name] = {"status": "skipped", "reason": "out of time budget"}
        else:
            started = time.perf_counter()
            try:
                result = section()
            except Exception as exc:  # one broken section must not hide the others' results
                logger.exception("section %s failed", name)
                result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            result["seconds"] = round(time.perf_counter() - started, 2)
            sections[name] = result
        logger.info("%s: %s", name, sections[name].get("status"))
        self.save()

    def seconds_left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_call(fn: Callable[[], object], device: torch.device, iters: int,
                  warmup: int = 3) -> float:
    """Mean seconds per call after warm-up; CUDA events on the GPU, so no host gaps count
    except the launch overhead that the call itself has."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - started) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- 1. kernels vs a dense reference --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KernelCase:
    name: str
    dtype: torch.dtype
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    shapes: tuple[tuple[int, int], ...]  # (num_cached, query_len) per sequence
    num_splits: int | None = None  # decode: None lets the backend choose


def kernel_cases(scale: int) -> list[KernelCase]:
    rng = random.Random(0)
    ragged = tuple((rng.randrange(3000) // scale, 1) for _ in range(37))

    def s(*shapes: tuple[int, int]) -> tuple[tuple[int, int], ...]:
        return tuple((c // scale, max(1, q // scale) if q > 1 else 1) for c, q in shapes)

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    fresh = s((0, 300), (0, 17), (0, 1), (0, 129))
    cached = s((256, 100), (37, 50), (500, 1), (0, 9), (16, 16))
    return [
        KernelCase("prefill-fresh-fp32", f32, 14, 2, 64, 16, fresh),
        KernelCase("prefill-cached-prefix-fp32", f32, 14, 2, 64, 16, cached),
        KernelCase("prefill-cached-prefix-fp32-d128", f32, 32, 8, 128, 16,
                   s((1000, 200), (5, 64), (0, 33), (77, 1))),
        KernelCase("decode-ragged-fp32-auto-splits", f32, 14, 2, 64, 16, ragged),
        KernelCase("decode-ragged-fp32-1-split", f32, 14, 2, 64, 16, ragged, 1),
        KernelCase("decode-ragged-fp32-d128-16-splits", f32, 32, 8, 128, 16, ragged[:9], 16),
        KernelCase("decode-ragged-bf16", bf16, 14, 2, 64, 16, ragged),
        KernelCase("prefill-cached-prefix-bf16", bf16, 14, 2, 64, 16, cached),
        KernelCase("mixed-fp16-head-dim-80-block-32", f16, 8, 8, 80, 32,
                   s((0, 40), (12, 1), (100, 7), (3000, 1))),
    ]


def check_kernels(device: torch.device, sizes: Sizes) -> JsonDict:
    from engine.attention.cuda import CudaAttentionBackend

    results = []
    for seed, case in enumerate(kernel_cases(sizes.kernel_scale)):
        if device.type == "cpu" and case.dtype != torch.float32:
            continue  # the interpreter computes in numpy, which has no bfloat16
        backend = CudaAttentionBackend(num_decode_splits=case.num_splits)
        results.append(run_kernel_case(case, backend, seed, device))
    return {"status": "ok" if all(r["passed"] for r in results) else "failed",
            "cases": results}


def run_kernel_case(case: KernelCase, backend: AttentionBackend, seed: int,
                    device: torch.device) -> JsonDict:
    """Scatter fresh random sequences into a garbage-filled paged cache through shuffled
    blocks, run one step, compare with dense attention on the same (dtype-rounded) values."""
    gen = torch.Generator(device=device).manual_seed(seed)
    seqs = [_random_sequence(case, cached, q_len, gen, device) for cached, q_len in case.shapes]
    k_cache, v_cache, metadata = _paged_layout(case, seqs, gen, device)
    new = [slice(cached, cached + q_len) for cached, q_len in case.shapes]
    query = torch.cat([q for q, _, _ in seqs])
    key = torch.cat([k[s] for (_, k, _), s in zip(seqs, new, strict=True)])
    value = torch.cat([v[s] for (_, _, v), s in zip(seqs, new, strict=True)])
    scale = case.head_dim**-0.5
    expected = torch.cat([_dense_attention(q, k, v, scale) for q, k, v in seqs])
    out = backend.forward(query, key, value, k_cache, v_cache, metadata, scale)
    reference = TorchAttentionBackend().forward(query, key, value, k_cache.clone(),
                                                v_cache.clone(), metadata, scale)
    error = (out.double() - expected).abs().max().item()
    tolerance = 1e-3 if case.dtype == torch.float32 else 2e-2
    return {"name": case.name, "dtype": str(case.dtype).removeprefix("torch."),
            "num_seqs": len(case.shapes), "max_seq_len": metadata.max_seqlen_k,
            "max_abs_error": error, "tolerance": tolerance, "passed": error < tolerance,
            "reference_backend_max_abs_error": (reference.double() - expected).abs().max().item()}


def _random_sequence(case: KernelCase, cached: int, q_len: int, gen: torch.Generator,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seq_len = cached + q_len

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device).to(case.dtype)

    return (randn(q_len, case.num_heads, case.head_dim),  # [query_len, num_heads, head_dim]
            randn(seq_len, case.num_kv_heads, case.head_dim),  # [seq_len, num_kv_heads, dim]
            randn(seq_len, case.num_kv_heads, case.head_dim))


def _paged_layout(case: KernelCase, seqs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  gen: torch.Generator, device: torch.device,
                  ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Caches holding each prefix in shuffled blocks (garbage elsewhere), and the metadata."""
    bs = case.block_size
    needs = [-(-(cached + q_len) // bs) for cached, q_len in case.shapes]
    num_blocks = sum(needs) + 4
    shape = (num_blocks, bs, case.num_kv_heads, case.head_dim)
    k_cache = (torch.randn(shape, generator=gen, device=device) * 10).to(case.dtype)
    v_cache = (torch.randn(shape, generator=gen, device=device) * 10).to(case.dtype)
    pool = torch.randperm(num_blocks, generator=gen, device=device).tolist()
    tables, slots = [], []
    for (cached, q_len), need, (_, keys, values) in zip(case.shapes, needs, seqs, strict=True):
        table, pool = pool[:need], pool[need:]
        tables.append(table + [0] * (max(needs) - need))
        seq_slots = [table[p // bs] * bs + p % bs for p in range(cached + q_len)]
        index = torch.tensor(seq_slots[:cached], dtype=torch.long, device=device)
        k_cache.view(-1, *shape[2:]).index_copy_(0, index, keys[:cached])
        v_cache.view(-1, *shape[2:]).index_copy_(0, index, values[:cached])
        slots += seq_slots[cached:]
    query_lens = [q_len for _, q_len in case.shapes]
    seq_lens = [cached + q_len for cached, q_len in case.shapes]
    metadata = build_metadata(query_lens, seq_lens, tables, slots, device)
    return k_cache, v_cache, metadata


def build_metadata(query_lens: list[int], seq_lens: list[int], tables: list[list[int]],
                   slots: list[int], device: torch.device) -> AttentionMetadata:
    cu_seqlens_q = torch.tensor([0, *query_lens], device=device).cumsum(0).to(torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        cu_seqlens_q=cu_seqlens_q,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        max_seqlen_q=max(query_lens), max_seqlen_k=max(seq_lens),
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens))


def _dense_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Causal softmax attention in float64; query i sits at position seq_len - q_len + i."""
    q_len, seq_len = query.shape[0], keys.shape[0]
    group = query.shape[1] // keys.shape[1]
    keys = keys.double().repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
    values = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.double(), keys) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
    k_pos = torch.arange(seq_len, device=query.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)  # [q_len, heads, dim]


# ---- 2. greedy equality with transformers ---------------------------------------------------

GREEDY_VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "chunked-prefill": {"max_num_batched_tokens": 20},
}


def check_greedy(device: torch.device, sizes: Sizes) -> JsonDict:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in sizes.architectures:
            path = save_tiny_model(arch, Path(tmp) / arch)
            prompts = greedy_prompts(sizes.prompt_lengths, seed=ARCHITECTURES.index(arch))
            expected = transformers_greedy(path, prompts, sizes.greedy_tokens, device)
            for variant, engine_args in GREEDY_VARIANTS.items():
                results.append(compare_engine(path, prompts, expected, device, sizes,
                                              engine_args) | {"arch": arch, "variant": variant})
    return {"status": "ok" if all(r["matches"] for r in results) else "failed",
            "runs": results}


def greedy_prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]
    longest = prompts[-1]  # one prompt shares a prefix with another
    prompts.append(longest[: len(longest) // 2] + [rng.randrange(3, 512) for _ in range(5)])
    return prompts


def transformers_greedy(path: Path, prompts: list[list[int]], num_tokens: int,
                        device: torch.device) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = model.to(device).eval()  # type: ignore[arg-type]
    outputs = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt], device=device)
        generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                                   do_sample=False, pad_token_id=0)
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


def compare_engine(path: Path, prompts: list[list[int]], expected: list[list[int]],
                   device: torch.device, sizes: Sizes, engine_args: dict[str, object]) -> JsonDict:
    """Generate twice with one engine: the second pass reads its prefixes from the cache."""
    llm = LLM(str(path), dtype="float32", device=device.type, num_blocks=512, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=sizes.greedy_tokens,
                            min_tokens=sizes.greedy_tokens)
    first = llm.generate(prompts, params)
    second = llm.generate(prompts, params)
    backends = sorted({type(m.attn_backend).__name__ for m in llm.llm_engine.loaded.model.modules()
                       if hasattr(m, "attn_backend")})
    mismatches = [{"prompt": i, "pass": n, "expected": want, "got": out.outputs[0].token_ids}
                  for n, outputs in enumerate((first, second))
                  for i, (out, want) in enumerate(zip(outputs, expected, strict=True))
                  if out.outputs[0].token_ids != want]
    del llm
    free_device_memory()
    return {"matches": not mismatches, "mismatches": mismatches[:3], "backends": backends,
            "cached_tokens_second_pass": sum(o.num_cached_tokens or 0 for o in second)}


# ---- 2b. tensor parallel over NCCL, where two GPUs are lent ---------------------------------

TP_ARCHITECTURES = ("llama", "qwen3", "mixtral")


def check_tensor_parallel(device: torch.device, sizes: Sizes) -> JsonDict:
    """TP=2 (NCCL, a spawned worker on the second GPU) against one GPU: the same greedy
    tokens on tiny models, and the decode rate of each at batch 1."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        return {"status": "skipped", "reason": "needs two CUDA devices"}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in TP_ARCHITECTURES:
            path = save_tiny_model(arch, Path(tmp) / arch)
            prompts = greedy_prompts(sizes.prompt_lengths, seed=ARCHITECTURES.index(arch))
            outputs = {}
            for tp in (1, 2):
                llm = LLM(str(path), dtype="float32", device="cuda", num_blocks=512,
                          tensor_parallel_size=tp)
                params = SamplingParams(temperature=0.0, max_tokens=sizes.greedy_tokens,
                                        min_tokens=sizes.greedy_tokens)
                started = time.perf_counter()
                result = llm.generate(prompts, params)
                seconds = time.perf_counter() - started
                outputs[tp] = ([list(r.outputs[0].token_ids) for r in result], seconds)
                llm.close()
                del llm
                free_device_memory()
            runs.append({"arch": arch, "matches": outputs[1][0] == outputs[2][0],
                         "seconds_tp1": outputs[1][1], "seconds_tp2": outputs[2][1]})
    return {"status": "ok" if all(r["matches"] for r in runs) else "failed", "runs": runs}


# ---- 3. the device's copy bandwidth and matmul rate ----------------------------------------


def measure_device(device: torch.device, sizes: Sizes) -> JsonDict:
    src = torch.empty(sizes.copy_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_s = time_per_call(lambda: dst.copy_(src), device, iters=sizes.timing_iters)
    n = sizes.matmul_n
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    matmul_s = time_per_call(lambda: a @ b, device, iters=sizes.timing_iters)
    return {"status": "ok", "copy_bytes": sizes.copy_bytes,
            "copy_bandwidth_gb_s": 2 * sizes.copy_bytes / copy_s / 1e9,  # read + write
            "matmul_n": n, "bf16_matmul_tflop_s": 2 * n**3 / matmul_s / 1e12}


# ---- 4 and 5. decode and prefill on a Qwen2.5-0.5B-sized random model ----------------------


@dataclass(slots=True)
class StepBatch:
    """One forward step's inputs, built once and reused by every timed call."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [num_seqs] int64: the rows that produce logits
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    kv_bytes_read: int  # K and V bytes attention reads over all layers


@dataclass(slots=True)
class SyntheticModel:
    model: CausalLM
    hf_config: transformers.PretrainedConfig
    dtype: torch.dtype
    device: torch.device

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def set_backend(self, backend: AttentionBackend) -> None:
        for module in self.model.modules():
            if hasattr(module, "attn_backend"):
                setattr(module, "attn_backend", backend)  # noqa: B010 (nn.Module typing)


def build_synthetic_model(sizes: Sizes, device: torch.device,
                          dtype: torch.dtype) -> SyntheticModel:
    """Our own Qwen2 classes, random weights (std 0.02, unit norms), no checkpoint on disk."""
    config = transformers.Qwen2Config(**sizes.model_config,  # type: ignore[arg-type]
                                      architectures=["Qwen2ForCausalLM"])
    model = build_empty_model(get_model_class(config), config, get_attention_backend(device),
                              dtype, device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    return SyntheticModel(model.eval(), config, dtype, device)


def _kv_caches(synthetic: SyntheticModel, num_blocks: int,
               block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    spec = get_model_class(synthetic.hf_config).kv_cache_spec(synthetic.hf_config)
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return [(torch.randn(shape, dtype=synthetic.dtype, device=synthetic.device),
             torch.randn(shape, dtype=synthetic.dtype, device=synthetic.device))
            for _ in range(spec.num_layers)]


def step_batch(synthetic: SyntheticModel, num_cached: int, query_len: int, num_seqs: int,
               block_size: int = 16) -> StepBatch:
    """num_seqs sequences, each with num_cached tokens in the cache and query_len new ones,
    over randomly assigned (non-contiguous) blocks."""
    device, seq_len = synthetic.device, num_cached + query_len
    blocks_per_seq = -(-seq_len // block_size)
    num_blocks = num_seqs * blocks_per_seq + 1
    tables = (torch.randperm(num_blocks - 1)[: num_seqs * blocks_per_seq] + 1).view(
        num_seqs, blocks_per_seq)  # [num_seqs, blocks_per_seq]
    positions = torch.arange(num_cached, seq_len).repeat(num_seqs)  # [num_tokens]
    seq_index = torch.arange(num_seqs).repeat_interleave(query_len)
    slots = tables[seq_index, positions // block_size] * block_size + positions % block_size
    metadata = build_metadata([query_len] * num_seqs, [seq_len] * num_seqs, tables.tolist(),
                              slots.tolist(), device)
    caches = _kv_caches(synthetic, num_blocks, block_size)
    per_token = sum(k.shape[2] * k.shape[3] * k.element_size() * 2 for k, _ in caches)
    vocab = int(synthetic.hf_config.vocab_size)
    return StepBatch(
        input_ids=torch.randint(vocab, (num_seqs * query_len,), device=device),
        positions=positions.to(device),
        metadata=metadata,
        sample_rows=(torch.arange(1, num_seqs + 1) * query_len - 1).to(device),
        kv_caches=caches, kv_bytes_read=per_token * seq_len * num_seqs)


def forward_step(synthetic: SyntheticModel, batch: StepBatch) -> torch.Tensor:
    """Model forward, logits for the sampling rows, greedy tokens: a step minus the host."""
    hidden = synthetic.model(batch.input_ids, batch.positions, batch.kv_caches, batch.metadata)
    return synthetic.model.compute_logits(hidden[batch.sample_rows]).argmax(-1)


def capture_graph(step: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm up on a side stream (Triton compiles, cuBLAS picks algorithms), then capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def time_decode_batch(synthetic: SyntheticModel, num_seqs: int, sizes: Sizes,
                      bandwidth: float | None) -> JsonDict:
    device = synthetic.device
    batch = step_batch(synthetic, sizes.decode_context, 1, num_seqs)
    step = lambda: forward_step(synthetic, batch)  # noqa: E731
    triton_backend = synthetic.model.attn_backend
    eager_s = time_per_call(step, device, sizes.timing_iters)
    synthetic.set_backend(TorchAttentionBackend())
    sdpa_s = time_per_call(step, device, sizes.timing_iters)
    synthetic.set_backend(triton_backend)
    result: JsonDict = {"batch": num_seqs, "context": sizes.decode_context + 1,
                        "eager_ms": eager_s * 1e3, "sdpa_reference_eager_ms": sdpa_s * 1e3,
                        "eager_tok_s": num_seqs / eager_s}
    best_s = eager_s
    if device.type == "cuda":
        graph, graphed_tokens = capture_graph(step)
        graph_s = time_per_call(graph.replay, device, sizes.timing_iters)
        graph.replay()
        result |= {"graph_ms": graph_s * 1e3, "graph_tok_s": num_seqs / graph_s,
                   "graph_speedup": eager_s / graph_s,
                   "graph_tokens_equal_eager": torch.equal(graphed_tokens.clone(), step())}
        best_s = min(eager_s, graph_s)
        del graph
    bytes_read = synthetic.weight_bytes + batch.kv_bytes_read
    if bandwidth:
        roofline = num_seqs * bandwidth / bytes_read
        result |= {"roofline_tok_s": roofline, "best_fraction_of_roofline":
                   num_seqs / best_s / roofline}
    result["bytes_read_per_step"] = bytes_read
    return result


def bench_decode(synthetic: SyntheticModel, sizes: Sizes, bandwidth: float | None) -> JsonDict:
    rows = []
    for num_seqs in sizes.decode_batches:
        row = time_decode_batch(synthetic, num_seqs, sizes, bandwidth)
        free_device_memory()  # the batch's KV caches and graph pool went with the call
        row["engine_tok_s"] = engine_decode_tok_s(synthetic, num_seqs, sizes)
        if synthetic.device.type == "cuda":  # the engine's own graphs vs --enforce-eager
            row["engine_eager_tok_s"] = engine_decode_tok_s(synthetic, num_seqs, sizes,
                                                            enforce_eager=True)
            row["engine_graph_speedup"] = row["engine_tok_s"] / row["engine_eager_tok_s"]
        rows.append(row)
    graphs_ok = all(r.get("graph_tokens_equal_eager", True) for r in rows)
    return {"status": "ok" if graphs_ok else "failed", "weight_bytes": synthetic.weight_bytes,
            "num_params": synthetic.num_params, "dtype": str(synthetic.dtype), "rows": rows}


_TOKENIZERS: dict[int, transformers.PreTrainedTokenizerFast] = {}


def synthetic_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with one token per id, so detokenizing random ids works."""
    if vocab_size not in _TOKENIZERS:
        from tokenizers import Tokenizer, models, pre_tokenizers

        tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)},
                                               unk_token="t0"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        _TOKENIZERS[vocab_size] = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, eos_token="t2", pad_token="t0")
    return _TOKENIZERS[vocab_size]


def engine_decode_tok_s(synthetic: SyntheticModel, num_seqs: int, sizes: Sizes,
                        enforce_eager: bool = False) -> float:
    """The whole engine (scheduler, runner, sampler, detokenizer) on the same model: decode
    tokens per second once every request has finished its prefill. On CUDA the engine
    replays its captured decode graphs unless enforce_eager."""
    engine = _synthetic_engine(synthetic, num_seqs, sizes, enforce_eager)
    params = SamplingParams(temperature=0.0, max_tokens=sizes.engine_steps + 64, ignore_eos=True)
    rng = random.Random(num_seqs)
    vocab = int(synthetic.hf_config.vocab_size)
    for i in range(num_seqs):
        engine.add_request(str(i), [rng.randrange(vocab) for _ in range(sizes.decode_context)],
                           params)
    for _ in range(10_000):  # chunked prefill: until one step samples for every request
        if len(engine.step()) == num_seqs:
            break
    for _ in range(3):  # kernels for this step shape compile here, not in the timed loop
        engine.step()
    started = time.perf_counter()
    for _ in range(sizes.engine_steps):
        engine.step()
    elapsed = time.perf_counter() - started
    del engine
    free_device_memory()
    return num_seqs * sizes.engine_steps / elapsed


def _synthetic_engine(synthetic: SyntheticModel, num_seqs: int, sizes: Sizes,
                      enforce_eager: bool = False) -> LLMEngine:
    loaded = LoadedModel(model=synthetic.model, hf_config=synthetic.hf_config,
                         tokenizer=synthetic_tokenizer(int(synthetic.hf_config.vocab_size)),
                         generation_config=None, model_dir=Path("synthetic"),
                         dtype=synthetic.dtype, device=synthetic.device)
    tokens_per_seq = sizes.decode_context + sizes.engine_steps + 64
    config = EngineConfig.from_kwargs(
        "synthetic", dtype=str(synthetic.dtype).removeprefix("torch."),
        device=synthetic.device.type, block_size=16,
        num_blocks=num_seqs * -(-tokens_per_seq // 16) + 16, max_num_seqs=num_seqs,
        max_num_batched_tokens=max(8192, num_seqs), enforce_eager=enforce_eager)
    return LLMEngine(config, loaded=loaded)


def bench_prefill(synthetic: SyntheticModel, sizes: Sizes, matmul_flops: float | None,
                  ) -> JsonDict:
    rows = []
    for num_seqs, seq_len in sizes.prefill_shapes:
        rows.append(time_prefill_shape(synthetic, num_seqs, seq_len, sizes, matmul_flops))
        free_device_memory()
    return {"status": "ok", "rows": rows}


def time_prefill_shape(synthetic: SyntheticModel, num_seqs: int, seq_len: int, sizes: Sizes,
                       matmul_flops: float | None) -> JsonDict:
    batch = step_batch(synthetic, 0, seq_len, num_seqs)
    step = lambda: forward_step(synthetic, batch)  # noqa: E731
    iters = max(2, sizes.timing_iters // 4)
    triton_s = time_per_call(step, synthetic.device, iters)
    triton_backend = synthetic.model.attn_backend
    synthetic.set_backend(TorchAttentionBackend())
    sdpa_s = time_per_call(step, synthetic.device, iters)
    synthetic.set_backend(triton_backend)
    num_tokens = num_seqs * seq_len
    row: JsonDict = {"shape": f"{num_seqs}x{seq_len}", "ms": triton_s * 1e3,
                     "tok_s": num_tokens / triton_s, "sdpa_reference_ms": sdpa_s * 1e3}
    if matmul_flops:
        flops = prefill_flops(synthetic, num_seqs, seq_len)
        row |= {"flops": flops,
                "fraction_of_matmul_roofline": flops / triton_s / matmul_flops}
    return row


def prefill_flops(synthetic: SyntheticModel, num_seqs: int, seq_len: int) -> float:
    """Matmul FLOPs of a causal prefill: weights on every token, the LM head on the sampling
    rows only, QK^T and PV over the causal triangle."""
    config = synthetic.hf_config
    embedding = config.vocab_size * config.hidden_size
    num_tokens = num_seqs * seq_len
    head_dim = config.hidden_size // config.num_attention_heads
    attention = (4 * config.num_hidden_layers * config.num_attention_heads * head_dim
                 * num_seqs * seq_len * (seq_len + 1) / 2)
    return (2 * (synthetic.num_params - embedding) * num_tokens + 2 * embedding * num_seqs
            + attention)


# ---- 6. the unit tests on the device --------------------------------------------------------


def run_pytest(device: torch.device, pytest_args: list[str], seconds: float) -> JsonDict:
    env = dict(os.environ, PAGEDSERVE_TEST_DEVICE=device.type)
    for name in ("TRITON_INTERPRET", "PAGEDSERVE_ATTENTION_BACKEND"):  # tests pick their own
        env.pop(name, None)
    command = [sys.executable, "-m", "pytest", *pytest_args]
    try:
        proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=seconds)
    except subprocess.TimeoutExpired as exc:
        tail = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {"status": "timeout", "timeout_s": seconds, "output_tail": tail[-6000:]}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"status": "ok" if proc.returncode == 0 else "failed",
            "returncode": proc.returncode, "command": " ".join(command),
            "summary": lines[-1] if lines else "", "output_tail": proc.stdout[-6000:],
            "stderr_tail": proc.stderr[-2000:]}


# ---- the run --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu rehearses the script with the Triton interpreter")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (for --device cpu)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                        help="dtype of the decode and prefill timings")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="whole-run time budget; later sections are skipped past it")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--pytest-args", default=None,
                        help="arguments for pytest (default: tests/unit, or the Triton tests "
                             "alone with --smoke)")
    return parser.parse_args(argv)


def run_facts(device: torch.device) -> JsonDict:
    facts: JsonDict = {"python": platform.python_version(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "device": str(device),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError:
        facts["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts |= {"gpu": props.name, "sms": props.multi_processor_count,
                  "gpu_memory_gib": props.total_memory / 2**30,
                  "cuda": torch.version.cuda}
    return facts


def section_value(report: Report, section: str, key: str) -> float | None:
    sections = report.data.get("sections", {})
    entry = sections.get(section, {}) if isinstance(sections, dict) else {}
    value = entry.get(key) if isinstance(entry, dict) else None
    return float(value) if isinstance(value, int | float) else None


def run_benchmarks(report: Report, device: torch.device, sizes: Sizes,
                   dtype: torch.dtype) -> None:
    holder: list[SyntheticModel] = []

    def synthetic() -> SyntheticModel:  # built on first use, shared by decode and prefill
        if not holder:
            holder.append(build_synthetic_model(sizes, device, dtype))
        return holder[0]

    bandwidth = section_value(report, "device", "copy_bandwidth_gb_s")
    matmul = section_value(report, "device", "bf16_matmul_tflop_s")
    with torch.inference_mode():
        report.run("decode", lambda: bench_decode(synthetic(), sizes,
                                                  bandwidth and bandwidth * 1e9), 90)
        report.run("prefill", lambda: bench_prefill(synthetic(), sizes,
                                                    matmul and matmul * 1e12), 20)
    holder.clear()
    free_device_memory()


def log_summary(report: Report) -> None:
    sections = report.data.get("sections", {})
    assert isinstance(sections, dict)
    for name, entry in sections.items():
        logger.info("%-8s %s (%.0f s)", name, entry.get("status"), entry.get("seconds", 0))
    for row in sections.get("decode", {}).get("rows", []):
        logger.info("decode batch %4d: eager %8.0f tok/s, graph %8s tok/s, engine %8.0f tok/s, "
                    "roofline %8s tok/s, best %s of roofline", row["batch"], row["eager_tok_s"],
                    _fmt(row.get("graph_tok_s")), row["engine_tok_s"],
                    _fmt(row.get("roofline_tok_s")), _fmt(row.get("best_fraction_of_roofline"),
                                                          "{:.0%}"))
    for row in sections.get("prefill", {}).get("rows", []):
        logger.info("prefill %-8s: %8.0f tok/s (%s of matmul roofline)", row["shape"],
                    row["tok_s"], _fmt(row.get("fraction_of_matmul_roofline"), "{:.0%}"))
    logger.info("report: %s", report.path)


def _fmt(value: object, pattern: str = "{:.0f}") -> str:
    return pattern.format(value) if isinstance(value, int | float) else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device = torch.device(args.device)
    sizes = SMOKE if args.smoke else Sizes()
    out_dir = os.environ.get("OUT")
    path = args.out or (Path(out_dir) / "gpu_check.json" if out_dir else Path("gpu_check.json"))
    report = Report(path, deadline=time.perf_counter() + args.budget_s)
    report.data["run"] = run_facts(device)
    report.run("kernels", lambda: check_kernels(device, sizes), 20)
    report.run("greedy", lambda: check_greedy(device, sizes), 30)
    report.run("tensor-parallel", lambda: check_tensor_parallel(device, sizes), 30)
    report.run("device", lambda: measure_device(device, sizes), 5)
    free_device_memory()
    run_benchmarks(report, device, sizes, getattr(torch, args.dtype))
    if not args.skip_pytest:
        default = "tests/unit/test_triton_attention.py -q" if args.smoke else (
            "tests/unit -q -p no:cacheprovider --continue-on-collection-errors --maxfail=20")
        pytest_args = (args.pytest_args or default).split()
        report.run("pytest", lambda: run_pytest(device, pytest_args,
                                                report.seconds_left() - 5), 30)
    log_summary(report)
    statuses = [s.get("status") for s in report.data["sections"].values()]  # type: ignore
    return 0 if all(status in ("ok", "skipped") for status in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())

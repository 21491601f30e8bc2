"""The native decode stack (engine/models/native_decode.py): decode steps
through it give the modules' tokens and logprobs bit for bit, and every model or step it does
not compute runs the modules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.kernels import packed_bf16, w8a8
from engine.kernels.native import has_bf16_dot_products
from engine.kernels.w4a16 import quantize_weight, with_columns
from engine.layers.linear import Linear
from engine.models.llama import LlamaModel
from engine.models.native_decode import NativeDecodeStack
from tests.devices import cpu_only
from tests.tiny_models import save_tiny_model

pytestmark = cpu_only

# int4 groups of 128 need 128-column matmuls; 4 heads of 32 (rope_bf16 takes whole halves of
# 16 lanes) over 2 KV heads
WIDE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2)
PROMPTS = [[11, 200, 37, 401, 9, 64, 12, 88], [64, 128, 3], list(range(40, 110))]


def _decoder(llm: LLM) -> LlamaModel:
    model = llm.llm_engine.core.runner.model.model
    assert isinstance(model, LlamaModel)
    return model


def _has_column_kernel() -> bool:
    """Whether this machine runs the AVX-512 int4 kernel the stack is made of."""
    return with_columns(quantize_weight(torch.zeros(16, 128))).columns is not None


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("native-decode")
    dirs = {arch: save_tiny_model(arch, root / arch, **WIDE) for arch in ("llama", "qwen2")}
    _randomize_biases(dirs["qwen2"])
    return dirs


def _randomize_biases(model_dir: Path) -> None:
    """transformers initializes biases to zero, which would let a dropped bias pass."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(0)
    biases = [name for name in tensors if name.endswith("bias")]
    assert biases  # Qwen2's q/k/v projections
    for name in biases:
        tensors[name] = torch.randn(tensors[name].shape, generator=generator) * 0.5
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(("arch", "quantization", "in_place"), [
    ("llama", "int4", False), ("qwen2", "int4", False),  # qwen2: q/k/v biases
    ("qwen2", "int8", False), ("llama", "w8a8", False),
    # bf16: packed_bf16's kernel inside the one native call, or oneDNN's matmuls between the
    # native steps
    ("llama", None, True), ("qwen2", None, True), ("llama", None, False), ("qwen2", None, False),
])
def test_native_decode_is_bitwise_the_modules(arch: str, quantization: str | None,
                                              in_place: bool,
                                              model_dirs: dict[str, Path]) -> None:
    if not _has_column_kernel():
        pytest.skip("the native decode stack needs the AVX-512 VNNI kernels")
    # no prefix caching: the second run must prefill as the first did (bf16 ties are common
    # in a random tiny model, and a cached prefix changes the prompt's last-row arithmetic)
    llm = LLM(str(model_dirs[arch]), device="cpu", dtype="bfloat16", quantization=quantization,
              num_blocks=64, block_size=4, enable_prefix_caching=False)
    decoder = _decoder(llm)
    if quantization is None and not in_place:  # every matmul on oneDNN's call
        for linear in decoder.modules():
            if isinstance(linear, Linear):
                linear.packed_address = None
        decoder._native_decode_built = False  # rebuilt without them
    elif quantization is None and not has_bf16_dot_products():
        pytest.skip("packed_bf16's kernel needs AVX512-BF16")
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    runs = {}
    calls = []
    real_run = NativeDecodeStack.run

    def counting_run(self: NativeDecodeStack, *args: object) -> object:
        result = real_run(self, *args)  # type: ignore[arg-type]
        calls.append(result is not None)
        return result

    for enabled in (True, False):
        decoder.native_decode_enabled = enabled
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(NativeDecodeStack, "run", counting_run)
            outputs = llm.generate(PROMPTS, params)
        runs[enabled] = [(out.outputs[0].token_ids, out.outputs[0].logprobs) for out in outputs]
    # the stack ran every decode step (batches of 3 rows, then fewer), the modules the rest
    stack = decoder._native_decode
    assert stack is not None
    # int8 weights without int8 prefill: from 128 rows the modules dequantize, so do they
    assert stack.max_rows == (w8a8.DEQUANTIZE_MIN_ROWS - 1 if quantization == "int8"
                              else sys.maxsize)
    assert stack.bf16 == (quantization is None)
    assert stack.bf16_in_place == (quantization is None and in_place)
    assert stack.applies_final_norm  # the model's norm in the last native call: same bits
    assert len(calls) >= 23 and all(calls)
    assert runs[True] == runs[False]
    assert all(len(tokens) == 24 for tokens, _ in runs[True])


@pytest.mark.parametrize(("arch", "quantization", "dtype", "overrides"), [
    ("qwen3", "int4", "bfloat16", {}),  # per-head q/k norms
    ("qwen3", None, "bfloat16", {}),
    ("llama", None, "float32", {}),  # the native kernels take bf16
    ("qwen2", "int4", "bfloat16", {"use_sliding_window": True, "sliding_window": 16,
                                   "max_window_layers": 0}),
])
def test_models_the_stack_does_not_compute_run_the_modules(
        arch: str, quantization: str | None, dtype: str, overrides: dict[str, object],
        tmp_path: Path) -> None:
    model_dir = save_tiny_model(arch, tmp_path / arch, **WIDE, **overrides)
    llm = LLM(str(model_dir), device="cpu", dtype=dtype, quantization=quantization,
              num_blocks=64, block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outputs = llm.generate(PROMPTS[:2], params)
    assert all(len(out.outputs[0].token_ids) == 4 for out in outputs)
    decoder = _decoder(llm)
    assert decoder._native_decode_built and decoder._native_decode is None


def test_a_stack_of_bf16_and_quantized_layers_runs_the_modules(
        model_dirs: dict[str, Path]) -> None:
    """Each layer alone is one the stack computes, but not both ways at once."""
    if not _has_column_kernel():
        pytest.skip("the native decode stack needs the AVX-512 VNNI kernels")
    llm = LLM(str(model_dirs["llama"]), device="cpu", dtype="bfloat16", num_blocks=64,
              block_size=4)
    decoder = _decoder(llm)
    for linear in (decoder.layers[1].self_attn.qkv_proj, decoder.layers[1].self_attn.o_proj,
                   decoder.layers[1].mlp.gate_up_proj, decoder.layers[1].mlp.down_proj):
        dense = linear.packed_weight.to_dense()  # the packed copy, back to [out, in]
        assert dense.shape == (linear.out_features, linear.in_features)
        linear.packed_weight, linear.packed_address = None, None
        linear.weight = torch.nn.Parameter(dense, requires_grad=False)
        assert linear.quantize_int4()
    assert NativeDecodeStack.build(list(decoder.layers), single_rank=True) is None
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert len(llm.generate(PROMPTS[:1], params)[0].outputs[0].token_ids) == 4


def test_bf16_rows_past_one_pass_over_wide_blocks_run_through_torch(tmp_path: Path) -> None:
    """A down projection over 8192 inputs has 1 MiB blocks, which would not stay in L2 between
    passes: packed_bf16 takes one pass's worth of rows (6), so the one native call does too and
    steps with more rows call the matmuls from Python (oneDNN's), still bit-identical."""
    if not _has_column_kernel() or not has_bf16_dot_products():
        pytest.skip("needs the AVX-512 VNNI kernels and AVX512-BF16")
    wide_mlp = dict(WIDE, intermediate_size=8192)
    llm = LLM(str(save_tiny_model("llama", tmp_path / "llama", **wide_mlp)), device="cpu",
              dtype="bfloat16", num_blocks=128, block_size=4, enable_prefix_caching=False)
    decoder = _decoder(llm)
    prompts = [[11 + i, 200, 37, 401 - i, 9] for i in range(8)]
    # 8 decode rows for 3 steps, then 4 rows
    params = [SamplingParams(temperature=0.0, max_tokens=4 if i < 4 else 8, ignore_eos=True,
                             logprobs=2) for i in range(8)]
    runs, rows_by_path = {}, []
    real_run_bf16, real_run = NativeDecodeStack._run_bf16, NativeDecodeStack.run

    def recording_run(self: NativeDecodeStack, hidden: torch.Tensor,
                      *args: object) -> torch.Tensor | None:
        result = real_run(self, hidden, *args)  # type: ignore[arg-type]
        rows_by_path.append(("stack" if result is not None else "modules", hidden.shape[0]))
        return result

    def recording_run_bf16(self: NativeDecodeStack, lib: object, hidden: torch.Tensor,
                           *args: object) -> torch.Tensor:
        rows_by_path.append(("torch", hidden.shape[0]))
        return real_run_bf16(self, lib, hidden, *args)  # type: ignore[arg-type]

    for enabled in (True, False):
        decoder.native_decode_enabled = enabled
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(NativeDecodeStack, "_run_bf16", recording_run_bf16)
            patch.setattr(NativeDecodeStack, "run", recording_run)
            outputs = llm.generate(prompts, params)
        runs[enabled] = [(out.outputs[0].token_ids, out.outputs[0].logprobs) for out in outputs]
    stack = decoder._native_decode
    assert stack is not None and stack.bf16_in_place
    assert stack.bf16_max_rows == packed_bf16.ROWS_PER_PASS
    assert runs[True] == runs[False]
    assert [len(tokens) for tokens, _ in runs[True]] == [4] * 4 + [8] * 4
    # every decode step took the stack: the 8-row ones calling the matmuls from Python, the
    # 4-row ones as the one native call
    assert ("modules", 8) not in rows_by_path and ("modules", 4) not in rows_by_path
    torch_rows = {rows for path, rows in rows_by_path if path == "torch"}
    assert torch_rows == {8} and ("stack", 4) in rows_by_path

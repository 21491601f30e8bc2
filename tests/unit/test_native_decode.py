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
from engine.kernels import w8a8
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
        linear.packed_weight = None
        linear.weight = torch.nn.Parameter(dense, requires_grad=False)
        assert linear.quantize_int4()
    assert NativeDecodeStack.build(list(decoder.layers), single_rank=True) is None
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert len(llm.generate(PROMPTS[:1], params)[0].outputs[0].token_ids) == 4

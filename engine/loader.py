"""Model loading, the entry point: resolve a directory, .gguf file or hub id to an HF-style
directory, build our decoder on the meta device, stream the checkpoint's weights into it, then
quantize or prepack its matmul weights for the device."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from engine.attention import get_attention_backend
from engine.attention.base import AttentionBackend
from engine.errors import InvalidRequestError, UnsupportedModelError
from engine.kernels import w8a8
from engine.kernels.native import native_library
from engine.layers.linear import Linear, can_prepack
from engine.layers.rotary import rope_settings
from engine.model_source import resolve_model_dir
from engine.models import CausalLM, get_model_class
from engine.progress import Stage, stage
from engine.runtime import (
    release_free_heap,
    resolve_device,
    resolve_dtype,
    single_threaded_setup,
)
from engine.weights import checkpoint_numel, checkpoint_weights

# single_threaded_setup is also imported from here (engine/model_runner.py)
__all__ = ["LoadedModel", "build_empty_model", "load_model", "single_threaded_setup"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """Everything the engine needs from a checkpoint, ready on its device."""

    model: CausalLM
    hf_config: transformers.PretrainedConfig
    tokenizer: transformers.PreTrainedTokenizerBase
    generation_config: transformers.GenerationConfig | None
    model_dir: Path
    dtype: torch.dtype
    device: torch.device

    @property
    def max_positions(self) -> int:
        """The positions the checkpoint has (its context limit); 2048 when its config names
        none. linear/dynamic/yarn RoPE scaling stretches it (as vLLM derives the length)."""
        config = self.hf_config
        configured = int(getattr(config, "max_position_embeddings", None)
                         or getattr(config, "n_positions", None) or 2048)
        return max(configured, rope_settings(config).scaled_max_position)


def load_model(model: str, dtype: str = "auto", device: str = "auto", allow_pickle: bool = False,
               trust_remote_code: bool = False, tokenizer: str | None = None,
               attn_backend: AttentionBackend | str | None = None,
               quantization: str | None = None) -> LoadedModel:
    """Load `model` (a directory with config.json, a .gguf file or a hub id) with our own
    decoder implementation, weights streamed straight into their final dtype and device."""
    with single_threaded_setup():
        loaded = _load_model(model, dtype, device, allow_pickle, trust_remote_code, tokenizer,
                             attn_backend, quantization)
    release_free_heap()
    return loaded


def _load_model(model: str, dtype: str, device: str, allow_pickle: bool,
                trust_remote_code: bool, tokenizer: str | None,
                attn_backend: AttentionBackend | str | None,
                quantization: str | None) -> LoadedModel:
    model_dir = resolve_model_dir(model)
    hf_config = _load_config(model_dir, trust_remote_code)
    model_cls = get_model_class(hf_config)
    torch_device = resolve_device(device)
    if quantization is not None and torch_device.type != "cpu":
        raise InvalidRequestError(
            f"quantization {quantization!r} runs on CPU only, the device is {torch_device}")
    torch_dtype = resolve_dtype(dtype, hf_config, torch_device)
    logger.info("config: %s from %s, dtype %s%s, device %s", model_cls.__name__, model_dir,
                str(torch_dtype).removeprefix("torch."),
                _auto_dtype_reason(hf_config, torch_dtype) if dtype == "auto" else "",
                torch_device)
    # checked before anything is built, so a missing-weights error costs nothing
    weights = checkpoint_weights(model_dir, allow_pickle, torch_dtype)
    started = time.perf_counter()
    # a backend object (tests), or a name from ATTENTION_BACKENDS (None: env, else "auto")
    backend = (attn_backend if attn_backend is not None and not isinstance(attn_backend, str)
               else get_attention_backend(torch_device, attn_backend))
    module = build_empty_model(model_cls, hf_config, backend, torch_dtype, torch_device)
    with stage("loading weights", total=checkpoint_numel(model_dir), unit="param",
               unit_scale=True) as progress:
        module.load_weights(_advancing(weights, progress))
    module.eval()
    num_params = sum(param.numel() for param in module.parameters())
    logger.info("weights loaded in %.2f s: %d params (%.2f GB)", time.perf_counter() - started,
                num_params, num_params * torch_dtype.itemsize / 1e9)
    if torch_device.type == "cpu" and torch_dtype == torch.bfloat16:
        native_library()  # built (once, ~2 s) now rather than during the first request
    # after counting: both empty the dense weights they replace
    if quantization == "int8":
        _quantize_int8(module)
    if can_prepack(torch_dtype, torch_device):
        _prepack(module)
    with stage("loading tokenizer", log=logger):
        loaded_tokenizer = _load_tokenizer(tokenizer or str(model_dir), trust_remote_code)
    return LoadedModel(
        model=module, hf_config=hf_config, tokenizer=loaded_tokenizer,
        generation_config=_load_generation_config(model_dir), model_dir=model_dir,
        dtype=torch_dtype, device=torch_device,
    )


def _advancing(weights: Iterator[tuple[str, torch.Tensor]],
               progress: Stage) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights, advancing the stage by each tensor's elements once it has been copied."""
    for name, tensor in weights:
        yield name, tensor
        progress.advance(tensor.numel())


def _prepack(module: CausalLM) -> None:
    with stage("prepacking weights for oneDNN") as progress:
        packed = module.prepack_weights()
    if packed:
        logger.info("%d matmul weights prepacked for oneDNN in %.2f s", packed,
                    progress.seconds)


def _auto_dtype_reason(hf_config: transformers.PretrainedConfig, chosen: torch.dtype) -> str:
    """Why "auto" chose `chosen`, where it is not simply the checkpoint's dtype."""
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    stored_name = str(stored).removeprefix("torch.") if stored is not None else "float32"
    if stored_name == str(chosen).removeprefix("torch."):
        return " (auto: the checkpoint's)"
    if stored_name == "float16":
        return " (auto: the checkpoint is float16, slow on CPU)"
    if chosen == torch.bfloat16:
        return f" (auto: the checkpoint is {stored_name}; this CPU computes bfloat16 natively)"
    return f" (auto: the checkpoint is {stored_name})"


def _quantize_int8(module: CausalLM) -> None:
    started = time.perf_counter()
    with stage("quantizing weights to int8"):
        quantized, kept = module.quantize_weights_int8()
    int8_bytes = sum(m.int8_weight.data.numel() for m in module.modules()
                     if isinstance(m, Linear) and m.int8_weight is not None)
    native = native_library() is not None
    logger.info("int8: %d matmul weights quantized in %.2f s (%.2f GB)%s, %s", quantized,
                time.perf_counter() - started, int8_bytes / 1e9,
                f", {kept} kept in the model dtype (in_features not a multiple of "
                f"{w8a8.BLOCK})" if kept else "",
                "native VNNI kernel" if native else "torch fallback kernel (slow)")


def build_empty_model(model_cls: type[CausalLM], hf_config: transformers.PretrainedConfig,
                      attn_backend: AttentionBackend, dtype: torch.dtype,
                      device: torch.device) -> CausalLM:
    """The model with uninitialized parameters in `dtype` on `device`. Built on the meta device
    first so no weight is ever allocated (or randomly initialized) twice."""
    with torch.device("meta"):
        model = model_cls(hf_config, attn_backend)
    materialized: dict[int, nn.Parameter] = {}  # by id: tied parameters stay one tensor
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in materialized:
                storage = torch.empty(param.shape, dtype=dtype, device=device)
                materialized[id(param)] = nn.Parameter(storage, requires_grad=False)
            setattr(module, name, materialized[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            assert not buffer.is_meta, f"buffer {name} must be built on a real device"
            setattr(module, name, buffer.to(device))  # keeps its own dtype (RoPE table: fp32)
    return model


def _load_config(model_dir: Path, trust_remote_code: bool) -> transformers.PretrainedConfig:
    try:
        return transformers.AutoConfig.from_pretrained(model_dir,
                                                       trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc


def _load_tokenizer(source: str, trust_remote_code: bool) -> transformers.PreTrainedTokenizerBase:
    try:
        return transformers.AutoTokenizer.from_pretrained(source,
                                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"cannot load a tokenizer from {source}: {exc}") from exc


def _load_generation_config(model_dir: Path) -> transformers.GenerationConfig | None:
    if not (model_dir / "generation_config.json").is_file():
        return None
    return transformers.GenerationConfig.from_pretrained(model_dir)

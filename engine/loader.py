"""Model loading, the entry point: resolve a directory, .gguf file or hub id to an HF-style
directory, build our decoder on the meta device, stream the checkpoint's weights into it, then
quantize or prepack its matmul weights for the device. GPTQ/AWQ checkpoints load their int4
weights straight into int4 layers (engine/quantized_checkpoint.py converts the packings)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from engine.attention import get_attention_backend
from engine.attention.base import AttentionBackend
from engine.distributed.parallel import SINGLE, Parallel
from engine.errors import InvalidRequestError, UnsupportedModelError
from engine.kernels import w4a16, w8a8
from engine.kernels.native import native_library
from engine.kernels.portable import portable_library
from engine.layers.linear import Linear, can_prepack
from engine.layers.parallel import VocabParallelEmbedding
from engine.layers.rotary import rope_settings
from engine.model_source import resolve_model_dir
from engine.models import CausalLM, get_model_class
from engine.progress import Stage, stage
from engine.quantized_checkpoint import (
    CheckpointQuantization,
    checkpoint_quantization,
    convert_weights,
    group_index,
)
from engine.runtime import (
    HUGE_PAGES_ENV,
    collapse_into_huge_pages,
    huge_pages_allowed,
    keep_step_buffers_resident,
    release_free_heap,
    resolve_device,
    resolve_dtype,
    single_threaded_setup,
)
from engine.weights import checkpoint_numel, checkpoint_tensor_names, checkpoint_weights

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
    parallel: Parallel = SINGLE  # this rank's part of a tensor/pipeline parallel group

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
               quantization: str | None = None, parallel: Parallel = SINGLE) -> LoadedModel:
    """Load `model` (a directory with config.json, a .gguf file or a hub id) with our own
    decoder implementation, weights streamed straight into their final dtype and device.
    Under tensor/pipeline parallelism (`parallel`) only this rank's part is built and read."""
    with single_threaded_setup():
        loaded = _load_model(model, dtype, device, allow_pickle, trust_remote_code, tokenizer,
                             attn_backend, quantization, parallel)
    release_free_heap()
    if loaded.device.type == "cpu":
        keep_step_buffers_resident()
        _weights_onto_huge_pages(loaded.model)
    return loaded


def _weights_onto_huge_pages(model: CausalLM) -> None:
    """The matmul weights onto 2 MB pages, where a one-row decode step streams them faster
    (runtime.collapse_into_huge_pages); logged either way."""
    regions = model.matmul_weight_regions()
    weights_gb = sum(nbytes for _, nbytes in regions) / 1e9
    started = time.perf_counter()
    gained = collapse_into_huge_pages(regions)
    if gained is None:
        logger.info("matmul weights (%.2f GB) left on 4 KB pages: %s", weights_gb,
                    "this kernel cannot collapse memory into huge pages (Linux 6.1+)"
                    if huge_pages_allowed() else f"{HUGE_PAGES_ENV}=0, or not Linux")
    else:
        logger.info("matmul weights (%.2f GB) onto 2 MB pages: %.2f GB collapsed in %.2f s",
                    weights_gb, gained / 1e9, time.perf_counter() - started)


def _load_model(model: str, dtype: str, device: str, allow_pickle: bool,
                trust_remote_code: bool, tokenizer: str | None,
                attn_backend: AttentionBackend | str | None,
                quantization: str | None, parallel: Parallel) -> LoadedModel:
    model_dir = resolve_model_dir(model)
    hf_config = _load_config(model_dir, trust_remote_code)
    model_cls = get_model_class(hf_config)
    torch_device = resolve_device(device)
    quantized_checkpoint = _checkpoint_quantization(hf_config, quantization, parallel)
    if (quantization is not None or quantized_checkpoint) and torch_device.type != "cpu":
        raise InvalidRequestError(
            f"quantization {quantization or 'int4'!r} runs on CPU only, the device is "
            f"{torch_device}")
    torch_dtype = resolve_dtype(dtype, hf_config, torch_device)
    logger.info("config: %s from %s, dtype %s%s, device %s", model_cls.__name__, model_dir,
                str(torch_dtype).removeprefix("torch."),
                _auto_dtype_reason(hf_config, torch_dtype) if dtype == "auto" else "",
                torch_device)
    # checked before anything is built, so a missing-weights error costs nothing
    # GPTQ/AWQ scales stay float16 (converting them to bf16 while read would round them)
    weights = checkpoint_weights(model_dir, allow_pickle,
                                 None if quantized_checkpoint else torch_dtype)
    started = time.perf_counter()
    # a backend object (tests), or a name from ATTENTION_BACKENDS (None: env, else "auto")
    backend = (attn_backend if attn_backend is not None and not isinstance(attn_backend, str)
               else get_attention_backend(torch_device, attn_backend))
    module = build_empty_model(model_cls, hf_config, backend, torch_dtype, torch_device,
                               parallel)
    group_indices: dict[str, torch.Tensor] = {}  # GPTQ g_idx by checkpoint module name
    int4_layers: dict[str, Linear] = {}
    if quantized_checkpoint is not None:
        int4_layers = _prepare_int4_layers(module, model_dir, quantized_checkpoint)
        weights = convert_weights(weights, quantized_checkpoint, group_indices)
    with stage("loading weights", total=checkpoint_numel(model_dir), unit="param",
               unit_scale=True) as progress:
        module.load_weights(_advancing(weights, progress),
                            _quantize_when_loaded(module, quantization)
                            if quantization is not None and quantized_checkpoint is None
                            else None)
    if quantized_checkpoint is not None:
        _finish_int4_layers(module, int4_layers, group_indices, quantized_checkpoint)
    module.eval()
    num_params = sum(param.numel() for param in module.parameters())
    logger.info("weights loaded in %.2f s: %d params (%.2f GB)", time.perf_counter() - started,
                num_params, num_params * torch_dtype.itemsize / 1e9)
    if torch_device.type == "cpu" and torch_dtype == torch.bfloat16:
        native_library()  # built (once, ~2 s) now rather than during the first request
    if torch_device.type == "cpu":  # likewise (~1 s): float32 decode attention, int4 decode;
        portable_library()  # built inside a parallel step it could outlast the step's timeout
    # after counting: both empty the dense weights they replace
    if quantization is not None and quantized_checkpoint is None:
        _quantize(module, quantization)
    if can_prepack(torch_dtype, torch_device):
        _prepack(module)
    with stage("loading tokenizer", log=logger):
        loaded_tokenizer = _load_tokenizer(tokenizer or str(model_dir), trust_remote_code)
    return LoadedModel(
        model=module, hf_config=hf_config, tokenizer=loaded_tokenizer,
        generation_config=_load_generation_config(model_dir), model_dir=model_dir,
        dtype=torch_dtype, device=torch_device, parallel=parallel,
    )


def _advancing(weights: Iterator[tuple[str, torch.Tensor]],
               progress: Stage) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights, advancing the stage by each tensor's elements once it has been copied.
    Holds no tensor while the next is read (a 545 MB head would overlap the embedding)."""
    for name, tensor in weights:
        numel = tensor.numel()
        yield name, tensor
        del tensor
        progress.advance(numel)


def _prepack(module: CausalLM) -> None:
    with stage("prepacking weights for oneDNN") as progress:
        packed = module.prepack_weights()
    if packed:
        in_place = sum(1 for layer in module.modules()
                       if isinstance(layer, Linear) and layer.packed_address is not None)
        logger.info("%d matmul weights prepacked for oneDNN in %.2f s; decode reads %d of them "
                    "in place (engine/kernels/packed_bf16.py)", packed, progress.seconds,
                    in_place)


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


def _quantize(module: CausalLM, quantization: str) -> None:
    """--quantization int8 or int4 at load, and one line saying what it did."""
    started = time.perf_counter()
    bits, int8_prefill, head_and_embedding = _quantization_args(quantization)
    with stage(f"quantizing weights to {quantization}"):
        quantized, kept = module.quantize_weights(bits, int8_prefill, head_and_embedding)
    if bits == 8:
        weights = [m.int8_weight for m in module.modules()
                   if isinstance(m, Linear) and m.int8_weight is not None]
        num_bytes = sum(w.shape[0] * w.shape[1] for w in weights)
        columns = w8a8.BLOCK
        packed = sum(w.columns is not None for w in weights)
        kernel = (f"native VNNI kernels (a GEMM over column-packed weights, {packed} of them)"
                  if native_library() is not None
                  else "portable kernel (no AVX-512 here)" if portable_library() is not None
                  else "torch fallback kernel (slow)")
    else:
        num_bytes, columns = _int4_bytes(module), w4a16.GROUP_SIZE
        kernel = w4a16.kernel_description()
    embeddings = [m.int8_rows for m in module.modules()
                  if isinstance(m, VocabParallelEmbedding) and m.int8_rows is not None]
    embedding_bytes = sum(e.data.nbytes + e.scales.nbytes for e in embeddings)
    if not head_and_embedding:
        ends = "; LM head and token embedding kept in the model dtype"
    elif embeddings:
        ends = f"; token embedding as int8 rows ({embedding_bytes / 1e9:.2f} GB)"
    else:
        ends = ""
    logger.info("%s: %d matmul weights quantized in %.2f s (%.2f GB)%s, %s%s", quantization,
                quantized, time.perf_counter() - started, num_bytes / 1e9,
                f", {kept} kept in the model dtype (in_features not a multiple of {columns})"
                if kept else "", kernel, ends)


def _quantization_args(quantization: str) -> tuple[int, bool, bool]:
    """--quantization as (bits, int8 activations for prefill too, the LM head and the token
    embedding quantized too): int8 (8, False, True), w8a8 (8, True, False), int4 (4, False,
    True). w8a8 keeps the LM head and the embedding in the model dtype, as W8A8 checkpoints
    (llm-compressor's schemes) leave the head: on the default model, teacher-forced over 768
    answer tokens, they take its agreement with bf16 from 98.4% to 99.0% and its answer NLL
    from +1.03% to +0.71%, for the head's bf16 bytes at every step."""
    return ((4 if quantization == "int4" else 8), quantization == "w8a8",
            quantization != "w8a8")


def _quantize_when_loaded(model: CausalLM, quantization: str) -> Callable[[str], None]:
    """The loader's per-module callback under --quantization: each Linear (and the token
    embedding, unless a tied head still needs it whole) is quantized as soon as its weights
    are written, and its float weight freed, so the float model is never resident whole
    (the default model in fp32: 2.5 GB). `_quantize` then does what is left (a tied head's
    copy, stacked MoE experts) and says what was done."""
    bits, int8_prefill, head_and_embedding = _quantization_args(quantization)

    def quantize(name: str) -> None:
        layer = model.get_submodule(name)
        if isinstance(layer, Linear):
            if head_and_embedding or layer is not model.output_head():
                layer.quantize(bits, int8_prefill)
        elif (isinstance(layer, VocabParallelEmbedding) and head_and_embedding
              and not model.needs_tied_head_copy()):
            layer.quantize_int8()

    return quantize


def _int4_bytes(module: CausalLM) -> int:
    return sum(m.int4_weight.nbytes for m in module.modules()
               if isinstance(m, Linear) and m.int4_weight is not None)


def _checkpoint_quantization(hf_config: transformers.PretrainedConfig,
                             quantization: str | None,
                             parallel: Parallel) -> CheckpointQuantization | None:
    found = checkpoint_quantization(hf_config)
    if found is not None and quantization not in (None, "int4"):
        raise InvalidRequestError(f"the checkpoint is already {found.name()}: load it with "
                                  f"--quantization int4 or none, not {quantization!r}")
    if found is not None and parallel.tp_size > 1:
        # its packed int4 rows and groups are not cut per rank yet
        raise UnsupportedModelError(f"{found.name()} checkpoints cannot be split for tensor "
                                    f"parallelism yet (tensor parallel size {parallel.tp_size})")
    return found


def _prepare_int4_layers(module: CausalLM, model_dir: Path,
                         quantization: CheckpointQuantization) -> dict[str, Linear]:
    """The Linears the checkpoint's qweight tensors fill, by module name, given empty int4
    parameters in place of their dense weights (read from the safetensors headers)."""
    if not module.loads_int4_checkpoints:
        raise UnsupportedModelError(f"{quantization.name()} checkpoints of "
                                    f"{type(module).__name__} are not supported yet")
    layers: dict[str, Linear] = {}
    for name in checkpoint_tensor_names(model_dir):
        target = module.map_checkpoint_name(name) if name.endswith(".qweight") else None
        layer_name = "" if target is None else target.param_name.rpartition(".")[0]
        if target is None or layer_name in layers:
            continue
        layer = module.get_submodule(layer_name)
        if not isinstance(layer, Linear):
            raise UnsupportedModelError(f"{quantization.name()} tensor {name!r} does not "
                                        "belong to a linear layer")
        layer.prepare_int4_load(quantization.group_size or layer.in_features)
        layers[layer_name] = layer
    if not layers:
        raise UnsupportedModelError(f"config.json says {quantization.name()}, but the "
                                    "checkpoint has no qweight tensors (safetensors)")
    return layers


def _finish_int4_layers(module: CausalLM, layers: dict[str, Linear],
                        group_indices: dict[str, torch.Tensor],
                        quantization: CheckpointQuantization) -> None:
    """Give each int4 layer its int4_weight, with the group index its shards' g_idx agree on."""
    by_layer: dict[str, list[torch.Tensor]] = {}
    for checkpoint_module, index in group_indices.items():
        target = module.map_checkpoint_name(f"{checkpoint_module}.qweight")
        if target is not None:
            by_layer.setdefault(target.param_name.rpartition(".")[0], []).append(index)
    for layer_name, layer in layers.items():
        indices = by_layer.get(layer_name)
        layer.finish_int4_load(None if not indices else group_index(
            indices, layer.in_features, layer.int4_group_size))
    embeddings = module.quantize_embeddings()
    logger.info("int4: %d matmul weights loaded from a %s checkpoint (%.2f GB), %s%s",
                len(layers), quantization.name(), _int4_bytes(module) / 1e9,
                w4a16.kernel_description(),
                "; token embedding as int8 rows" if embeddings else "")


def build_empty_model(model_cls: type[CausalLM], hf_config: transformers.PretrainedConfig,
                      attn_backend: AttentionBackend, dtype: torch.dtype,
                      device: torch.device, parallel: Parallel = SINGLE) -> CausalLM:
    """The model (this rank's part of it) with uninitialized parameters in `dtype` on
    `device`. Built on the meta device first so no weight is ever allocated (or randomly
    initialized) twice."""
    with torch.device("meta"):
        model = model_cls(hf_config, attn_backend, parallel)
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


# Tokenizer classes (transformers 5) that keep, as Python objects, the vocabulary and merges
# they built their Rust tokenizer from, and read them only while constructing it
_BUILT_FROM_ATTRIBUTES = ("_vocab", "_merges")
_KEEPS_WHAT_IT_BUILT_FROM = frozenset({"GPT2Tokenizer", "LlamaTokenizer", "Qwen2Tokenizer"})


def _load_tokenizer(source: str, trust_remote_code: bool) -> transformers.PreTrainedTokenizerBase:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"cannot load a tokenizer from {source}: {exc}") from exc
    drop_construction_copies(tokenizer)
    return tokenizer


def drop_construction_copies(tokenizer: transformers.PreTrainedTokenizerBase) -> int:
    """Free the Python copies of the vocabulary and merges that the tokenizer classes in
    _KEEPS_WHAT_IT_BUILT_FROM hold after building their Rust tokenizer, which alone encodes,
    decodes and answers get_vocab: for the default model's 151k-token vocabulary, a dict and a
    list of ~151k entries each, 62 MB of RSS. Returns how many attributes were dropped."""
    if type(tokenizer).__name__ not in _KEEPS_WHAT_IT_BUILT_FROM:
        return 0
    dropped = [name for name in _BUILT_FROM_ATTRIBUTES if hasattr(tokenizer, name)]
    for name in dropped:
        delattr(tokenizer, name)
    return len(dropped)


def _load_generation_config(model_dir: Path) -> transformers.GenerationConfig | None:
    if not (model_dir / "generation_config.json").is_file():
        return None
    return transformers.GenerationConfig.from_pretrained(model_dir)

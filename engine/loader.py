"""Model loading: resolve a directory, .gguf file or hub id to an HF-style directory, then
build our decoder on the meta device and stream safetensors into it tensor by tensor."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
import transformers
from torch import nn

from engine.attention import get_attention_backend
from engine.attention.base import AttentionBackend
from engine.errors import InvalidRequestError, UnsupportedModelError
from engine.kernels import w8a8
from engine.kernels.native import native_library
from engine.layers.linear import Linear, can_prepack
from engine.models import CausalLM, get_model_class

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors",
                 "model.safetensors.index.json", "tokenizer*", "vocab.json", "merges.txt",
                 "special_tokens_map.json", "added_tokens.json", "chat_template.*"]
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_READ_CHUNK_BYTES = 16 << 20  # conversion granularity: bounds the transient source-dtype copy


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


def resolve_device(device: str) -> torch.device:
    """"auto" is CUDA when available, else CPU; an explicit CUDA request must be satisfiable."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise InvalidRequestError(f"unknown device {device!r}", param="device") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' requested but CUDA is not available",
                                  param="device")
    return resolved


def resolve_dtype(dtype: str, hf_config: transformers.PretrainedConfig,
                  device: torch.device) -> torch.dtype:
    """Explicit dtypes are honored. "auto" takes the checkpoint's dtype (float32 when it
    names none we support), except float16 on CPU becomes bfloat16: CPU fp16 matmuls are slow."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise InvalidRequestError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, "
                                      f"got {dtype!r}", param="dtype")
        return _DTYPES[dtype]
    resolved = _config_dtype(hf_config) or torch.float32
    if resolved == torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return resolved


def _config_dtype(hf_config: transformers.PretrainedConfig) -> torch.dtype | None:
    # transformers 5 calls it `dtype`, 4 `torch_dtype`; either a string or a torch.dtype.
    for attr in ("dtype", "torch_dtype"):
        value = getattr(hf_config, attr, None)
        if isinstance(value, str):
            value = _DTYPES.get(value.removeprefix("torch."))
        if value in _DTYPES.values():
            return value
    return None


@contextlib.contextmanager
def single_threaded_setup() -> Iterator[None]:
    """Run the enclosed torch work on one intra-op thread; the global count is left as it was.

    libgomp keeps an OpenMP thread team for every thread that ever ran a parallel region, for
    as long as that thread lives. Once there are more team threads than cores it stops
    spinning between regions, so every matmul of a decode step pays a futex wake-up: 15-35%
    slower steps on 2 cores. Setup usually runs in a helper thread that outlives it
    (asyncio.to_thread), so setup must not start a team: the thread that steps the engine
    should own the only one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)  # no team is started until a parallel region runs


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


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc only; a no-op elsewhere). Loading
    frees read buffers and, when prepacking, every dense weight; glibc would otherwise keep
    ~50 MB of that counted in our RSS for the life of the process."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
    logger.info("config: %s from %s, dtype %s, device %s", model_cls.__name__, model_dir,
                str(torch_dtype).removeprefix("torch."), torch_device)
    # checked before anything is built, so a missing-weights error costs nothing
    weights = _checkpoint_weights(model_dir, allow_pickle, torch_dtype)
    started = time.perf_counter()
    # a backend object (tests), or a name from ATTENTION_BACKENDS (None: env, else "auto")
    backend = (attn_backend if attn_backend is not None and not isinstance(attn_backend, str)
               else get_attention_backend(torch_device, attn_backend))
    module = build_empty_model(model_cls, hf_config, backend, torch_dtype, torch_device)
    module.load_weights(weights)
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
        packed = module.prepack_weights()
        if packed:
            logger.info("%d matmul weights prepacked for oneDNN", packed)
    return LoadedModel(
        model=module, hf_config=hf_config,
        tokenizer=_load_tokenizer(tokenizer or str(model_dir), trust_remote_code),
        generation_config=_load_generation_config(model_dir), model_dir=model_dir,
        dtype=torch_dtype, device=torch_device,
    )


def _quantize_int8(module: CausalLM) -> None:
    started = time.perf_counter()
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


def resolve_model_dir(model: str) -> Path:
    """A local HF-style directory for `model`: as given, converted from GGUF, or downloaded."""
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UnsupportedModelError(f"GGUF file {path} does not exist")
        from engine.gguf import convert_gguf  # heavy (transformers GGUF path): only when used

        return Path(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnsupportedModelError(f"{path} is not a model directory: it has no config.json")
        return path
    if path.exists():
        raise UnsupportedModelError(f"{path} is neither a model directory nor a .gguf file")
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise UnsupportedModelError(f"model path {model} does not exist")
    return _download(model)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        raise UnsupportedModelError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}); the hub may be unreachable: pass a local model directory "
            "(config.json + *.safetensors) or a .gguf file instead") from exc


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


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: those the shard index names, else all of them."""
    index = model_dir / _SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob("*.safetensors"))


def iter_safetensors(model_dir: Path,
                     dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a single-file or sharded safetensors checkpoint, one
    at a time. Read with plain file reads, not mmap: mapped pages count as our RSS, and a 2.5 GB
    fp32 file would double peak memory. With `dtype`, floating tensors are converted chunk by
    chunk while read, so a float32 tensor never exists whole when loading in bfloat16."""
    files = safetensors_files(model_dir)
    if not files:
        raise UnsupportedModelError(f"no *.safetensors weights in {model_dir}")
    for path in files:
        with path.open("rb", buffering=0) as file:
            header, data_start = _read_header(path, file)
            # in file order, so the reads are sequential
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                yield name, _read_tensor(file, data_start, info, dtype)


def _read_header(path: Path, file: BinaryIO) -> tuple[dict[str, dict], int]:
    """The safetensors header: 8 bytes little-endian length, then that much JSON."""
    try:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    except (struct.error, ValueError) as exc:
        raise UnsupportedModelError(f"{path} is not a valid safetensors file") from exc
    header.pop("__metadata__", None)
    return header, 8 + length


def _read_tensor(file: BinaryIO, data_start: int, info: dict,
                 dtype: torch.dtype | None) -> torch.Tensor:
    source = _SAFETENSORS_DTYPES.get(info["dtype"])
    if source is None:
        raise UnsupportedModelError(f"safetensors dtype {info['dtype']} is not supported")
    shape, (begin, end) = info["shape"], info["data_offsets"]
    file.seek(data_start + begin)
    target = dtype if dtype is not None and source.is_floating_point else source
    if target == source or begin == end:
        data = bytearray(end - begin)
        _read_exact(file, memoryview(data))
        if not data:
            return torch.empty(shape, dtype=target)
        return torch.frombuffer(data, dtype=source).view(shape)  # shares `data`, no copy
    out = torch.empty(shape, dtype=target).view(-1)
    chunk = bytearray(min(_READ_CHUNK_BYTES, end - begin))
    chunk_numel = len(chunk) // source.itemsize
    for start in range(0, out.numel(), chunk_numel):
        count = min(chunk_numel, out.numel() - start)
        _read_exact(file, memoryview(chunk)[: count * source.itemsize])
        out[start : start + count].copy_(torch.frombuffer(chunk, dtype=source, count=count))
    return out.view(shape)


def _read_exact(file: BinaryIO, buffer: memoryview) -> None:
    filled = 0
    while filled < len(buffer):
        num_read = file.readinto(buffer[filled:])  # type: ignore[attr-defined]
        if not num_read:
            raise UnsupportedModelError(f"{file.name} is truncated")
        filled += num_read


def _pickle_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.bin"))


def iter_pickles(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from PyTorch *.bin state dicts; weights_only and mmap keep it safe-ish
    and lazy, but only with the caller's explicit allow_pickle."""
    for path in files:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from state_dict.items()
        del state_dict


def _checkpoint_weights(model_dir: Path, allow_pickle: bool,
                        dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    if safetensors_files(model_dir):
        return iter_safetensors(model_dir, dtype)
    pickles = _pickle_files(model_dir)
    if not pickles:
        raise UnsupportedModelError(f"no weights in {model_dir}: expected *.safetensors files")
    if not allow_pickle:
        raise UnsupportedModelError(
            f"{model_dir} has only PyTorch pickle weights ({pickles[0].name}); unpickling can "
            "run arbitrary code, so it is off by default: convert them to safetensors, or "
            "pass allow_pickle=True (--allow-pickle) if you trust the checkpoint")
    return iter_pickles(pickles)

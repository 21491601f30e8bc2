"""Checkpoint weights as a stream of (name, tensor): safetensors read with plain file reads,
or PyTorch pickles when the caller explicitly allows them."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from engine.errors import UnsupportedModelError

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_READ_CHUNK_BYTES = 16 << 20  # conversion granularity: bounds the transient source-dtype copy


def checkpoint_weights(model_dir: Path, allow_pickle: bool,
                       dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's weights, read lazily: safetensors when there are any, else pickles
    if the caller allows them; raises at once when there are none it may read."""
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


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: those the shard index names, else all of them."""
    index = model_dir / _SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob("*.safetensors"))


def checkpoint_numel(model_dir: Path) -> int | None:
    """How many elements the checkpoint's safetensors tensors hold, from their headers alone
    (what loading counts its progress in); None without safetensors (pickles would need
    unpickling to tell)."""
    headers = _headers(model_dir)
    if not headers:
        return None
    return sum(math.prod(info["shape"]) for header in headers for info in header.values())


def checkpoint_tensor_names(model_dir: Path) -> list[str]:
    """The names of the checkpoint's safetensors tensors, from their headers alone (which
    layers a GPTQ/AWQ checkpoint quantized, before anything is read)."""
    return [name for header in _headers(model_dir) for name in header]


def _headers(model_dir: Path) -> list[dict[str, dict]]:
    """The header of each safetensors file (tensor name -> dtype, shape, offsets)."""
    headers = []
    for path in safetensors_files(model_dir):
        with path.open("rb") as file:
            headers.append(_read_header(path, file)[0])
    return headers


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

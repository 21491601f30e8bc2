"""GGUF files: the header reader, and conversion once into a cached Hugging Face directory
(weights exactly as transformers dequantizes them), shared by any .gguf model and the default."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from engine.cache_dir import cache_root, file_lock
from engine.errors import UnsupportedModelError
from engine.progress import stage

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_COMPLETE_MARKER = ".pagedserve-complete"
_VERIFIED_SUFFIX = ".verified"
# Tokens that end a turn in common chat formats; llama.cpp likewise treats them as end-of-
# generation by their text, since GGUF stores a single eos id (here <|im_end|> only).
_EOG_TOKEN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>",
                    "<end_of_turn>", "<|end|>")

ScalarValue = str | int | float | bool


def verified_sha256(path: Path) -> str | None:
    """The sha256 recorded for `path`, if its marker still matches the file's size and mtime."""
    marker = path.with_name(path.name + _VERIFIED_SUFFIX)
    try:
        record = json.loads(marker.read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return None
    if record.get("size") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        return None
    sha256 = record.get("sha256")
    return sha256 if isinstance(sha256, str) else None


def write_verified_marker(path: Path, sha256: str) -> None:
    stat = path.stat()
    record = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker = path.with_name(path.name + _VERIFIED_SUFFIX)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, marker)


# ------------------------------------------------------------------------------- GGUF metadata

@dataclass(frozen=True, slots=True)
class GGUFMetadata:
    """A GGUF file's scalar key-values (arrays such as the vocabulary are skipped) and the
    number of tensors of each ggml type."""

    fields: dict[str, ScalarValue]
    tensor_types: dict[str, int]

    def get_int(self, key: str) -> int | None:
        value = self.fields.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def get_str(self, key: str) -> str | None:
        value = self.fields.get(key)
        return value if isinstance(value, str) else None


# GGUF value type -> struct format of one item; 8 (string) and 9 (array) are variable-sized.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: Path) -> GGUFMetadata:
    """Parse the header only. gguf.GGUFReader also materialises the 150k-entry vocabulary
    arrays, which takes seconds; this skips them in well under one."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, num_tensors, num_fields = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise UnsupportedModelError(f"{path} is not a little-endian GGUF v2/v3 file")
        offset, fields = 24, {}
        for _ in range(num_fields):
            key, offset = _read_gguf_string(buf, offset)
            (value_type,) = struct.unpack_from("<I", buf, offset)
            value, offset = _read_gguf_value(buf, offset + 4, value_type)
            if value is not None:
                fields[key] = value
        return GGUFMetadata(fields, _read_tensor_types(buf, offset, num_tensors))


def _read_gguf_string(buf: mmap.mmap, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, offset)
    start = offset + 8
    return buf[start:start + length].decode("utf-8", errors="replace"), start + length


def _read_gguf_value(buf: mmap.mmap, offset: int, value_type: int
                     ) -> tuple[ScalarValue | None, int]:
    """One value at `offset` and the offset after it; arrays are skipped (None)."""
    if value_type == _GGUF_STRING:
        return _read_gguf_string(buf, offset)
    if value_type in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[value_type]
        return struct.unpack_from(fmt, buf, offset)[0], offset + struct.calcsize(fmt)
    if value_type != _GGUF_ARRAY:
        raise UnsupportedModelError(f"unknown GGUF value type {value_type}")
    item_type, count = struct.unpack_from("<IQ", buf, offset)
    offset += 12
    if item_type in _GGUF_SCALARS:
        return None, offset + count * struct.calcsize(_GGUF_SCALARS[item_type])
    for _ in range(count):  # strings or nested arrays: walk item by item
        _, offset = _read_gguf_value(buf, offset, item_type)
    return None, offset


def _read_tensor_types(buf: mmap.mmap, offset: int, num_tensors: int) -> dict[str, int]:
    from gguf import GGMLQuantizationType

    counts: dict[str, int] = {}
    for _ in range(num_tensors):
        _, offset = _read_gguf_string(buf, offset)
        (num_dims,) = struct.unpack_from("<I", buf, offset)
        offset += 4 + 8 * num_dims
        (ggml_type,) = struct.unpack_from("<I", buf, offset)
        offset += 4 + 8  # type, then the data offset
        name = GGMLQuantizationType(ggml_type).name
        counts[name] = counts.get(name, 0) + 1
    return counts


# ----------------------------------------------------------------------------------- conversion

def convert_gguf(gguf_path: Path, out_dir: Path | None = None) -> Path:
    """Convert a .gguf file once into an fp32 safetensors HF directory; later calls return at once.

    Weights are exactly what transformers' own GGUF reader dequantizes. The default out_dir is
    cache_root()/converted/<stem>-<12 hex>, keyed by the file's verified sha256 when a marker
    records it, else by (size, mtime) so arbitrary files need no re-hash.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise UnsupportedModelError(f"GGUF file not found: {gguf_path}")
    out_dir = Path(out_dir) if out_dir is not None else _default_converted_dir(gguf_path)
    if is_converted(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir.with_name(out_dir.name + ".lock")):
        if is_converted(out_dir):  # another process converted it while we waited
            return out_dir
        tmp_dir = out_dir.with_name(f".{out_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            _convert_into(gguf_path, tmp_dir)
            if out_dir.exists():  # an incomplete leftover (no marker) from a killed run
                shutil.rmtree(out_dir)
            os.rename(tmp_dir, out_dir)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def is_converted(out_dir: Path) -> bool:
    """True when `out_dir` holds a finished conversion (the marker is written last)."""
    return (out_dir / _COMPLETE_MARKER).is_file()


def _default_converted_dir(gguf_path: Path) -> Path:
    sha256 = verified_sha256(gguf_path)
    if sha256 is None:
        stat = gguf_path.stat()
        sha256 = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "converted" / f"{gguf_path.stem}-{sha256[:12]}"


def _convert_into(gguf_path: Path, out_dir: Path) -> None:
    start = time.perf_counter()
    with _phase("read GGUF header", gguf_path):
        metadata = read_gguf_metadata(gguf_path)
    logger.info("converting %s (%s, tensor types %s) once; later starts load the result",
                gguf_path.name, metadata.get_str("general.architecture"),
                metadata.tensor_types)
    with _phase("dequantize weights (transformers)", gguf_path):
        model = _load_gguf_model(gguf_path)
    with _phase("save fp32 safetensors", gguf_path):
        _save_model(model, out_dir)
    del model
    gc.collect()  # drop ~2.5 GB of fp32 weights before the tokenizer loads
    with _phase("convert tokenizer", gguf_path):
        tokenizer = _load_gguf_tokenizer(gguf_path)
        _save_tokenizer(tokenizer, metadata, out_dir)
        _save_generation_config(tokenizer, metadata, out_dir)
    _make_readable(out_dir)
    record = {"source": str(gguf_path), "tensor_types": metadata.tensor_types,
              "seconds": round(time.perf_counter() - start, 1)}
    (out_dir / _COMPLETE_MARKER).write_text(json.dumps(record, indent=2))
    logger.info("converted %s in %.1fs", gguf_path.name, time.perf_counter() - start)


def _load_gguf_model(gguf_path: Path) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
            output_loading_info=True)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"transformers cannot read {gguf_path}: {exc}") from exc
    model, info = cast("tuple[PreTrainedModel, dict[str, list[str]]]", loaded)
    # A key missing from the GGUF would be silently random-initialised; refuse instead. A tied
    # lm_head (no output.weight in the file) is shared with the embedding, not missing.
    missing = [key for key in info.get("missing_keys", ())
               if not (key == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing:
        raise UnsupportedModelError(f"{gguf_path.name} lacks weights {sorted(missing)[:8]}")
    return model


def _save_model(model: PreTrainedModel, out_dir: Path) -> None:
    from safetensors import safe_open

    # transformers' GGUF config has no `architectures`; engine registries key on it.
    model.config.architectures = [type(model).__name__]
    # The saved weights are plain fp32: the GGUF quantizer must not follow into config.json,
    # or transformers would try to re-read a GGUF file when loading the directory.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.save_pretrained(out_dir)
    # Qwen2.5-0.5B ties lm_head to the embedding, but this GGUF stores a separate (Q8_0)
    # output.weight, so transformers unties them; either way the saved files must agree with
    # config.tie_word_embeddings or a loader would drop or invent the head.
    saved: set[str] = set()
    for shard in out_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as reader:
            saved.update(reader.keys())
    if not model.config.tie_word_embeddings and "lm_head.weight" not in saved:
        raise UnsupportedModelError("conversion lost lm_head.weight of an untied model")


def _load_gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"transformers cannot read the tokenizer of {gguf_path}: "
                                    f"{exc}") from exc


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, metadata: GGUFMetadata,
                    out_dir: Path) -> None:
    # transformers carries tokenizer.chat_template over from the GGUF (it does for this file);
    # fill it from the raw metadata only if some version or file drops it.
    template = metadata.get_str("tokenizer.chat_template")
    if not tokenizer.chat_template and template:
        logger.info("chat template taken from GGUF metadata")
        tokenizer.chat_template = template
    # The GGUF tokenizer has no model_max_length (it defaults to ~1e30); use the context length.
    architecture = metadata.get_str("general.architecture")
    context_length = metadata.get_int(f"{architecture}.context_length")
    if context_length:
        tokenizer.model_max_length = context_length
    tokenizer.save_pretrained(out_dir)


def _save_generation_config(tokenizer: PreTrainedTokenizerBase, metadata: GGUFMetadata,
                            out_dir: Path) -> None:
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(out_dir)
    # GGUF records one eos id (<|im_end|> here); chat serving must also stop on the other
    # end-of-generation tokens (<|endoftext|>), as the original generation_config.json does.
    config.eos_token_id = eog_token_ids(tokenizer, metadata)
    config._from_model_config = False  # curated now, not a copy of config.json
    config.save_pretrained(out_dir)


def eog_token_ids(tokenizer: PreTrainedTokenizerBase, metadata: GGUFMetadata) -> list[int]:
    """End-of-generation ids: GGUF's eos/eot/eom ids, then known end-of-turn special tokens."""
    ids = [metadata.get_int(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    ids.append(tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, int) else None)
    added = tokenizer.get_added_vocab()
    ids.extend(added.get(text) for text in _EOG_TOKEN_TEXTS)
    return list(dict.fromkeys(token_id for token_id in ids if token_id is not None))


def _make_readable(out_dir: Path) -> None:
    # safetensors writes 0600 files; a shared cache (docker, CI) needs the usual umask modes.
    umask = os.umask(0)
    os.umask(umask)
    for path in out_dir.iterdir():
        path.chmod(0o666 & ~umask)


# ------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _phase(name: str, gguf_path: Path) -> Iterator[None]:
    """One step of a conversion: a bar on a terminal, and a line with its duration. The
    dequantization's bar runs beside transformers' own, which cover only part of it (its
    tensor bar took ~10 s of the step's ~40 s here)."""
    start = time.perf_counter()
    with stage(f"convert: {name}"):
        yield
    logger.info("convert %s: %s took %.1fs", gguf_path.name, name, time.perf_counter() - start)


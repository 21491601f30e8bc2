"""pagedserve's on-disk cache: where it lives, and the cross-process lock that lets only one
process fill an entry (a converted model, a downloaded file, the built kernels)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """$PAGEDSERVE_CACHE_DIR, else ~/.cache/pagedserve."""
    configured = os.environ.get("PAGEDSERVE_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "pagedserve"


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive cross-process lock, so two servers starting at once fill an entry only
    once (and do not both hold ~4 GB while converting a model)."""
    import fcntl  # POSIX only; the server targets Linux and macOS

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

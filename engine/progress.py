"""Progress of the slow start-up stages (GGUF assembly and conversion, weight loading, kernel
builds, quantization, KV allocation): a bar on a terminal, one log line per stage elsewhere."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tqdm import tqdm

SHOW_AFTER_S = 1.0  # a stage shorter than this shows no bar and logs no line of its own
_TICK_S = 0.5  # how often a bar that nothing advances redraws its elapsed time


@dataclass(slots=True)
class Stage:
    """One running stage: `advance` moves its bar; `seconds` is how long it has run."""

    bar: tqdm
    started: float = field(default_factory=time.perf_counter)

    def advance(self, amount: float = 1) -> None:
        self.bar.update(amount)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


@contextlib.contextmanager
def stage(description: str, total: float | None = None, unit: str | None = None, *,
          unit_scale: bool = False, log: logging.Logger | None = None) -> Iterator[Stage]:
    """A bar on stderr while the block runs. Only a terminal gets one (tqdm's disable=None),
    and only once the stage has run SHOW_AFTER_S; it is cleared at the end, so what stays is
    the log. With `log`, a stage that took SHOW_AFTER_S or more logs "<description> took N s"
    there (callers that log a richer line of their own pass none). A stage that counts names
    its `unit` (and its `total` when known); one that cannot count shows its elapsed time."""
    shape = {"unit": unit} if unit is not None else {"bar_format": "{desc}: {elapsed}"}
    with tqdm(total=total, desc=description, unit_scale=unit_scale, file=sys.stderr,
              disable=None, delay=SHOW_AFTER_S, leave=False, dynamic_ncols=True,
              **shape) as bar:
        running = Stage(bar)
        with _ticking(bar):
            yield running
    if log is not None and running.seconds >= SHOW_AFTER_S:
        log.info("%s took %.1f s", description, running.seconds)


@contextlib.contextmanager
def _ticking(bar: tqdm) -> Iterator[None]:
    """Redraw `bar` every _TICK_S while the block runs: tqdm draws only when advanced, and a
    stage busy in one long call (a compiler, a big tensor) would look frozen."""
    if bar.disable:
        yield
        return
    done = threading.Event()

    def tick() -> None:
        while not done.wait(_TICK_S):
            bar.update(0)  # draws (once past the delay) and records the draw, so close clears it

    ticker = threading.Thread(target=tick, name="progress-ticker", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()

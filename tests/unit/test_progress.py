"""engine/progress.py: a bar only on a terminal and only once a stage has run SHOW_AFTER_S,
redrawn while nothing advances and cleared at the end; one log line for each such stage; and
the total that weight loading counts toward (engine/weights.py: checkpoint_numel)."""

from __future__ import annotations

import io
import logging
import sys
import time
from pathlib import Path

import pytest

from engine import progress
from engine.weights import checkpoint_numel, iter_safetensors

LOGGER = "tests.progress"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bar shows after 50 ms instead of a second, and ticks every 10 ms."""
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.05)
    monkeypatch.setattr(progress, "_TICK_S", 0.01)


def _run_stage(monkeypatch: pytest.MonkeyPatch, stderr: io.StringIO, seconds: float,
               total: int | None = None) -> None:
    monkeypatch.setattr(sys, "stderr", stderr)
    with progress.stage("compiling", total=total, unit="file" if total else None,
                        log=logging.getLogger(LOGGER)) as running:
        for _ in range(total or 1):
            time.sleep(seconds / (total or 1))  # one long call when total is None
            if total:
                running.advance()


def test_terminal_bar_ticks_while_nothing_advances_then_clears(
        quick: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    terminal = _Terminal()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _run_stage(monkeypatch, terminal, seconds=0.3)
    drawn = terminal.getvalue()
    # nothing advanced it: every draw is the ticker's (tqdm redraws at most every 0.1 s)
    assert drawn.count("compiling: 00:00") >= 2, repr(drawn)  # its elapsed time, no count
    last_draw = drawn.rstrip("\r").split("\r")[-1]
    assert drawn.endswith("\r") and not last_draw.strip(), repr(drawn[-200:])  # cleared
    assert [r.getMessage()[:13] for r in caplog.records] == ["compiling too"]


def test_counting_bar_shows_its_count(quick: None, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    _run_stage(monkeypatch, terminal, seconds=0.3, total=10)
    assert "/10 [" in terminal.getvalue() and "file/s" in terminal.getvalue()


def test_log_file_gets_one_line_with_the_duration_and_no_bar(
        quick: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    not_a_terminal = io.StringIO()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _run_stage(monkeypatch, not_a_terminal, seconds=0.1)
    assert not_a_terminal.getvalue() == ""
    (record,) = caplog.records
    assert record.getMessage().startswith("compiling took 0.1")


def test_short_stage_is_silent(monkeypatch: pytest.MonkeyPatch,
                               caplog: pytest.LogCaptureFixture) -> None:
    terminal = _Terminal()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _run_stage(monkeypatch, terminal, seconds=0.01)  # the real one-second threshold
    assert terminal.getvalue() == "" and not caplog.records


def test_checkpoint_numel_is_what_loading_advances_by(tiny_llama_dir: Path,
                                                      tmp_path: Path) -> None:
    streamed = sum(tensor.numel() for _, tensor in iter_safetensors(tiny_llama_dir))
    assert checkpoint_numel(tiny_llama_dir) == streamed > 0
    assert checkpoint_numel(tmp_path) is None  # no safetensors: the bar counts without a total

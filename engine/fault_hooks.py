"""FaultHooks: fault injection for tests; every hook is None in production."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.sequence import Sequence


@dataclass(slots=True)
class FaultHooks:
    """A hook injects a fault by raising; where it is called decides what it takes down."""

    on_step: Callable[[], None] | None = None  # start of LLMEngine.step: the engine loop dies
    # before each forward pass with its batch (also before the health probe, with []): a
    # fault that only some sequences trigger fails those; one that needs none ends the loop
    on_execute: Callable[[list[Sequence]], None] | None = None
    # per sequence output, in output processing, with the user request's id, its prompt and
    # the sequence's number of tokens so far: that one user request fails
    on_request_output: Callable[[str, list[int], int], None] | None = None

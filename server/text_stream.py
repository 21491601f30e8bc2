"""Small pieces for parsing text as it streams in: trimmed output and partial-marker holdback."""

from __future__ import annotations


class StrippedText:
    """Text with its leading and trailing whitespace dropped, streamably: whitespace is held
    until something else follows it, and dropped if nothing does."""

    def __init__(self) -> None:
        self._has_text = False
        self._held = ""

    def push(self, text: str) -> str:
        if not self._has_text:
            text = text.lstrip()
            self._has_text = bool(text)
        body = text.rstrip()
        if not body:
            self._held += text
            return ""
        out = self._held + text[:len(body)]
        self._held = text[len(body):]
        return out


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0

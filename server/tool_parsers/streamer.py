"""One state machine for every format: finds calls in output text, whole or streamed, and
sends each call's name first and then its arguments as they grow."""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable

from server.text_stream import StrippedText, partial_suffix
from server.tool_parsers.types import (
    ARGS_KEYS,
    JSON_ERRORS,
    STRING_STOP,
    WHITESPACE,
    CallSyntax,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
)


class _ObjectScanner:
    """Scans one JSON object as its text arrives, noting its top-level "name" and arguments.

    Structure is tracked loosely (brackets and strings); `result` has json.loads judge validity.
    Positions are offsets into the object's text, which is kept in chunks so that a long
    object fed in many small pieces costs linear time.
    """

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._chunk_starts: list[int] = []
        self.length = 0  # characters of the object taken so far
        self.is_done = False
        self.name: str | None = None
        self.args_start: int | None = None  # [args_start, args_end): the value as written
        self.args_end: int | None = None
        self.args_is_object = False  # the arguments value opened with "{"
        self._skip = 0  # characters of the next chunk already scanned (a split escape)
        self._depth = 0
        self._in_string = False
        self._string_start = 0
        self._phase = "key"  # at depth 1: key, colon, value, primitive, after
        self._key: str | None = None
        self._value_start = 0
        self._name_start = -1
        self._seen_keys: set[str] = set()

    @property
    def text(self) -> str:
        return "".join(self._chunks)

    def slice(self, start: int, end: int) -> str:
        """text[start:end], joining only the chunks it spans."""
        index = max(bisect.bisect_right(self._chunk_starts, start) - 1, 0)
        pieces = []
        while index < len(self._chunks) and self._chunk_starts[index] < end:
            offset = self._chunk_starts[index]
            pieces.append(self._chunks[index][max(start - offset, 0):end - offset])
            index += 1
        return "".join(pieces)

    def feed(self, chunk: str) -> int:
        """Scans `chunk` up to the object's closing brace; returns how many chars it took."""
        base = self.length
        self._chunks.append(chunk)
        self._chunk_starts.append(base)
        self.length += len(chunk)
        i, self._skip = self._skip, 0
        while i < len(chunk) and not self.is_done:
            i = self._step(chunk, i, base)
        if not self.is_done:
            self._skip = i - len(chunk)
            return len(chunk)
        self._chunks[-1] = chunk[:i]
        self.length = base + i
        return i

    def _step(self, chunk: str, i: int, base: int) -> int:
        """Scans from chunk[i]; returns where to go on. Offsets are base + index in chunk."""
        if self._in_string:
            match = STRING_STOP.search(chunk, i)
            if match is None:
                return len(chunk)
            if match.group() == "\\":
                return match.start() + 2  # may pass the chunk's end: _skip carries it over
            self._in_string = False
            self._on_string_end(base + match.start() + 1)
            return match.start() + 1
        self._on_char(chunk[i], base + i)
        return i + 1

    def _on_char(self, ch: str, i: int) -> None:
        at_top = self._depth == 1
        if ch == '"':
            self._in_string, self._string_start = True, i
            if at_top and self._phase == "value":
                self._start_value(i, ch)
        elif ch in "{[":
            if at_top and self._phase == "value":
                self._start_value(i, ch)
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            if self._depth == 1 and self._phase == "value":
                self._end_value(i + 1)
            elif self._depth <= 0:
                self._end_primitive(i)
                self.is_done = True
        elif at_top:
            self._on_top_char(ch, i)

    def _on_top_char(self, ch: str, i: int) -> None:
        if ch == ":" and self._phase == "colon":
            self._phase = "value"
        elif ch == ",":
            self._end_primitive(i)
            self._phase, self._key = "key", None
        elif ch not in WHITESPACE and self._phase == "value":
            self._start_value(i, ch)
            self._phase = "primitive"

    def _on_string_end(self, end: int) -> None:
        if self._depth != 1:
            return
        if self._phase == "key":
            self._key = _loads_str(self.slice(self._string_start, end))
            self._phase = "colon"
        elif self._phase == "value":
            self._end_value(end)

    def _start_value(self, i: int, ch: str) -> None:
        self._value_start = i
        key = self._key
        # the first "name" and the first arguments key win; later duplicates are ignored
        if key in ARGS_KEYS and not self._seen_keys.intersection(ARGS_KEYS):
            self.args_start, self.args_is_object = i, ch == "{"
        elif key == "name" and key not in self._seen_keys:
            self._name_start = i
        if key is not None:
            self._seen_keys.add(key)

    def _end_value(self, end: int) -> None:
        if self._value_start == self.args_start:
            self.args_end = end
        elif self._value_start == self._name_start:
            self.name = _loads_str(self.slice(self._value_start, end)) or None  # "" is no name
        self._phase = "after"

    def _end_primitive(self, end: int) -> None:
        if self._phase == "primitive":
            raw = self.slice(self._value_start, end)
            self._end_value(self._value_start + len(raw.rstrip(WHITESPACE)))

    def result(self) -> ToolCall | None:
        """The call this object makes, or None when it is not a valid call."""
        try:
            json.loads(self.text)
        except JSON_ERRORS:
            return None
        if self.name is None:
            return None
        arguments = self._arguments()
        return None if arguments is None else ToolCall(self.name, arguments)

    def _arguments(self) -> str | None:
        if self.args_start is None:
            return "{}"
        raw = self.slice(self.args_start, self.length if self.args_end is None else self.args_end)
        if raw.startswith("{"):
            return raw
        # lenient: arguments written as a JSON string that holds an object
        inner = _loads_str(raw)
        return inner.strip() if inner is not None and _is_json_object(inner) else None



def _loads_str(raw: str) -> str | None:
    try:
        value = json.loads(raw)
    except JSON_ERRORS:
        return None
    return value if isinstance(value, str) else None


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except JSON_ERRORS:
        return False


class ToolCallStreamer:
    """Finds the calls of one format in output text fed piece by piece.

    With `is_eager` (streaming) a call is committed as soon as its name is complete and its
    arguments are sent as they grow; otherwise (`extract`) only once its object proved valid.
    Both agree on every output whose call objects are valid JSON.
    """

    def __init__(self, syntax: CallSyntax, *, is_eager: bool = True) -> None:
        self._syntax = syntax
        self._is_eager = is_eager
        self._state = "start" if syntax.is_anchored else "text"
        self._buf = ""  # received, not yet scanned
        self._pending = ""  # scanned syntax of a block not yet committed: content if it fails
        self._scanner: _ObjectScanner | None = None
        self._sink = StrippedText()
        self._index = 0
        self._is_call_open = False  # the current object's name has been sent
        self._num_args_sent = 0
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._handlers: dict[str, Callable[[bool], bool]] = {
            "start": self._on_start, "text": self._on_text, "open": self._on_open,
            "item": self._on_item, "object": self._on_object, "after": self._on_after,
            "content": self._on_content,
        }

    def feed(self, text: str) -> StreamDelta:
        self._buf += text
        self._run(is_final=False)
        return self._take()

    def finish(self) -> StreamDelta:
        self._run(is_final=True)
        if self._state == "object" and not self._is_call_open:
            assert self._scanner is not None
            self._emit_content(self._pending + self._scanner.text)
        elif self._state != "object":
            self._emit_content(self._pending + self._buf)
        self._pending = self._buf = ""
        return self._take()

    def _take(self) -> StreamDelta:
        delta = StreamDelta("".join(self._content), self._deltas)
        self._content, self._deltas = [], []
        return delta

    def _run(self, is_final: bool) -> None:
        while self._buf and self._handlers[self._state](is_final):
            pass

    # --- states: each consumes from _buf and returns False when it needs more text ---

    def _on_text(self, is_final: bool) -> bool:
        marker = self._syntax.marker
        found = self._buf.find(marker)
        if found >= 0:
            self._emit_content(self._buf[:found])
            self._pending, self._buf = marker, self._buf[found + len(marker):]
            self._state = "open"
            return True
        keep = 0 if is_final else partial_suffix(self._buf, marker)
        self._emit_content(self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _on_content(self, is_final: bool) -> bool:
        self._emit_content(self._buf)
        self._buf = ""
        return False

    def _on_start(self, is_final: bool) -> bool:
        if not self._skip_whitespace():
            return False
        for prefix in self._syntax.prefixes:
            found = self._expect(prefix, is_final)
            if found is None:
                return False
            if found:
                break
        self._state = "open"
        return True

    def _on_open(self, is_final: bool) -> bool:
        if not self._skip_whitespace():
            return False
        if not self._syntax.list_open:
            self._state = "item"
            return True
        found = self._expect(self._syntax.list_open, is_final)
        if found is None:
            return False
        self._state = "item" if found else self._fail_block()
        return True

    def _on_item(self, is_final: bool) -> bool:
        if not self._skip_whitespace():
            return False
        if self._buf[0] == "{":
            self._scanner = _ObjectScanner()
            self._state = "object"
        else:
            self._state = self._fail_block()
        return True

    def _on_object(self, is_final: bool) -> bool:
        scanner = self._scanner
        assert scanner is not None
        self._buf = self._buf[scanner.feed(self._buf):]
        if self._is_eager:
            self._send_progress(scanner)
        if not scanner.is_done:
            return False
        self._end_object(scanner)
        return True

    def _on_after(self, is_final: bool) -> bool:
        if not self._skip_whitespace():
            return False
        syntax = self._syntax
        if not syntax.separator and self._buf[0] == "{":
            self._state = "item"
            return True
        for token, state in ((syntax.separator, "item"), (syntax.list_close, "closed")):
            found = self._expect(token, is_final) if token else False
            if found is None:
                return False
            if found:
                self._state = "item" if state == "item" else self._end_block()
                return True
        # neither: the block ended without its closing, and what follows is text again
        self._state = self._fail_block()
        return True

    # --- helpers ---

    def _skip_whitespace(self) -> bool:
        """Moves leading whitespace of _buf to _pending; True if text remains to look at."""
        rest = self._buf.lstrip(WHITESPACE)
        self._pending += self._buf[:len(self._buf) - len(rest)]
        self._buf = rest
        return bool(rest)

    def _expect(self, token: str, is_final: bool) -> bool | None:
        """Consumes `token` if _buf starts with it; None while _buf is a proper start of it."""
        if self._buf.startswith(token):
            self._pending += token
            self._buf = self._buf[len(token):]
            return True
        return None if not is_final and token.startswith(self._buf) else False

    def _end_block(self) -> str:
        self._pending = ""
        return "content" if self._syntax.is_anchored else "text"

    def _fail_block(self) -> str:
        """What was taken for a block is content after all; scanning resumes after it."""
        self._emit_content(self._pending)
        return self._end_block()

    def _end_object(self, scanner: _ObjectScanner) -> None:
        call = scanner.result()
        self._scanner = None
        if call is None and not self._is_call_open:
            self._pending += scanner.text
            self._state = self._fail_block()
            return
        if call is not None:
            self._open_call(call.name)
            self._send_args(call.arguments[self._num_args_sent:])
        # an invalid object whose name was sent stays a call, with its arguments as written
        self._index += 1
        self._is_call_open = False
        self._state = "after"

    def _send_progress(self, scanner: _ObjectScanner) -> None:
        if scanner.name is not None:
            self._open_call(scanner.name)
        if not self._is_call_open or not scanner.args_is_object:
            return  # string arguments are sent decoded, once complete
        assert scanner.args_start is not None
        end = scanner.length if scanner.args_end is None else scanner.args_end
        self._send_args(scanner.slice(scanner.args_start + self._num_args_sent, end))

    def _open_call(self, name: str) -> None:
        if not self._is_call_open:
            self._is_call_open, self._num_args_sent, self._pending = True, 0, ""
            self._deltas.append(ToolCallDelta(self._index, name, ""))

    def _send_args(self, piece: str) -> None:
        if not piece:
            return
        self._num_args_sent += len(piece)
        last = self._deltas[-1] if self._deltas else None
        if last is not None and last.index == self._index:
            # one delta per call per feed: merge into the one already queued
            self._deltas[-1] = ToolCallDelta(self._index, last.name, last.arguments + piece)
        else:
            self._deltas.append(ToolCallDelta(self._index, None, piece))

    def _emit_content(self, text: str) -> None:
        out = self._sink.push(text)
        if out:
            self._content.append(out)

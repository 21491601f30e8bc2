"""Tool calls in model output: per-format parsers (whole and streamed) and forced-call grammars."""

from __future__ import annotations

import bisect
import json
import re
import secrets
import string
from abc import ABC
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from server.text_stream import StrippedText, partial_suffix


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One tool from the request's `tools` (type "function")."""

    name: str
    description: str | None
    parameters: dict[str, object]  # a JSON schema, already validated by the caller


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, exactly as the stream sent it


@dataclass(frozen=True, slots=True)
class ExtractedCalls:
    content: str | None  # text outside the calls; None when nothing but whitespace
    calls: list[ToolCall]  # empty: the model answered in text


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """One piece of a streamed call, as OpenAI's delta.tool_calls[i]."""

    index: int
    name: str | None  # set in the first delta of a call only
    arguments: str


@dataclass(frozen=True, slots=True)
class StreamDelta:
    content: str
    tool_calls: list[ToolCallDelta]


@dataclass(frozen=True, slots=True)
class CallSyntax:
    """How a format lays out its calls, enough to find them in text.

    A block starts at `marker` (searched anywhere) or, when `is_anchored`, only at the start
    of the output (after whitespace and one of `prefixes`). Inside a block: `list_open`, call
    objects separated by `separator` ("" = whitespace only), then `list_close`.
    """

    marker: str
    is_anchored: bool
    prefixes: tuple[str, ...]
    list_open: str
    separator: str
    list_close: str


@dataclass(frozen=True, slots=True)
class GrammarShape:
    """How a format writes forced calls: prefix call (joiner call)* suffix, each call wrapped."""

    prefix: str
    call_open: str
    args_key: str
    call_close: str
    joiner: str
    suffix: str


_WHITESPACE = " \t\r\n"
_STRING_STOP = re.compile(r'["\\]')
_ARGS_KEYS = ("arguments", "parameters")
# json.loads raises RecursionError on deeply nested input: invalid like any other bad JSON
_JSON_ERRORS = (ValueError, RecursionError)
# compact but with the spaces of Python's json.dumps, which the chat templates' tojson writes,
# so forced output stays close to what the model saw in training; bounded, so generation ends
JSON_OPTIONS: dict[str, object] = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
}


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
            match = _STRING_STOP.search(chunk, i)
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
        elif ch not in _WHITESPACE and self._phase == "value":
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
        if key in _ARGS_KEYS and not self._seen_keys.intersection(_ARGS_KEYS):
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
            self._end_value(self._value_start + len(raw.rstrip(_WHITESPACE)))

    def result(self) -> ToolCall | None:
        """The call this object makes, or None when it is not a valid call."""
        try:
            json.loads(self.text)
        except _JSON_ERRORS:
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
    except _JSON_ERRORS:
        return None
    return value if isinstance(value, str) else None


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except _JSON_ERRORS:
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
        rest = self._buf.lstrip(_WHITESPACE)
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


class ToolParser(ABC):
    """One tool-call format: its syntax for parsing and its shape for forced grammars."""

    name: ClassVar[str]
    syntax: ClassVar[CallSyntax]
    shape: ClassVar[GrammarShape]
    markers: ClassVar[tuple[str, ...]] = ()  # texts a tokenizer may have as tokens of their own
    # the format's marker is a special token, so the text must keep special tokens
    keeps_special_tokens: ClassVar[bool] = False

    def extract(self, text: str) -> ExtractedCalls:
        streamer = ToolCallStreamer(self.syntax, is_eager=False)
        pieces = [streamer.feed(text), streamer.finish()]
        # not eager: each call comes whole, in one delta with its name
        calls = [ToolCall(d.name or "", d.arguments) for p in pieces for d in p.tool_calls]
        content = "".join(p.content for p in pieces)
        return ExtractedCalls(content or None, calls)

    def streamer(self) -> ToolCallStreamer:
        return ToolCallStreamer(self.syntax)

    def forced_grammar(self, tools: Sequence[FunctionSpec], parallel: bool,
                       marker_tokens: Mapping[str, int] | None = None) -> str:
        """A Lark grammar (llguidance dialect): the whole output is one call of `tools` in this
        format, or one or more when `parallel`, each call's arguments matching its schema.
        `marker_tokens` maps the format's markers that are single added tokens of the model's
        tokenizer (Qwen's <tool_call>) to their ids: the grammar names those tokens, since a
        grammar engine never spells an added token's text out of ordinary ones."""
        if not tools:
            raise ValueError("forced_grammar needs at least one tool")
        shape, markers = self.shape, dict(marker_tokens or {})
        joiner = _lark_text(shape.joiner, markers)
        calls = f"call ({joiner} call)*" if parallel else "call"
        if parallel and not shape.joiner.strip() and not shape.suffix:
            # a model that writes the joiner (a newline) after a call may still mean to stop
            calls += f" {joiner}?"
        start = [_lark_text(shape.prefix, markers), calls, _lark_text(shape.suffix, markers)]
        lines = ["start: " + " ".join(part for part in start if part),
                 "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        for i, tool in enumerate(tools):
            lines += self._call_rules(f"call_{i}", f"args_{i}", tool, markers)
        return "\n".join(lines) + "\n"

    def _call_rules(self, call: str, args: str, tool: FunctionSpec,
                    markers: Mapping[str, int]) -> list[str]:
        """One tool's call, written as the chat template writes it, with its name fixed."""
        shape = self.shape
        opening = f'{shape.call_open}{{"name": {_json_str(tool.name)}, "{shape.args_key}": '
        closing = "}" + shape.call_close
        return [f"{call}: {_lark_text(opening, markers)} {args} {_lark_text(closing, markers)}",
                f"{args}: %json {json.dumps(_arguments_schema(tool.parameters))}"]


def _json_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _lark_str(text: str) -> str:
    # llguidance's Lark reads string literals with JSON escapes
    return _json_str(text)


def _lark_text(text: str, markers: Mapping[str, int]) -> str:
    """`text` as a sequence of Lark items: string literals, and `<[id]>` (one token) for
    each marker that is a token of its own."""
    if not text:
        return ""
    for marker, token_id in markers.items():
        before, found, after = text.partition(marker)
        if found:
            parts = [_lark_text(before, markers), f"<[{token_id}]>", _lark_text(after, markers)]
            return " ".join(part for part in parts if part)
    return _lark_str(text)


def _arguments_schema(parameters: dict[str, object]) -> dict[str, object]:
    """The tool's schema, made to accept objects only (what `extract` takes for arguments),
    with llguidance's whitespace options."""
    schema = dict(parameters)
    schema.setdefault("type", "object")
    schema["x-guidance"] = JSON_OPTIONS
    return schema


class HermesParser(ToolParser):
    """Qwen2.5, Qwen3, Hermes: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>."""

    name = "hermes"
    markers = ("<tool_call>", "</tool_call>")
    syntax = CallSyntax(marker="<tool_call>", is_anchored=False, prefixes=(), list_open="",
                        separator="", list_close="</tool_call>")
    # what Qwen's chat template writes for an assistant's calls, "\n" between them
    shape = GrammarShape(prefix="", call_open="<tool_call>\n", args_key="arguments",
                         call_close="\n</tool_call>", joiner="\n", suffix="")


class Llama3JsonParser(ToolParser):
    """Llama 3.1/3.2: the output is {"name": ..., "parameters": {...}}, several joined by "; "."""

    name = "llama3_json"
    syntax = CallSyntax(marker="", is_anchored=True, prefixes=("<|python_tag|>",), list_open="",
                        separator=";", list_close="")
    shape = GrammarShape(prefix="", call_open="", args_key="parameters", call_close="",
                         joiner="; ", suffix="")


class MistralParser(ToolParser):
    """Mistral: [TOOL_CALLS] then a JSON array of {"name": ..., "arguments": {...}}."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    keeps_special_tokens = True
    syntax = CallSyntax(marker="[TOOL_CALLS]", is_anchored=False, prefixes=(), list_open="[",
                        separator=",", list_close="]")
    # forced grammars name [TOOL_CALLS] by token id where the tokenizer has it as a token
    shape = GrammarShape(prefix="[TOOL_CALLS][", call_open="", args_key="arguments",
                         call_close="", joiner=", ", suffix="]")


class JsonArrayParser(ToolParser):
    """Fallback for templates with no known format, for forced calls only: the whole output
    is a JSON array of {"name": ..., "arguments": {...}}."""

    name = "json_array"
    syntax = CallSyntax(marker="", is_anchored=True, prefixes=(), list_open="[",
                        separator=",", list_close="]")
    shape = GrammarShape(prefix="[", call_open="", args_key="arguments", call_close="",
                         joiner=", ", suffix="]")


PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (HermesParser, Llama3JsonParser, MistralParser, JsonArrayParser)
}

# template markers, most specific first
_TEMPLATE_MARKERS = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
    ("ipython", "llama3_json"),
)


def parser_for_template(chat_template: str | None) -> str | None:
    """The tool-call format a chat template writes, from its markers; None if none is known."""
    if not chat_template:
        return None
    for marker, name in _TEMPLATE_MARKERS:
        if marker in chat_template:
            return name
    return None


_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An OpenAI-style tool call id: "call_" and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def bare_json_calls(text: str, names: Collection[str]) -> list[ToolCall] | None:
    """A whole answer that is nothing but calls written as JSON, without the format's markers
    (small models do this: `{"name": "f", "arguments": {...}}`, one per line or in a list,
    possibly in a ```json fence), when every name is one of the request's tools; else None."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    items = _json_documents(body)
    if not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments: object = next((item[key] for key in _ARGS_KEYS if key in item), {})
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(str(item["name"]), json.dumps(arguments, ensure_ascii=False)))
    return calls


def _json_documents(text: str) -> list[object] | None:
    """The values of one or more JSON documents separated by whitespace (a model writing one
    call per line), lists flattened; None unless the whole text is such documents."""
    decoder, items, position = json.JSONDecoder(), [], 0
    while position < len(text):
        if text[position] not in "{[":
            return None
        try:
            value, position = decoder.raw_decode(text, position)
        except _JSON_ERRORS:
            return None
        items.extend(value if isinstance(value, list) and value else [value])
        while position < len(text) and text[position] in _WHITESPACE:
            position += 1
    return items or None


def could_be_bare_json_call(text: str) -> bool:
    """Whether streamed content so far may still turn out to be bare JSON calls."""
    head = text.lstrip()
    if len(head) < 3:
        return not head or head[0] in "{[" or "```".startswith(head)
    if head.startswith("```"):
        info, newline, _ = head[3:].partition("\n")
        return not newline or info.strip() in ("", "json")  # ```python is code, not a call
    return head.startswith(("{", "["))

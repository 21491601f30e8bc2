"""`pagedserve chat [URL]`: a terminal chat client for a running server. Answers stream in as
they are generated and the conversation is kept; Ctrl-C stops an answer, Ctrl-D or /exit quits."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# the first one set wins; the server reads PAGEDSERVE_API_KEY too, as a comma-separated list
API_KEY_ENVS = ("PAGEDSERVE_API_KEY", "OPENAI_API_KEY")
EXIT_COMMANDS = frozenset({"/exit", "/quit"})
PROMPT = "> "
STOPPED = " [stopped]"
# connecting and the model list must be quick; an answer may pause for long (a full queue, a
# long prompt), and Ctrl-C ends it, so streams have no read timeout
TIMEOUT = httpx.Timeout(30.0, read=None)

Message = dict[str, str]


class ChatError(Exception):
    """A failure shown as one line: the server is unreachable, refused the key, or answered
    with an error."""


@dataclass(frozen=True, slots=True)
class ChatOptions:
    url: str  # the server's root, without /v1
    api_key: str | None
    model: str | None  # None: the first the server lists
    system: str | None
    temperature: float | None  # None: the server's (the model's generation config)
    max_tokens: int | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedserve chat", usage="pagedserve chat [URL] [options]",
        description="Chat with a running pagedserve (or any OpenAI-compatible) server. Answers "
        "stream as they are generated; Ctrl-C stops an answer, Ctrl-D or /exit quits.")
    parser.add_argument("url", nargs="?", default=DEFAULT_URL,
                        help=f"the server, with or without /v1 (default: {DEFAULT_URL})")
    parser.add_argument("--api-key", help="the server's API key (default: $PAGEDSERVE_API_KEY, "
                        "its first key if a list, else $OPENAI_API_KEY, else none)")
    parser.add_argument("--model", help="the model to ask (default: the first of /v1/models)")
    parser.add_argument("--system", metavar="TEXT", help="a system message opening the chat")
    parser.add_argument("--temperature", type=float,
                        help="sampling temperature, 0 for greedy (default: the server's)")
    parser.add_argument("--max-tokens", type=int,
                        help="the most tokens an answer may have (default: the server's)")
    return parser


def parse_options(argv: Sequence[str]) -> ChatOptions:
    args = build_parser().parse_args(argv)
    api_key = args.api_key or next(
        (value.split(",")[0].strip() for name in API_KEY_ENVS if (value := os.environ.get(name))),
        None)
    url = args.url.rstrip("/").removesuffix("/v1")
    return ChatOptions(url=url, api_key=api_key, model=args.model, system=args.system,
                       temperature=args.temperature, max_tokens=args.max_tokens)


def main(argv: Sequence[str]) -> int:
    """Run the chat until Ctrl-D or /exit (0); 1 with one line on stderr when the server
    cannot be reached or refuses us at the start."""
    options = parse_options(argv)
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
    try:
        with (_translated_errors(options.url),
              httpx.Client(base_url=f"{options.url}/v1", headers=headers,
                           timeout=TIMEOUT) as client):
            listed = first_model(client, options.url)  # asked even with --model: fails early
            ChatSession(client, options, options.model or listed).run()
    except ChatError as exc:
        sys.stderr.write(f"pagedserve chat: {exc}\n")
        return 1
    except KeyboardInterrupt:  # while asking for the model list
        sys.stderr.write("\n")
        return 130
    return 0


def first_model(client: httpx.Client, url: str) -> str:
    """The first model the server lists; also tells early whether it is there and takes
    our key."""
    with _translated_errors(url):
        response = client.get("/models")
    _raise_for_status(response)
    models = response.json().get("data") or []
    if not models:
        raise ChatError(f"{url} serves no model")
    return str(models[0]["id"])


@dataclass(slots=True)
class ChatSession:
    """One conversation: its history, and the loop that reads a line and streams the answer."""

    client: httpx.Client
    options: ChatOptions
    model: str
    out: TextIO = field(default_factory=lambda: sys.stdout)
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.options.system:
            self.messages.append({"role": "system", "content": self.options.system})

    def run(self) -> None:
        _enable_line_editing()
        self.out.write(f"chatting with {self.model} at {self.options.url}; Ctrl-C stops an "
                       "answer, Ctrl-D or /exit quits\n")
        while (line := self._read_line()) is not None:
            if line.strip() in EXIT_COMMANDS:
                return
            if line.strip():
                self.ask(line)

    def _read_line(self) -> str | None:
        """The next line typed; None at Ctrl-D. Ctrl-C at the prompt drops the line."""
        while True:
            try:
                return input(PROMPT)
            except EOFError:
                self.out.write("\n")
                return None
            except KeyboardInterrupt:
                self.out.write("\n")

    def ask(self, text: str) -> None:
        """Send `text` with the history and print the answer as it streams. Ctrl-C closes
        the stream (the server then aborts the request) and keeps what arrived; an error
        drops the turn."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            with contextlib.closing(self.stream(self.messages)) as deltas:
                for delta in deltas:
                    pieces.append(delta)
                    self.out.write(delta)
                    self.out.flush()
        except KeyboardInterrupt:
            self.out.write(STOPPED)
        except ChatError as exc:
            self.out.write("\n")
            self.out.flush()
            sys.stderr.write(f"pagedserve chat: {exc}\n")
            self.messages.pop()
            return
        self.out.write("\n")
        self.out.flush()
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def stream(self, messages: list[Message]) -> Generator[str, None, None]:
        """The answer's content deltas, as the server streams them."""
        body: dict[str, object] = {"model": self.model, "messages": messages, "stream": True}
        if self.options.temperature is not None:
            body["temperature"] = self.options.temperature
        if self.options.max_tokens is not None:
            body["max_tokens"] = self.options.max_tokens
        with (_translated_errors(self.options.url),
              self.client.stream("POST", "/chat/completions", json=body) as response):
            _raise_for_status(response)
            yield from _content_deltas(response.iter_lines())


def _content_deltas(lines: Iterator[str]) -> Iterator[str]:
    """Content from the SSE lines of a chat completion stream, up to `data: [DONE]`; an error
    event raises ChatError."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments, keep-alives
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise ChatError(f"the answer failed: {_error_message(event)}")
        for choice in event.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content


@contextlib.contextmanager
def _translated_errors(url: str) -> Iterator[None]:
    """httpx's transport failures as one readable line."""
    try:
        yield
    except httpx.TransportError as exc:
        raise ChatError(f"cannot reach the server at {url} ({exc or type(exc).__name__}); is "
                        "it running? (pagedserve serve)") from exc
    except httpx.InvalidURL as exc:
        raise ChatError(f"{url} is not a URL ({exc})") from exc


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    message = _error_message(_json_or_none(response)) or response.text[:200] or "no details"
    if response.status_code == 401:
        raise ChatError(f"the server refused the API key (401: {message}); pass --api-key or "
                        f"set {API_KEY_ENVS[0]}")
    raise ChatError(f"the server answered {response.status_code}: {message}")


def _json_or_none(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


def _error_message(body: object) -> str:
    """The message of an OpenAI error envelope ({"error": {"message": ...}}), else ""."""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return str(message) if message else ""


def _enable_line_editing() -> None:
    """Arrow keys and history at the prompt: importing readline makes input() use it."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # Windows, or a Python built without it
            import readline  # noqa: F401

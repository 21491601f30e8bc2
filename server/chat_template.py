"""Chat messages → prompt token ids through the tokenizer's own (sandboxed Jinja) chat template."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from server.errors import ApiError
from server.protocol import ChatMessage, ContentPart
from server.tokenization import encode_prompt

logger = logging.getLogger(__name__)

# apply_chat_template arguments a client must not override through chat_template_kwargs
_RESERVED_KWARGS = frozenset({"conversation", "chat_template", "tokenize", "return_dict",
                              "return_tensors", "tokenizer_kwargs", "add_generation_prompt",
                              "continue_final_message", "documents", "tools"})


@dataclass(frozen=True, slots=True)
class TemplateOptions:
    """How one request renders its conversation (vLLM's chat-template fields)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the answer goes on from the last message's text
    chat_template: str | None = None  # the request's own template, else the tokenizer's
    chat_template_kwargs: Mapping[str, object] | None = None
    documents: Sequence[Mapping[str, str]] | None = None
    add_special_tokens: bool = False  # the template writes them; True adds the tokenizer's too
    keep_last: int | None = None  # truncate_prompt_tokens
    tools: Sequence[Mapping[str, object]] | None = None  # OpenAI-shaped, for the template


def load_chat_template(source: str) -> str:
    """--chat-template: a file holding a Jinja template, or the template itself (anything with
    Jinja markup); the template is compiled here so a broken one fails at start."""
    looks_inline = "{{" in source or "{%" in source
    path = Path(source)
    if not looks_inline:
        if not path.is_file():
            raise ValueError(f"--chat-template {source!r} is neither a file nor a Jinja "
                             "template")
        source = path.read_text(encoding="utf-8")
    import jinja2.sandbox  # transformers' own dependency; only needed here

    try:
        jinja2.sandbox.ImmutableSandboxedEnvironment().parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"--chat-template does not compile: {exc}") from exc
    return source


def render_messages(messages: Sequence[ChatMessage]) -> list[dict[str, object]]:
    """OpenAI messages → the plain dicts chat templates expect; text parts joined, developer
    mapped to system (templates predate the developer role)."""
    rendered = []
    for index, message in enumerate(messages):
        item: dict[str, object] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": _text_of(message.content, index),
        }
        for key in ("name", "tool_call_id"):
            value = getattr(message, key)
            if value is not None:
                item[key] = value
        if message.tool_calls is not None:
            item["tool_calls"] = [_template_tool_call(call) for call in message.tool_calls]
        rendered.append(item)
    return rendered


def _template_tool_call(call: Mapping[str, object]) -> dict[str, object]:
    """OpenAI sends a call's arguments as JSON text; templates write them with `tojson`, so
    they get the parsed object (as transformers' and vLLM's do), else the text would be
    quoted twice."""
    function = call.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return dict(call)
    try:
        arguments = json.loads(str(function["arguments"]))
    except ValueError:
        return dict(call)
    return {**call, "function": {**function, "arguments": arguments}}


def _text_of(content: str | list[ContentPart] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"content part type {part.type!r} is not supported: this "
                           "server serves text-only models", param=f"messages[{index}].content")
        texts.append(part.text)
    return "\n".join(texts)


def check_request_template(template: str | None, trusted: bool) -> None:
    """A request's own chat_template is code: only run it where the operator allowed that."""
    if template is not None and not trusted:
        raise ApiError(400, "chat_template in a request is off on this server (start it with "
                       "--trust-request-chat-template to allow it)", param="chat_template")


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage],
                        max_tokens: int, options: TemplateOptions = TemplateOptions()
                        ) -> list[int]:
    """Render and tokenize a conversation; ContextLengthExceededError past `max_tokens`.
    Special tokens come from the template itself, so by default the tokenizer adds none (no
    second BOS). A request's own template runs in the same sandbox as the model's
    (transformers renders both in jinja2's ImmutableSandboxedEnvironment)."""
    if options.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "This model's tokenizer has no chat template; pass chat_template, "
                       "or use /v1/completions with a plain prompt instead.", param="messages",
                       code="chat_template_missing")
    extra: dict[str, Any] = dict(options.chat_template_kwargs or {})
    reserved = sorted(_RESERVED_KWARGS & set(extra))
    if reserved:
        raise ApiError(400, f"chat_template_kwargs may not set {reserved}",
                       param="chat_template_kwargs")
    if options.continue_final_message and not (messages and messages[-1].content):
        raise ApiError(400, "continue_final_message needs a last message with content to "
                       "continue", param="continue_final_message")
    if options.documents is not None:
        extra["documents"] = [dict(document) for document in options.documents]
    if options.tools:
        extra["tools"] = [dict(tool) for tool in options.tools]
    try:
        conversation: list[dict[str, Any]] = render_messages(messages)
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False,  # type: ignore[arg-type]
            chat_template=options.chat_template,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message, **extra)
    except ApiError:
        raise
    except Exception as exc:  # template errors (e.g. roles must alternate) are the client's
        logger.debug("chat template failed: %r", exc)
        param = "chat_template" if options.chat_template is not None else "messages"
        raise ApiError(400, f"Cannot apply the chat template: {exc}", param=param) from exc
    assert isinstance(text, str)
    return encode_prompt(tokenizer, text, max_tokens,
                         add_special_tokens=options.add_special_tokens,
                         keep_last=options.keep_last)

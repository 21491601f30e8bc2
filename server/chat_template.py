"""Chat messages → prompt token ids through the tokenizer's own (sandboxed Jinja) chat template."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from server.errors import ApiError
from server.protocol import ChatMessage, ContentPart
from server.tokenization import encode_prompt

logger = logging.getLogger(__name__)

# apply_chat_template arguments a client must not override through chat_template_kwargs
_RESERVED_KWARGS = frozenset({"conversation", "chat_template", "tokenize", "return_dict",
                              "return_tensors", "tokenizer_kwargs", "add_generation_prompt"})


def render_messages(messages: Sequence[ChatMessage]) -> list[dict[str, object]]:
    """OpenAI messages → the plain dicts chat templates expect; text parts joined, developer
    mapped to system (templates predate the developer role)."""
    rendered = []
    for index, message in enumerate(messages):
        item: dict[str, object] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": _text_of(message.content, index),
        }
        for key in ("name", "tool_call_id", "tool_calls"):
            value = getattr(message, key)
            if value is not None:
                item[key] = value
        rendered.append(item)
    return rendered


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


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[ChatMessage],
    max_tokens: int,
    add_generation_prompt: bool = True,
    chat_template_kwargs: Mapping[str, object] | None = None,
) -> list[int]:
    """Render and tokenize a conversation; ContextLengthExceededError past `max_tokens`.
    Special tokens come from the template itself, so the tokenizer adds none (no second
    BOS)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "This model's tokenizer has no chat template; use /v1/completions "
                       "with a plain prompt instead.", param="messages",
                       code="chat_template_missing")
    extra: dict[str, Any] = dict(chat_template_kwargs or {})
    reserved = sorted(_RESERVED_KWARGS & set(extra))
    if reserved:
        raise ApiError(400, f"chat_template_kwargs may not set {reserved}",
                       param="chat_template_kwargs")
    try:
        conversation: list[dict[str, Any]] = render_messages(messages)
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False,  # type: ignore[arg-type]
            add_generation_prompt=add_generation_prompt, **extra)
    except ApiError:
        raise
    except Exception as exc:  # template errors (e.g. roles must alternate) are the client's
        logger.debug("chat template failed: %r", exc)
        raise ApiError(400, f"Cannot apply the chat template: {exc}", param="messages") from exc
    assert isinstance(text, str)
    return encode_prompt(tokenizer, text, max_tokens, add_special_tokens=False)

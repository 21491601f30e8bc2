"""Prompt text → token ids with work bounded by the context: a text that cannot fit is refused
after tokenizing about max_model_len tokens' worth of it, not all of it (a 4 MB prompt would
otherwise take seconds of both cores from every running request)."""

from __future__ import annotations

from collections.abc import Iterator

from transformers import PreTrainedTokenizerBase

from engine import ContextLengthExceededError

PIECE_CHARS = 16_384  # texts up to this long are tokenized in one go
# tokens a cut between two pieces may add over tokenizing across it: the pieces are cut at
# whitespace, where pre-tokenizers split anyway, so only a word piece or a prefix space differ
CUT_SLACK = 8
_CUT_SEARCH_CHARS = 1024  # how far back from a piece's end to look for whitespace


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int,
                  add_special_tokens: bool = True, keep_last: int | None = None) -> list[int]:
    """The token ids of `text`; ContextLengthExceededError when there are more than
    `max_tokens` of them. Long texts are first counted piece by piece, stopping as soon as
    a lower bound on their length passes `max_tokens`. With `keep_last` (a request's
    truncate_prompt_tokens) only the last keep_last tokens are kept instead, and only about
    that many tokens' worth of the text's end is tokenized."""
    if keep_last is not None:
        return _encode_tail(tokenizer, text, keep_last, add_special_tokens)
    if len(text) > PIECE_CHARS:
        lower_bound = 0
        for piece in _pieces(text):
            num_piece_tokens = len(tokenizer.encode(piece, add_special_tokens=False))
            lower_bound += max(num_piece_tokens - CUT_SLACK, 0)
            if lower_bound > max_tokens:
                raise ContextLengthExceededError(max_tokens, lower_bound, None, at_least=True)
    token_ids = list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    if len(token_ids) > max_tokens:
        raise ContextLengthExceededError(max_tokens, len(token_ids), None)
    return token_ids


def _encode_tail(tokenizer: PreTrainedTokenizerBase, text: str, keep_last: int,
                 add_special_tokens: bool) -> list[int]:
    """The last `keep_last` token ids of `text`, as if the whole text had been tokenized: ever
    longer tails are tokenized until one holds CUT_SLACK tokens more than are kept, so the
    tokens at the tail's ragged start are dropped."""
    num_chars = PIECE_CHARS
    while True:
        tail = text if num_chars >= len(text) else text[-num_chars:]
        token_ids = list(tokenizer.encode(tail, add_special_tokens=add_special_tokens))
        if tail is text or len(token_ids) >= keep_last + CUT_SLACK:
            return token_ids[-keep_last:]
        num_chars *= 2


def _pieces(text: str) -> Iterator[str]:
    """`text` cut into pieces of at most PIECE_CHARS, each cut just before whitespace when
    there is some near the end."""
    start = 0
    while start < len(text):
        end = min(start + PIECE_CHARS, len(text))
        if end < len(text):
            window = text[end - _CUT_SEARCH_CHARS:end]
            space = max(window.rfind(" "), window.rfind("\n"))
            if space > 0:
                end -= len(window) - space
        yield text[start:end]
        start = end

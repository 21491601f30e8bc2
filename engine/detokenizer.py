"""Incremental detokenization: per-step text deltas that never split a UTF-8 character, stop
strings found across token boundaries, and the holdback that keeps a stop's prefix unsent."""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Sequence
from functools import cache
from itertools import groupby

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"  # what a decoder shows for bytes that are not (yet) a character
# prompt tokens decoded as context of the first output token, so that it gets its leading
# space (sentencepiece drops a sequence's first space) and byte pieces join up
INITIAL_CONTEXT_TOKENS = 5
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text at O(new tokens) per step.

    Only a short window of token ids is kept: [0, read_offset) is context whose text was
    already produced, [read_offset, end) is still unread. Decoding the whole window and
    dropping the context's own text gives the new text with the spacing and byte joins a
    full decode would give. The window slides once the new text ends in a whole character.

    The text is kept as sent chunks plus the short unsent rest. Stop strings are only looked
    for in the unsent rest: a match cannot start in sent text, because the holdback keeps
    back every tail that could still begin one.

    With special tokens kept and spaces_between_special_tokens, the text is
    `decode_spaced`'s: one space between a special token and whatever piece is next to it.
    Its text too grows only at the end as tokens come, so the window's diff still works.
    """

    __slots__ = ("_tokenizer", "_skip_special_tokens", "_special_ids", "_stop",
                 "_max_stop_len", "_include_stop", "_window_ids", "_read_offset",
                 "_context_text", "_sent_chunks", "_unsent", "_is_stopped", "_is_finished")

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False,
                 spaces_between_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # the ids decode_spaced sets apart; None: plain decoding (also when specials are
        # skipped, as then no special token shows)
        self._special_ids = (special_token_ids(tokenizer)
                             if spaces_between_special_tokens and not skip_special_tokens
                             else None)
        self._stop = tuple(s for s in stop if s)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self._window_ids = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        self._read_offset = len(self._window_ids)
        self._context_text: str | None = None  # decode of window[:read_offset], lazily
        self._sent_chunks: list[str] = []  # text handed out by get_delta
        self._unsent = ""  # text not handed out yet (cut at a stop string once one matched)
        self._is_stopped = False
        self._is_finished = False  # get_delta(finished=True) was called: no more text

    @property
    def output_text(self) -> str:
        sent = "".join(self._sent_chunks)
        self._sent_chunks = [sent]  # joined once, not again on the next call
        return sent + self._unsent

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Decode the new tokens onto the output text. Returns the stop string once one occurs
        (the text is then cut before it, or after it when it is to be included); tokens after
        a stop, or after the finishing get_delta, are ignored."""
        if self._is_stopped or self._is_finished:
            return None
        for token_id in new_token_ids:
            self._window_ids.append(token_id)
            stop = self._append(self._read(flush=False))
            if stop is not None:
                return stop
        return None

    def get_delta(self, finished: bool) -> str:
        """Text not handed out yet. While unfinished, a tail that could still grow into a stop
        string is held back; finished releases everything, a dangling partial character
        included (as U+FFFD, as a full decode shows it)."""
        if finished and not (self._is_stopped or self._is_finished):
            self._append(self._read(flush=True))  # also cuts a stop the partial char hid
        self._is_finished = self._is_finished or finished
        num_held = 0 if self._is_finished or self._is_stopped else self._stop_prefix_len()
        delta = self._unsent[:len(self._unsent) - num_held]
        self._unsent = self._unsent[len(delta):]
        if delta:
            self._sent_chunks.append(delta)
        return delta

    def _read(self, flush: bool) -> str:
        """Text that the unread tokens add; "" while it would end in a partial character
        (unless flushing at the end) or the tokens show nothing yet (skipped specials)."""
        if self._read_offset == len(self._window_ids):
            return ""
        if self._context_text is None:
            self._context_text = self._decode(self._window_ids[:self._read_offset])
        window_text = self._decode(self._window_ids)
        if not flush and (len(window_text) <= len(self._context_text)
                          or window_text.endswith(REPLACEMENT_CHAR)):
            return ""
        new_text = window_text[len(self._context_text):]
        # slide: the tokens just read become the context of the next ones
        self._window_ids = self._window_ids[self._read_offset:]
        self._read_offset = len(self._window_ids)
        self._context_text = None
        return new_text

    def _decode(self, token_ids: Sequence[int]) -> str:
        if self._special_ids is not None:
            return decode_spaced(self._tokenizer, token_ids, self._special_ids)
        return decode_text(self._tokenizer, token_ids, self._skip_special_tokens)

    def _append(self, new_text: str) -> str | None:
        """Add text; return the stop string it completed, if any, having cut the text there."""
        if not new_text:
            return None
        old_len = len(self._unsent)
        self._unsent += new_text
        return self._match_stop(old_len) if self._stop else None

    def _match_stop(self, old_len: int) -> str | None:
        """The earliest stop string that the text past `old_len` completed; cut the text."""
        # a match ending in the new text starts at most max_stop_len - 1 characters before it
        start = max(0, old_len - self._max_stop_len + 1)
        found = [(index, stop) for stop in self._stop
                 if (index := self._unsent.find(stop, start)) != -1]
        if not found:
            return None
        index, stop = min(found, key=lambda match: match[0])
        self._unsent = self._unsent[:index + len(stop) if self._include_stop else index]
        self._is_stopped = True
        return stop

    def _stop_prefix_len(self) -> int:
        """Length of the longest unsent tail that is a proper prefix of a stop string: the
        part that must wait to see whether the stop completes."""
        tail = self._unsent[max(0, len(self._unsent) - self._max_stop_len + 1):]
        for start in range(len(tail)):  # longest candidate first
            if any(stop.startswith(tail[start:]) for stop in self._stop):
                return len(tail) - start
        return 0


def decode_text(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int],
                skip_special_tokens: bool) -> str:
    """The text of `token_ids`, without clean-up: that rewrites spaces around punctuation
    depending on what follows, which would make a window's text disagree with the whole's."""
    text = tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens,
                            clean_up_tokenization_spaces=False)
    assert isinstance(text, str)  # a flat id list decodes to one string
    return text


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The ids a slow tokenizer decodes apart: its added vocabulary, which holds its special
    tokens (and any token added to it after training)."""
    return frozenset(tokenizer.added_tokens_decoder)


def decode_spaced(tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int],
                  special_ids: Collection[int]) -> str:
    """The text of `token_ids` with special tokens kept, as transformers' slow tokenizers
    decode with spaces_between_special_tokens: each special token, and each run of other
    tokens decoded as one, is a piece; the non-empty pieces are joined by one space."""
    pieces: list[str] = []
    for is_special, group in groupby(token_ids, key=special_ids.__contains__):
        ids = list(group)
        if is_special:
            pieces += (decode_text(tokenizer, [token_id], False) for token_id in ids)
        else:
            pieces.append(decode_text(tokenizer, ids, False))
    return " ".join(piece for piece in pieces if piece)


def decode_token(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """One token's text for logprobs. A token holding only part of a UTF-8 character has no
    text of its own; it is shown as its escaped bytes, OpenAI style: "bytes:\\xe6\\x97"."""
    text = decode_text(tokenizer, [token_id], skip_special_tokens=False)
    if REPLACEMENT_CHAR not in text:
        return text
    raw = token_bytes(tokenizer, token_id)
    if raw is None:
        return text
    return "bytes:" + raw.decode("utf-8", errors="backslashreplace")


def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes | None:
    """The raw bytes of a byte-level BPE token (GPT-2 alphabet) or a sentencepiece byte
    fallback token (<0xE6>); None for any other kind of token."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(token, str):
        return None
    fallback = _BYTE_FALLBACK_TOKEN.fullmatch(token)
    if fallback is not None:
        return bytes([int(fallback.group(1), 16)])
    char_to_byte = _byte_level_decoder()
    if token and all(char in char_to_byte for char in token):
        return bytes(char_to_byte[char] for char in token)
    return None


@cache
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet: printable Latin-1 bytes stand for
    themselves; the others (controls, space, a few more) were moved to U+0100 and up, in
    byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    char_to_byte = {chr(byte): byte for byte in printable}
    moved = [byte for byte in range(256) if byte not in char_to_byte.values()]
    char_to_byte.update({chr(256 + i): byte for i, byte in enumerate(moved)})
    return char_to_byte

"""N-gram proposals (prompt lookup): the tokens that followed the latest earlier occurrence of
the sequence's last n tokens. No model: the win is on answers that repeat their prompt (code
edits, RAG, summaries)."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

_ITEM = 4  # bytes per token id in the search buffer


@dataclass(frozen=True, slots=True)
class NgramConfig:
    """vLLM's names: up to `num_speculative_tokens` proposals from the longest suffix of
    between `prompt_lookup_min` and `prompt_lookup_max` tokens seen earlier."""

    num_speculative_tokens: int = 5
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4

    def validate(self) -> NgramConfig:
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative config: need 1 <= prompt_lookup_min <= "
                             f"prompt_lookup_max, got {self.prompt_lookup_min} and "
                             f"{self.prompt_lookup_max}")
        if self.num_speculative_tokens < 1:
            raise ValueError("speculative config: num_speculative_tokens must be >= 1")
        return self


def propose_ngram(token_ids: Sequence[int], config: NgramConfig) -> list[int]:
    """Proposals for the tokens after `token_ids` (prompt and output so far); [] when no
    suffix of prompt_lookup_min..max tokens occurred before. Longer suffixes win; among
    occurrences of one suffix, the latest (the nearest text is the likeliest to repeat)."""
    num_tokens = len(token_ids)
    if num_tokens <= config.prompt_lookup_min:
        return []
    # ids as fixed-width bytes, so bytes.rfind does the search in C; int32 holds any vocab id
    haystack = array("i", token_ids).tobytes()
    for n in range(min(config.prompt_lookup_max, num_tokens - 1),
                   config.prompt_lookup_min - 1, -1):
        start = _latest_earlier_occurrence(haystack, num_tokens, n)
        if start is not None:
            follow = start + n
            return list(token_ids[follow:follow + config.num_speculative_tokens])
    return []


def _latest_earlier_occurrence(haystack: bytes, num_tokens: int, n: int) -> int | None:
    """Token index of the latest occurrence of the last n tokens that ends before the last
    token (so at least one token follows it); None if there is none."""
    pattern = haystack[(num_tokens - n) * _ITEM:]
    end = (num_tokens - 1) * _ITEM  # occurrences must lie wholly before the last token
    while True:
        found = haystack.rfind(pattern, 0, end)
        if found < 0:
            return None
        if found % _ITEM == 0:  # a match across token boundaries is no match
            return found // _ITEM
        end = found + len(pattern) - 1

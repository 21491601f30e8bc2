"""N-gram proposals (prompt lookup): the tokens that followed the latest earlier occurrence of
the sequence's last n tokens. No model: the win is on answers that repeat their prompt (code
edits, RAG, summaries)."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

_ITEM = 4  # bytes per token id in the search buffer


def propose_ngram(token_ids: Sequence[int], max_proposals: int, min_n: int,
                  max_n: int) -> list[int]:
    """Up to `max_proposals` proposals for the tokens after `token_ids` (prompt and output so
    far): what followed the latest earlier occurrence of their longest suffix of min_n..max_n
    tokens (vLLM's prompt_lookup_min and _max); [] when none occurred before. Longer suffixes
    win; among occurrences of one suffix, the latest (the nearest text is the likeliest to
    repeat)."""
    num_tokens = len(token_ids)
    if num_tokens <= min_n or max_proposals < 1:
        return []
    # ids as fixed-width bytes, so bytes.rfind does the search in C; int32 holds any vocab id
    haystack = array("i", token_ids).tobytes()
    for n in range(min(max_n, num_tokens - 1), min_n - 1, -1):
        start = _latest_earlier_occurrence(haystack, num_tokens, n)
        if start is not None:
            follow = start + n
            return list(token_ids[follow:follow + max_proposals])
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

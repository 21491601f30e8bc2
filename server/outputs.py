"""Engine outputs → OpenAI response pieces: logprobs in both formats, usage, finish reasons."""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from engine import CompletionOutput, Logprob, RequestOutput
from server.protocol import (
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionLogprobs,
    FinishReason,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
    Usage,
    UsageDetails,
)

MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI-compatible servers clamp to this
CLIENT_FINISH_REASONS = ("stop", "length")

TokenLogprobs = dict[int, Logprob]


def finish_reason(choice: CompletionOutput) -> FinishReason:
    """A finished choice's reason. The engine raises for a failed or aborted request instead
    of yielding it, so only the reasons a client may see get here."""
    reason = choice.finish_reason
    assert reason in CLIENT_FINISH_REASONS, reason
    return reason  # type: ignore[return-value]


def _clamp(logprob: float) -> float:
    return MIN_LOGPROB if math.isnan(logprob) else max(logprob, MIN_LOGPROB)


def _token_text(token_id: int, logprob: Logprob | None, tokenizer: PreTrainedTokenizerBase,
                as_token_ids: bool = False) -> str:
    """A logprob entry's token as text, or as "token_id:N" (vLLM's return_tokens_as_token_ids,
    for tokens that are not text on their own)."""
    if as_token_ids:
        return f"token_id:{token_id}"
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return str(tokenizer.decode([token_id]))


def prompt_logprobs_json(entries: Sequence[TokenLogprobs | None],
                         tokenizer: PreTrainedTokenizerBase,
                         as_token_ids: bool = False) -> PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: logprob}."""
    return [None if entry is None else {
        str(token_id): PromptLogprob(logprob=_clamp(lp.logprob), rank=lp.rank,
                                     decoded_token=_token_text(token_id, lp, tokenizer,
                                                               as_token_ids))
        for token_id, lp in entry.items()} for entry in entries]


def token_bytes(text: str) -> list[int]:
    """A token's UTF-8 bytes. Tokens holding part of a character come from the engine as
    "bytes:\\xe6\\x97" (escaped raw bytes, OpenAI's convention); those are unescaped."""
    if text.startswith("bytes:"):
        return list(codecs.escape_decode(text[len("bytes:"):].encode("utf-8"))[0])
    return list(text.encode("utf-8"))


def _ranked(entry: TokenLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely alternatives; the sampled token is among them only if it ranks."""
    return sorted(entry.items(), key=lambda item: item[1].rank)[:k] if k > 0 else []


def _sampled(token_id: int, entry: TokenLogprobs) -> Logprob:
    return entry.get(token_id) or next(iter(entry.values()))


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[TokenLogprobs], k: int,
                  tokenizer: PreTrainedTokenizerBase, as_token_ids: bool = False) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        sampled = _sampled(token_id, entry)
        text = _token_text(token_id, sampled, tokenizer, as_token_ids)
        top = [TopLogprob(token=(t := _token_text(tid, lp, tokenizer, as_token_ids)),
                          logprob=_clamp(lp.logprob), bytes=token_bytes(t))
               for tid, lp in _ranked(entry, k)]
        content.append(ChatTokenLogprob(token=text, logprob=_clamp(sampled.logprob),
                                        bytes=token_bytes(text), top_logprobs=top))
    return ChatLogprobs(content=content)


@dataclass(slots=True)
class CompletionLogprobBuilder:
    """Legacy logprobs of one choice; keeps the running text offset across stream chunks."""

    k: int
    tokenizer: PreTrainedTokenizerBase
    as_token_ids: bool = False
    text_offset: int = 0

    def build(self, token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None],
              result: CompletionLogprobs | None = None) -> CompletionLogprobs:
        """Entries for `token_ids`, appended to `result` when given. A None entry (the
        prompt's first token, echoed) has no logprob: null, as OpenAI sends it."""
        result = CompletionLogprobs() if result is None else result
        for token_id, entry in zip(token_ids, entries, strict=False):
            if entry is None:
                text = _token_text(token_id, None, self.tokenizer, self.as_token_ids)
                self._append(result, text, None, None)
                continue
            sampled = _sampled(token_id, entry)
            text = _token_text(token_id, sampled, self.tokenizer, self.as_token_ids)
            top = {_token_text(tid, lp, self.tokenizer, self.as_token_ids): _clamp(lp.logprob)
                   for tid, lp in _ranked(entry, self.k)}
            top.setdefault(text, _clamp(sampled.logprob))  # OpenAI: the sampled one is always in
            self._append(result, text, _clamp(sampled.logprob), top)
        return result

    def _append(self, result: CompletionLogprobs, text: str, logprob: float | None,
                top: dict[str, float] | None) -> None:
        result.tokens.append(text)
        result.token_logprobs.append(logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(self.text_offset)
        self.text_offset += len(text)


@dataclass(slots=True)
class UsageCounter:
    """Token counts of one HTTP request across its prompts and choices; outputs of any kind
    (CompletionOutput.num_tokens counts everything so far)."""

    prompt_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[tuple[int, int], int] = field(default_factory=dict)

    def add_prompt(self, prompt_index: int, output: RequestOutput) -> None:
        self.prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        self.cached_tokens[prompt_index] = max(output.num_cached_tokens, 0)

    def update(self, prompt_index: int, output: RequestOutput) -> None:
        self.add_prompt(prompt_index, output)
        for choice in output.outputs:
            self.completion_tokens[(prompt_index, choice.index)] = choice.num_tokens

    def usage(self) -> Usage:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(self.completion_tokens.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion,
                     prompt_tokens_details=UsageDetails(cached_tokens=sum(
                         self.cached_tokens.values())))

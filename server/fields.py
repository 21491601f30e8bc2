"""Every request field of the OpenAI and vLLM chat and completions APIs, and what pagedserve does
with it: the one list that the request models, the refusal check, the unknown-field warning and
the README's table all read.

The rule (DESIGN.md, "Request fields"): a field that changes what the answer means is either
implemented or refused with 400 naming it; a field that cannot change the answer (billing
tags, storage flags) is accepted and has no effect; a field neither API knows is ignored with
one warning line per request.
"""

from __future__ import annotations

import enum
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

CHAT = "chat"
COMPLETIONS = "completions"
ENDPOINTS = (CHAT, COMPLETIONS)


class Support(enum.Enum):
    SUPPORTED = "supported"
    NO_EFFECT = "accepted, no effect"
    REFUSED = "refused (400)"


@dataclass(frozen=True, slots=True)
class RequestField:
    """One top-level request field. A refused field is still accepted with a value that asks
    for nothing (`neutral`): `tools: []`, `response_format: {"type": "text"}`, `priority: 0`."""

    name: str
    endpoints: tuple[str, ...]
    origin: str  # "OpenAI" or "vLLM": the API that defines it
    support: Support
    note: str
    neutral: Callable[[object], bool] | None = None


def _is_null(value: object) -> bool:
    return value is None


def _is_empty(value: object) -> bool:
    return value is None or value in ([], {}, "")


def _is_false(value: object) -> bool:
    return value is None or value is False


def _is_one(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isclose(value, 1.0))


def _is_zero(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool)
                             and value == 0)


def _is_text_only(value: object) -> bool:
    return value is None or value == ["text"]


_BOTH = ENDPOINTS
_ONE_CONSTRAINT = "one constraint per request (response_format, guided_*, structured_outputs)"

# (name, endpoints, origin, support, note[, neutral]) in the order of the APIs' references
FIELDS: tuple[RequestField, ...] = tuple(RequestField(*spec) for spec in (
    # ---- OpenAI, both endpoints
    ("model", _BOTH, "OpenAI", Support.SUPPORTED,
     "the served name (--served-model-name); another name is a 404"),
    ("frequency_penalty", _BOTH, "OpenAI", Support.SUPPORTED, "-2..2"),
    ("presence_penalty", _BOTH, "OpenAI", Support.SUPPORTED, "-2..2"),
    ("logit_bias", _BOTH, "OpenAI", Support.SUPPORTED, "token id → bias in -100..100"),
    ("logprobs", _BOTH, "OpenAI", Support.SUPPORTED,
     "chat: bool; completions: 0..20 alternatives"),
    ("max_tokens", _BOTH, "OpenAI", Support.SUPPORTED,
     "chat: default the rest of the context; completions: default 16, as OpenAI"),
    ("n", _BOTH, "OpenAI", Support.SUPPORTED, "1..16"),
    ("seed", _BOTH, "OpenAI", Support.SUPPORTED,
     "int64; unseeded requests draw from the server's --seed generator"),
    ("stop", _BOTH, "OpenAI", Support.SUPPORTED, "up to 16 strings"),
    ("stream", _BOTH, "OpenAI", Support.SUPPORTED, "SSE"),
    ("stream_options", _BOTH, "OpenAI", Support.SUPPORTED,
     "include_usage; vLLM's continuous_usage_stats (usage on every chunk); needs stream"),
    ("temperature", _BOTH, "OpenAI", Support.SUPPORTED, "0..2; 0 is greedy"),
    ("top_p", _BOTH, "OpenAI", Support.SUPPORTED, "(0, 1]"),
    ("user", _BOTH, "OpenAI", Support.NO_EFFECT, "logged only"),
    # ---- OpenAI, chat
    ("messages", (CHAT,), "OpenAI", Support.SUPPORTED,
     "text content (string or text parts); roles system, developer, user, assistant, tool"),
    ("max_completion_tokens", (CHAT,), "OpenAI", Support.SUPPORTED,
     "wins over max_tokens when both are given"),
    ("top_logprobs", (CHAT,), "OpenAI", Support.SUPPORTED, "0..20; needs logprobs"),
    ("metadata", (CHAT,), "OpenAI", Support.NO_EFFECT, "nothing is stored"),
    ("store", (CHAT,), "OpenAI", Support.NO_EFFECT, "nothing is stored"),
    ("service_tier", (CHAT,), "OpenAI", Support.NO_EFFECT, "one tier"),
    ("prompt_cache_key", (CHAT,), "OpenAI", Support.NO_EFFECT,
     "the prefix cache finds shared prefixes by content"),
    ("safety_identifier", (CHAT,), "OpenAI", Support.NO_EFFECT, "logged only"),
    ("prediction", (CHAT,), "OpenAI", Support.NO_EFFECT,
     "a predicted output only speeds OpenAI's answer up; it never changes it"),
    ("parallel_tool_calls", (CHAT,), "OpenAI", Support.SUPPORTED,
     "false: at most one call (enforced by the grammar with required or a named tool)"),
    ("modalities", (CHAT,), "OpenAI", Support.REFUSED, "text only: [\"text\"] is accepted",
     _is_text_only),
    ("audio", (CHAT,), "OpenAI", Support.REFUSED, "text-only models", _is_null),
    ("response_format", _BOTH, "OpenAI", Support.SUPPORTED,
     "text, json_object, json_schema: enforced by a grammar (llguidance) on every token"),
    ("tools", (CHAT,), "OpenAI", Support.SUPPORTED,
     "functions, rendered by the chat template; calls parsed from the model's own format"),
    ("tool_choice", (CHAT,), "OpenAI", Support.SUPPORTED,
     "none, auto (parsed), required and a named function (forced by a grammar)"),
    ("functions", (CHAT,), "OpenAI", Support.SUPPORTED, "legacy: served as tools"),
    ("function_call", (CHAT,), "OpenAI", Support.SUPPORTED, "legacy: served as tool_choice"),
    ("reasoning_effort", (CHAT,), "OpenAI", Support.REFUSED,
     "no reasoning models are served", _is_null),
    ("verbosity", (CHAT,), "OpenAI", Support.REFUSED, "no verbosity control", _is_null),
    ("web_search_options", (CHAT,), "OpenAI", Support.REFUSED, "no web search", _is_null),
    # ---- OpenAI, completions
    ("prompt", (COMPLETIONS,), "OpenAI", Support.SUPPORTED,
     "a string, strings, token ids, or lists of token ids"),
    ("echo", _BOTH, "OpenAI", Support.SUPPORTED,
     "completions: the prompt before the completion, with its logprobs when logprobs is set; "
     "chat (vLLM): the last message's content when it is the assistant's"),
    ("best_of", (COMPLETIONS,), "OpenAI", Support.SUPPORTED, "only equal to n"),
    ("suffix", (COMPLETIONS,), "OpenAI", Support.REFUSED, "no fill-in-the-middle", _is_empty),
    # ---- vLLM's sampling extensions
    ("top_k", _BOTH, "vLLM", Support.SUPPORTED, "-1 or 0: off"),
    ("min_p", _BOTH, "vLLM", Support.SUPPORTED, "0..1"),
    ("repetition_penalty", _BOTH, "vLLM", Support.SUPPORTED, "0.01..100"),
    ("min_tokens", _BOTH, "vLLM", Support.SUPPORTED, "EOS and stop ids banned until then"),
    ("ignore_eos", _BOTH, "vLLM", Support.SUPPORTED, "generate through EOS"),
    ("stop_token_ids", _BOTH, "vLLM", Support.SUPPORTED, "up to 1024 ids"),
    ("include_stop_str_in_output", _BOTH, "vLLM", Support.SUPPORTED,
     "the matched stop string stays in the text"),
    ("skip_special_tokens", _BOTH, "vLLM", Support.SUPPORTED, "default true"),
    ("spaces_between_special_tokens", _BOTH, "vLLM", Support.SUPPORTED,
     "default false (fast tokenizers' decoding); true joins kept special tokens with a space"),
    ("truncate_prompt_tokens", _BOTH, "vLLM", Support.SUPPORTED,
     "keep the prompt's last k tokens; -1: the context length"),
    ("prompt_logprobs", _BOTH, "vLLM", Support.SUPPORTED,
     "0..20 alternatives for every prompt token; not with stream; prefix-cache hits are "
     "recomputed"),
    ("allowed_token_ids", _BOTH, "vLLM", Support.SUPPORTED, "only these tokens are sampled"),
    ("bad_words", _BOTH, "vLLM", Support.SUPPORTED,
     "words (with and without a leading space) never generated"),
    ("return_tokens_as_token_ids", _BOTH, "vLLM", Support.SUPPORTED,
     "logprob tokens as \"token_id:N\""),
    ("return_token_ids", _BOTH, "vLLM", Support.SUPPORTED,
     "prompt_token_ids and each choice's token_ids in the response"),
    ("request_id", _BOTH, "vLLM", Support.SUPPORTED, "the response id's suffix"),
    ("add_special_tokens", _BOTH, "vLLM", Support.SUPPORTED,
     "chat: default false (the template has them); completions: default true"),
    ("use_beam_search", _BOTH, "vLLM", Support.REFUSED, "no beam search", _is_false),
    ("length_penalty", _BOTH, "vLLM", Support.REFUSED, "beam search only; 1 is accepted",
     _is_one),
    ("priority", _BOTH, "vLLM", Support.REFUSED,
     "scheduling is first come, first served; 0 is accepted", _is_zero),
    ("logits_processors", _BOTH, "vLLM", Support.REFUSED, "no custom logits processors",
     _is_empty),
    ("vllm_xargs", _BOTH, "vLLM", Support.REFUSED, "no custom logits processors", _is_empty),
    ("cache_salt", _BOTH, "vLLM", Support.SUPPORTED,
     "prefix-cache hits only between requests with the same salt (per-tenant isolation)"),
    ("kv_transfer_params", _BOTH, "vLLM", Support.REFUSED, "no disaggregated prefill",
     _is_empty),
    ("guided_json", _BOTH, "vLLM", Support.SUPPORTED, f"a JSON schema; {_ONE_CONSTRAINT}"),
    ("guided_regex", _BOTH, "vLLM", Support.SUPPORTED, "the output matches the regex"),
    ("guided_choice", _BOTH, "vLLM", Support.SUPPORTED, "the output is one of the strings"),
    ("guided_grammar", _BOTH, "vLLM", Support.SUPPORTED,
     "a Lark grammar (llguidance's dialect) or GBNF"),
    ("guided_decoding_backend", _BOTH, "vLLM", Support.NO_EFFECT,
     "one backend (llguidance) serves every constraint"),
    ("guided_whitespace_pattern", _BOTH, "vLLM", Support.REFUSED,
     "JSON is generated without optional whitespace", _is_null),
    ("structural_tag", _BOTH, "vLLM", Support.REFUSED, "not served; use guided_grammar",
     _is_null),
    ("structured_outputs", _BOTH, "vLLM", Support.SUPPORTED,
     "vLLM's newer form: one of json, regex, choice, grammar, json_object"),
    ("prompt_embeds", (COMPLETIONS,), "vLLM", Support.REFUSED, "token or text prompts only",
     _is_empty),
    # ---- vLLM's chat-template controls
    ("add_generation_prompt", (CHAT,), "vLLM", Support.SUPPORTED, "default true"),
    ("continue_final_message", (CHAT,), "vLLM", Support.SUPPORTED,
     "the answer continues the last message; add_generation_prompt then defaults to false"),
    ("chat_template", (CHAT,), "vLLM", Support.SUPPORTED,
     "a Jinja template for this request, sandboxed like the model's; needs the server "
     "flag --trust-request-chat-template"),
    ("chat_template_kwargs", (CHAT,), "vLLM", Support.SUPPORTED,
     "extra template variables (e.g. enable_thinking)"),
    ("documents", (CHAT,), "vLLM", Support.SUPPORTED, "passed to RAG-aware templates"),
    ("include_reasoning", (CHAT,), "vLLM", Support.SUPPORTED,
     "with --reasoning-parser: false leaves reasoning_content out"),
    ("mm_processor_kwargs", (CHAT,), "vLLM", Support.REFUSED, "text-only models", _is_empty),
))


def fields_for(endpoint: str) -> dict[str, RequestField]:
    return {spec.name: spec for spec in FIELDS if endpoint in spec.endpoints}


_BY_ENDPOINT = {endpoint: fields_for(endpoint) for endpoint in ENDPOINTS}


class UnsupportedFieldError(Exception):
    """A refused field asks for something: 400 naming it. Not a ValueError, so that pydantic
    lets it through with its own `param` (see server/errors.py)."""

    def __init__(self, spec: RequestField) -> None:
        super().__init__(f"{spec.name} is not supported: {spec.note}")
        self.param = spec.name


def check_fields(endpoint: str, body: Mapping[str, object]) -> list[str]:
    """Raise UnsupportedFieldError for the first refused field that asks for something; return
    the names neither API knows (the caller warns about them)."""
    known = _BY_ENDPOINT[endpoint]
    unknown = []
    for name, value in body.items():
        spec = known.get(name)
        if spec is None:
            unknown.append(str(name))
        elif spec.support is Support.REFUSED:
            assert spec.neutral is not None
            if not spec.neutral(value):
                raise UnsupportedFieldError(spec)
    return unknown


def markdown_table() -> str:
    """The README's table of request fields (tests check that the README holds this)."""
    lines = ["| field | endpoints | from | status | notes |", "|---|---|---|---|---|"]
    for spec in sorted(FIELDS, key=lambda s: (s.support is not Support.SUPPORTED,
                                              s.support is Support.REFUSED, s.origin, s.name)):
        note = spec.note.replace("|", "\\|")
        lines.append(f"| `{spec.name}` | {', '.join(spec.endpoints)} | {spec.origin} | "
                     f"{spec.support.value} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")

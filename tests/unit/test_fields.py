"""server/fields.py is the one list of request fields: the request models, the refusal check and
the README's table must all agree with it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from server.fields import (
    CHAT,
    COMPLETIONS,
    FIELDS,
    Support,
    UnsupportedFieldError,
    check_fields,
    fields_for,
    markdown_table,
)
from server.protocol import ChatCompletionRequest, CompletionRequest

REPO = Path(__file__).resolve().parents[2]
MODELS = {CHAT: ChatCompletionRequest, COMPLETIONS: CompletionRequest}


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS])
def test_served_fields_are_exactly_the_request_models_fields(endpoint: str) -> None:
    """A field the model reads is in the table as served; a refused one never reaches it."""
    served = {name for name, spec in fields_for(endpoint).items()
              if spec.support is not Support.REFUSED}
    assert served == set(MODELS[endpoint].model_fields)


def test_every_field_is_listed_once_per_endpoint() -> None:
    for endpoint in (CHAT, COMPLETIONS):
        names = [spec.name for spec in FIELDS if endpoint in spec.endpoints]
        assert len(names) == len(set(names)), endpoint


def test_refused_fields_say_what_they_accept() -> None:
    for spec in FIELDS:
        assert spec.note, spec.name
        assert (spec.neutral is not None) == (spec.support is Support.REFUSED), spec.name
        if spec.neutral is not None:
            assert spec.neutral(None), f"{spec.name}: null always means 'not asked for'"


@pytest.mark.parametrize("name, value", [
    ("guided_whitespace_pattern", r"[ ]?"),
    ("structural_tag", {"type": "structural_tag"}),
    ("reasoning_effort", "high"),
    ("modalities", ["text", "audio"]),
    ("priority", 1),
    ("use_beam_search", True),
    ("length_penalty", 0.5),
])
def test_refused_values_raise_naming_the_field(name: str, value: object) -> None:
    with pytest.raises(UnsupportedFieldError) as info:
        check_fields(CHAT, {"messages": [], name: value})
    assert info.value.param == name and name in str(info.value)


@pytest.mark.parametrize("name, value", [
    ("guided_whitespace_pattern", None), ("structural_tag", None),
    ("modalities", ["text"]), ("priority", 0), ("use_beam_search", False),
    ("length_penalty", 1), ("suffix", ""),
])
def test_neutral_values_of_refused_fields_pass(name: str, value: object) -> None:
    endpoint = COMPLETIONS if name == "suffix" else CHAT
    assert check_fields(endpoint, {name: value}) == []


def test_unknown_fields_are_returned_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    assert check_fields(CHAT, {"messages": [], "made_up": 1, "another": 2}) == [
        "made_up", "another"]
    body = {"messages": [{"role": "user", "content": "hi"}], "made_up": 1, "another": 2}
    with caplog.at_level(logging.WARNING, logger="server.protocol"):
        ChatCompletionRequest.model_validate(body)
    warnings = [r for r in caplog.records if "unknown to the OpenAI and vLLM" in r.message]
    assert len(warnings) == 1 and "another, made_up" in warnings[0].message


def test_strings_are_not_coerced_to_numbers() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "p", "max_tokens": "10"})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                              "stream": "true"})


def test_readme_holds_the_field_table() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert markdown_table() in readme, "README's field table is stale: python -m server.fields"

"""StructuredOutputsParams: what one request's output must match, as plain data."""

from __future__ import annotations

import json
from dataclasses import dataclass

from engine.errors import InvalidRequestError

MAX_CONSTRAINT_CHARS = 256 * 1024  # a schema, regex or grammar; larger is a mistake or an attack
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 4096
# how constrained JSON is written (llguidance's JSON options), here and in the server's forced
# tool-call grammars: compact with the spaces of Python's json.dumps, which chat templates'
# tojson writes too, and no optional whitespace, which a model could pad with forever
JSON_FORMAT: dict[str, object] = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """Exactly one constraint (vLLM's `structured_outputs`): a JSON schema (as JSON text), any
    JSON object, a regular expression, one of some strings, or a grammar (Lark in llguidance's
    dialect, or GBNF). `param` names the request field it came from, for error messages; it
    is not part of the constraint's identity."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))

    @classmethod
    def from_schema(cls, schema: object, param: str) -> StructuredOutputsParams:
        """A JSON schema given as an object (or as JSON text holding one)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidRequestError(f"{param}: the JSON schema is not valid JSON: {exc}",
                                          param=param) from exc
        if not isinstance(schema, dict):
            raise InvalidRequestError(f"{param}: a JSON schema must be an object", param=param)
        # key order kept: properties are generated in the order the schema lists them
        return cls(json=json.dumps(schema, ensure_ascii=False), param=param)

    @property
    def kind(self) -> str:
        return self.key[0]

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what the compiled grammar is cached by."""
        if self.json is not None:
            return ("json", self.json)
        if self.json_object:
            return ("json_object", "")
        if self.regex is not None:
            return ("regex", self.regex)
        if self.choice is not None:
            return ("choice", json.dumps(self.choice, ensure_ascii=False))
        assert self.grammar is not None, "validate() first"
        return ("grammar", self.grammar)

    def validate(self) -> StructuredOutputsParams:
        kinds = [self.json is not None, self.json_object, self.regex is not None,
                 self.choice is not None, self.grammar is not None]
        _check(sum(kinds) == 1, f"{self.param} must set exactly one constraint (json, "
               "json_object, regex, choice or grammar)", self.param)
        for text in (self.json, self.regex, self.grammar):
            _check(text is None or (isinstance(text, str) and 0 < len(text) <=
                                    MAX_CONSTRAINT_CHARS),
                   f"{self.param} must be a non-empty string of at most "
                   f"{MAX_CONSTRAINT_CHARS} characters", self.param)
        if self.choice is not None:
            _check(0 < len(self.choice) <= MAX_CHOICES and all(
                isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS for c in self.choice),
                f"{self.param} choices must be 1 to {MAX_CHOICES} non-empty strings of at most "
                f"{MAX_CHOICE_CHARS} characters", self.param)
        return self


def _check(condition: bool, message: str, param: str) -> None:
    if not condition:
        raise InvalidRequestError(message, param=param)

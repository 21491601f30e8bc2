"""Hypothesis strategies for JSON schemas with finite languages: every string, array, number and
object they allow has a bounded length, so even a random-weight model that only follows the
grammar's token mask reaches the end of a document within a known number of tokens."""

from __future__ import annotations

import json
from collections.abc import Callable

import hypothesis
from hypothesis import strategies as st

Schema = dict[str, object]

# pattern -> the longest string it matches; anchored, as OpenAI and vLLM users write them
PATTERNS: dict[str, int] = {
    "^[a-z]{1,6}$": 6,
    "^[A-Z][a-z]{0,4}$": 5,
    "^[0-9]{3}-[0-9]{2}$": 6,
    "^(red|green|blue)$": 5,
    "^[a-f0-9]{2,8}$": 8,
    "^x[0-9]{1,3}$": 4,
    "^[a-z]+(_[a-z]+)?$": 0,  # unbounded on its own: only ever drawn with maxLength
}
PROPERTY_NAMES = ("id", "name", "tags", "count", "score", "kind", "items", "flag", "note",
                  "code", "level", "meta", "size", "unit")
# binary fractions only: jsonschema checks multipleOf by float division, 0.1 would fail 0.3
MULTIPLES = (0.5, 0.25, 0.125)
MAX_FREE_STRING_LENGTH = 6
MAX_ITEMS = 3
# JSON text bytes of one free string character at worst: an escape such as \u00e9
MAX_BYTES_PER_FREE_CHAR = 6
MAX_SCHEMA_BYTES = 220  # the longest document any drawn schema allows, in bytes (>= tokens)


def pattern_strings() -> st.SearchStrategy[Schema]:
    def build(pattern: str, max_length: int) -> Schema:
        schema: Schema = {"type": "string", "pattern": pattern}
        if not PATTERNS[pattern]:
            schema["maxLength"] = max_length
        return schema

    return st.builds(build, st.sampled_from(sorted(PATTERNS)), st.integers(3, 8))


def free_strings() -> st.SearchStrategy[Schema]:
    @st.composite
    def build(draw: st.DrawFn) -> Schema:
        max_length = draw(st.integers(1, MAX_FREE_STRING_LENGTH))
        return {"type": "string", "minLength": draw(st.integers(0, min(2, max_length))),
                "maxLength": max_length}

    return build()


def integers() -> st.SearchStrategy[Schema]:
    @st.composite
    def build(draw: st.DrawFn) -> Schema:
        low = draw(st.integers(-1000, 1000))
        schema: Schema = {"type": "integer", "minimum": low,
                          "maximum": low + draw(st.integers(0, 2000))}
        if draw(st.booleans()):  # the exclusive form of a bound
            schema["exclusiveMinimum"] = schema.pop("minimum") - 1  # type: ignore[operator]
        return schema

    return build()


def numbers() -> st.SearchStrategy[Schema]:
    @st.composite
    def build(draw: st.DrawFn) -> Schema:
        step = draw(st.sampled_from(MULTIPLES))
        low = draw(st.integers(-400, 400)) * step
        return {"type": "number", "minimum": low,
                "maximum": low + draw(st.integers(1, 800)) * step, "multipleOf": step}

    return build()


def enums() -> st.SearchStrategy[Schema]:
    values = st.one_of(st.sampled_from(["a", "bb", "ccc", "on", "off", "x y"]),
                       st.integers(-99, 99), st.booleans(), st.none())
    return st.builds(lambda found: {"enum": found},
                     st.lists(values, min_size=1, max_size=4, unique_by=repr))


def leaves() -> st.SearchStrategy[Schema]:
    return st.one_of(pattern_strings(), free_strings(), integers(), numbers(), enums(),
                     st.just({"type": "boolean"}), st.just({"type": "null"}))


def objects(children: st.SearchStrategy[Schema]) -> st.SearchStrategy[Schema]:
    @st.composite
    def build(draw: st.DrawFn) -> Schema:
        names = draw(st.lists(st.sampled_from(PROPERTY_NAMES), min_size=1, max_size=4,
                              unique=True))
        properties = {name: draw(children) for name in names}
        # mostly required, so documents are rarely just "{}"; at least one key always is
        optional = draw(st.lists(st.sampled_from(names), max_size=len(names) - 1, unique=True))
        required = [name for name in names if name not in optional]
        return {"type": "object", "properties": properties, "required": required,
                "additionalProperties": False}

    return build()


def arrays(children: st.SearchStrategy[Schema]) -> st.SearchStrategy[Schema]:
    @st.composite
    def build(draw: st.DrawFn) -> Schema:
        min_items = draw(st.integers(0, 2))
        return {"type": "array", "items": draw(children), "minItems": min_items,
                "maxItems": draw(st.integers(max(min_items, 1), MAX_ITEMS))}

    return build()


def schemas() -> st.SearchStrategy[Schema]:
    """An object schema nesting objects, arrays and leaves up to about three levels deep."""
    nested = st.recursive(leaves(), lambda inner: st.one_of(objects(inner), arrays(inner)),
                          max_leaves=6)
    return objects(nested).filter(lambda schema: max_json_bytes(schema) <= MAX_SCHEMA_BYTES)


def draw_schemas(num: int, seed: int) -> list[Schema]:
    """`num` different schemas from `schemas()`, the same list on every run for one seed."""
    found: list[Schema] = []

    @hypothesis.seed(seed)
    @hypothesis.settings(database=None, max_examples=2 * num, phases=[hypothesis.Phase.generate],
                         suppress_health_check=list(hypothesis.HealthCheck), deadline=None)
    @hypothesis.given(schemas())
    def collect(schema: Schema) -> None:
        if schema not in found:
            found.append(schema)

    collect()
    return found[:num]


# ---------------------------------------------------------------- the longest document


def max_json_bytes(schema: Schema) -> int:
    """Bytes of the longest JSON document `schema` allows (every optional key present, one
    space after each `,` and `:` as llguidance writes it when whitespace is not flexible): an
    upper bound on the tokens a byte-level tokenizer needs for it."""
    if "enum" in schema:
        return max(len(_compact(value)) for value in schema["enum"])  # type: ignore[attr-defined]
    measure: Callable[[Schema], int] = _MEASURES[str(schema["type"])]
    return measure(schema)


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _string_bytes(schema: Schema) -> int:
    pattern = schema.get("pattern")
    if pattern is not None and PATTERNS[str(pattern)]:
        return PATTERNS[str(pattern)] + 2
    per_char = 1 if pattern is not None else MAX_BYTES_PER_FREE_CHAR
    return int(schema["maxLength"]) * per_char + 2  # type: ignore[call-overload]


def _number_bytes(schema: Schema) -> int:
    bounds = [schema.get(key) for key in ("minimum", "maximum", "exclusiveMinimum")]
    widest = max(len(_compact(bound)) for bound in bounds if bound is not None)
    step = schema.get("multipleOf")
    fraction = len(_compact(step)) - 1 if isinstance(step, float) else 0  # "0.125" -> ".125"
    return widest + fraction + 1  # a sign


def _object_bytes(schema: Schema) -> int:
    properties: dict[str, Schema] = schema["properties"]  # type: ignore[assignment]
    members = [len(name) + 4 + max_json_bytes(child) for name, child in properties.items()]
    return 2 + sum(members) + 2 * max(0, len(members) - 1)


def _array_bytes(schema: Schema) -> int:
    num_items = int(schema["maxItems"])  # type: ignore[call-overload]
    item_bytes = max_json_bytes(schema["items"])  # type: ignore[arg-type]
    return 2 + num_items * item_bytes + 2 * max(0, num_items - 1)


_MEASURES: dict[str, Callable[[Schema], int]] = {
    "string": _string_bytes, "integer": _number_bytes, "number": _number_bytes,
    "object": _object_bytes, "array": _array_bytes, "boolean": lambda _: 5,
    "null": lambda _: 4,
}

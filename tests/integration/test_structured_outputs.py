"""Structured outputs on a tiny random-weight model, where nothing but the grammar's token mask
can make valid JSON: hypothesis-drawn JSON schemas through response_format, the vLLM guided_*
fields and the structured_outputs object on both endpoints; constrained and free rows sharing a
batch; a constrained row preempted and recomputed; and every malformed constraint refused with
a 400 naming its field, leaving no KV block held."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import MODEL_NAME, RunningServer, serve
from tests.json_schemas import Schema, draw_schemas, max_json_bytes

NUM_SCHEMAS = 32
SCHEMA_SEED = 20250607
MESSAGES = [{"role": "user", "content": "Reply in JSON."}]
# prompt (~20 tokens) + MAX_TOKENS stays within the tiny model's 512 positions; every drawn
# schema's longest document is far shorter (json_schemas.MAX_SCHEMA_BYTES)
MAX_TOKENS = 448
REGEX = r"(cat|dog)-[0-9]{2,4}( [a-z]{1,5}){0,2}"
CHOICES = ["alpha", "beta", "gamma delta", "ε-zero"]
LARK_GRAMMAR = ('start: greeting " " name "!"\n'
                'greeting: "hello" | "hi" | "hey"\n'
                'name: /[a-z]{1,8}/\n')
LARK_TEXT = r"(hello|hi|hey) [a-z]{1,8}!"
GBNF_GRAMMAR = 'root ::= ("yes" | "no") " " [0-9] [0-9]?'
GBNF_TEXT = r"(yes|no) [0-9][0-9]?"
SMALL_SCHEMA: Schema = {
    "type": "object", "additionalProperties": False, "required": ["name", "size"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                   "size": {"type": "integer", "minimum": 0, "maximum": 99},
                   "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}}}
# documents of ten objects: long enough (~150 tokens) that 16 of them overflow a 40-block pool
LONG_SCHEMA: Schema = {
    "type": "array", "minItems": 10, "maxItems": 10,
    "items": {"type": "object", "additionalProperties": False, "required": ["id", "tag"],
              "properties": {"id": {"type": "integer", "minimum": 100, "maximum": 999},
                             "tag": {"type": "string", "pattern": "^[a-z]{4,6}$"}}}}
QUOTE_TOKEN_ID, CLOSE_BRACE_TOKEN_ID = 4, 95  # '"' and '}' in tests/tiny_models.py's vocabulary
TIE_TOLERANCE = 1e-4  # as in test_kv_pressure: greedy ties may break either way in a new batch


def json_schema_format(schema: Schema, name: str = "answer") -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    finish_reason: str | None


async def chat(server: RunningServer, stream: bool, **fields: object) -> Answer:
    """One chat completion, streamed or not, reduced to its text and finish reason (a client
    per request: each gather runs in an event loop of its own)."""
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": MAX_TOKENS, **fields}
    async with server.async_client() as client:
        if not stream:
            response = await client.chat.completions.create(**body)  # type: ignore[call-overload]
            choice = response.choices[0]
            return Answer(choice.message.content or "", choice.finish_reason)
        parts, finish_reason = [], None
        async for chunk in await client.chat.completions.create(stream=True, **body):  # type: ignore[call-overload]
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish_reason = choice.finish_reason or finish_reason
        return Answer("".join(parts), finish_reason)


def gather(*coroutines: object) -> list[Answer]:
    async def run() -> list[Answer]:
        return list(await asyncio.gather(*coroutines))  # type: ignore[arg-type]

    return asyncio.run(run())


def _invalid_json(answer: Answer, schema: Schema) -> str | None:
    """Why `answer` is not a finished document valid under `schema`; None when it is."""
    if answer.finish_reason != "stop":
        return f"finish_reason {answer.finish_reason!r}"
    try:
        jsonschema.validate(json.loads(answer.text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


# ---------------------------------------------------------------- drawn schemas


@pytest.fixture(scope="module")
def schemas() -> list[Schema]:
    return draw_schemas(NUM_SCHEMAS, SCHEMA_SEED)


def test_drawn_schemas_are_bounded_and_varied(schemas: list[Schema]) -> None:
    assert len(schemas) == NUM_SCHEMAS and schemas == draw_schemas(NUM_SCHEMAS, SCHEMA_SEED)
    assert all(max_json_bytes(schema) < MAX_TOKENS - 64 for schema in schemas)
    text = json.dumps(schemas)
    for keyword in ("minItems", "maxItems", "enum", "pattern", "minLength", "maxLength",
                    "minimum", "maximum", "multipleOf", "exclusiveMinimum", '"required"',
                    '"additionalProperties": false', '"type": "integer"', '"type": "number"'):
        assert keyword in text, f"no drawn schema uses {keyword}"
    assert any(_depth(schema) >= 3 for schema in schemas), "no schema nests three levels"


def _depth(schema: Schema) -> int:
    children = [*dict(schema.get("properties") or {}).values()]  # type: ignore[call-overload]
    if "items" in schema:
        children.append(schema["items"])
    return 1 + max((_depth(child) for child in children), default=0)


def test_every_drawn_schema_is_followed(server: RunningServer, schemas: list[Schema]) -> None:
    """Each schema at temperature 0 and 1, streamed and not, all in flight at once so that the
    engine batches constrained rows with different grammars."""
    cases = [(index, temperature, stream) for index in range(len(schemas))
             for temperature in (0.0, 1.0) for stream in (False, True)]
    answers = gather(*(chat(server, stream, temperature=temperature, seed=index,
                            response_format=json_schema_format(schemas[index], f"s{index}"))
                       for index, temperature, stream in cases))
    failures = [(case, answer, why) for case, answer in zip(cases, answers, strict=True)
                if (why := _invalid_json(answer, schemas[case[0]]))]
    assert not failures, "\n".join(f"schema {case[0]} T={case[1]} stream={case[2]}: {why}\n"
                                   f"  {answer.text[:200]!r}\n  {json.dumps(schemas[case[0]])}"
                                   for case, answer, why in failures[:5])
    server.wait_idle()


def test_greedy_streamed_equals_not_streamed(server: RunningServer,
                                             schemas: list[Schema]) -> None:
    answers = gather(*(chat(server, stream, temperature=0.0,
                            response_format=json_schema_format(schema))
                       for schema in schemas[:8] for stream in (False, True)))
    assert [a.text for a in answers[0::2]] == [a.text for a in answers[1::2]]


# ---------------------------------------------------------------- every way to ask


def test_guided_json_as_object_and_as_string(server: RunningServer) -> None:
    answers = gather(*(chat(server, stream, temperature=temperature, seed=7,
                            extra_body={"guided_json": guided})
                       for guided in (SMALL_SCHEMA, json.dumps(SMALL_SCHEMA))
                       for temperature in (0.0, 1.0) for stream in (False, True)))
    assert [_invalid_json(answer, SMALL_SCHEMA) for answer in answers] == [None] * 8


def test_json_object(server: RunningServer) -> None:
    """Any JSON object is allowed, so left alone a random model writes its first key forever;
    a logit bias towards `"` and `}` (applied before the grammar's mask) makes it finish."""
    bias = {str(QUOTE_TOKEN_ID): 8, str(CLOSE_BRACE_TOKEN_ID): 8}
    kinds = [{"response_format": {"type": "json_object"}},
             {"extra_body": {"structured_outputs": {"json_object": True}}}]
    answers = gather(*(chat(server, stream, temperature=temperature, seed=seed, max_tokens=128,
                            logit_bias=bias, **kind)
                       for kind in kinds for temperature, seed in ((0.0, 0), (1.0, 1), (1.0, 2))
                       for stream in (False, True)))
    assert all(answer.finish_reason == "stop" for answer in answers), answers
    assert all(isinstance(json.loads(answer.text), dict) for answer in answers), answers


def test_guided_choice(server: RunningServer) -> None:
    settings = [(0.0, 0)] + [(1.0, seed) for seed in range(12)]
    answers = gather(*(chat(server, stream, temperature=temperature, seed=seed,
                            extra_body={"guided_choice": CHOICES})
                       for temperature, seed in settings for stream in (False, True)))
    assert all(answer.finish_reason == "stop" for answer in answers), answers
    assert {answer.text for answer in answers} <= set(CHOICES), answers


@pytest.mark.parametrize("field, value, pattern", [
    ("guided_regex", REGEX, REGEX),
    ("guided_grammar", LARK_GRAMMAR, LARK_TEXT),
    ("guided_grammar", GBNF_GRAMMAR, GBNF_TEXT),
], ids=["regex", "lark", "gbnf"])
def test_guided_regex_and_grammar(server: RunningServer, field: str, value: str,
                                  pattern: str) -> None:
    answers = gather(*(chat(server, stream, temperature=temperature, seed=seed,
                            extra_body={field: value})
                       for temperature, seed in ((0.0, 0), (1.0, 1), (1.0, 2))
                       for stream in (False, True)))
    assert all(answer.finish_reason == "stop" for answer in answers), answers
    assert all(re.fullmatch(pattern, answer.text) for answer in answers), answers


@pytest.mark.parametrize("constraint, check", [
    ({"json": SMALL_SCHEMA}, lambda a: _invalid_json(a, SMALL_SCHEMA) is None),
    ({"regex": REGEX}, lambda a: re.fullmatch(REGEX, a.text)),
    ({"choice": CHOICES}, lambda a: a.text in CHOICES),
    ({"grammar": LARK_GRAMMAR}, lambda a: re.fullmatch(LARK_TEXT, a.text)),
], ids=["json", "regex", "choice", "grammar"])
def test_structured_outputs_object(server: RunningServer, constraint: dict[str, object],
                                   check: object) -> None:
    answers = gather(*(chat(server, stream, temperature=temperature, seed=3,
                            extra_body={"structured_outputs": constraint})
                       for temperature in (0.0, 1.0) for stream in (False, True)))
    assert all(answer.finish_reason == "stop" and check(answer)  # type: ignore[operator]
               for answer in answers), answers


def test_completions_endpoint(server: RunningServer) -> None:
    client = server.client()
    constraints = [{"guided_json": SMALL_SCHEMA},
                   {"response_format": json_schema_format(SMALL_SCHEMA)},
                   {"structured_outputs": {"json": SMALL_SCHEMA}}]
    for extra in constraints:
        for temperature in (0.0, 1.0):
            response = client.completions.create(
                model=MODEL_NAME, prompt="Paged attention stores", max_tokens=MAX_TOKENS,
                temperature=temperature, seed=5, extra_body=extra)
            choice = response.choices[0]
            assert _invalid_json(Answer(choice.text, choice.finish_reason), SMALL_SCHEMA) is None
    regex = client.completions.create(model=MODEL_NAME, prompt="Paged attention stores",
                                      max_tokens=64, extra_body={"guided_regex": REGEX})
    assert re.fullmatch(REGEX, regex.choices[0].text), regex.choices[0].text


def test_text_response_format_is_free_text(server: RunningServer) -> None:
    response = server.client().chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0.0,  # type: ignore[arg-type]
        response_format={"type": "text"}, extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 8


# ---------------------------------------------------------------- batches and preemption


def _free_body(index: int) -> dict[str, object]:
    prompt = [(31 * index + 7 * k) % 500 + 5 for k in range(6 + index % 5)]
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 48, "temperature": 0.0,
            "ignore_eos": True, "logprobs": 2, "return_token_ids": True}


def _constrained_body(schema: Schema, index: int) -> dict[str, object]:
    return {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": MAX_TOKENS,
            "temperature": 1.0, "seed": index, "response_format": json_schema_format(schema)}


async def _post_all(server: RunningServer, requests: list[tuple[str, dict[str, object]]]
                    ) -> list[dict[str, object]]:
    async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers,
                                 timeout=300) as client:
        responses = await asyncio.gather(*(client.post(path, json=body)
                                           for path, body in requests))
    for response in responses:
        assert response.status_code == 200, response.text
    return [response.json()["choices"][0] for response in responses]


def test_free_rows_unchanged_by_constrained_neighbours(server: RunningServer,
                                                       schemas: list[Schema]) -> None:
    """The greedy tokens of free rows are the same whether or not constrained rows (whose
    masks must touch only their own rows) share their batches."""
    num_free = 8
    free = [("/v1/completions", _free_body(i)) for i in range(num_free)]
    neighbour_schemas = schemas[-num_free:]
    constrained = [("/v1/chat/completions", _constrained_body(schema, i))
                   for i, schema in enumerate(neighbour_schemas)]
    alone = asyncio.run(_post_all(server, free))
    mixed_requests = [pair for two in zip(constrained, free, strict=True) for pair in two]
    mixed = asyncio.run(_post_all(server, mixed_requests))
    neighbours, together = mixed[0::2], mixed[1::2]
    for choice, schema in zip(neighbours, neighbour_schemas, strict=True):
        answer = Answer(choice["message"]["content"], choice["finish_reason"])  # type: ignore[index]
        assert _invalid_json(answer, schema) is None, answer
    num_ties = sum(not _same_up_to_a_tie(a, b) for a, b in zip(alone, together, strict=True))
    assert num_ties <= 1, "free rows changed next to constrained rows"
    server.wait_idle()


def _same_up_to_a_tie(a: dict[str, object], b: dict[str, object]) -> bool:
    """True when both rows hold the same token ids; False when they part at an exact tie
    between the top two logprobs; any other difference fails the test."""
    ids_a, ids_b = a["token_ids"], b["token_ids"]
    assert len(ids_a) == len(ids_b) == 48  # type: ignore[arg-type]
    if ids_a == ids_b:
        return True
    k = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)) if x != y)  # type: ignore[call-overload]
    for row in (a, b):
        top = sorted(row["logprobs"]["top_logprobs"][k].values(), reverse=True)  # type: ignore[index]
        assert len(top) >= 2 and top[0] - top[1] < TIE_TOLERANCE, (
            f"free rows part at token {k} without a tie: {ids_a} vs {ids_b}")
    return False


@pytest.fixture(scope="module")
def small_pool_server(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    with serve(tiny_llama_dir, num_blocks=40, max_num_seqs=32) as running:
        yield running


def _preemptions(server: RunningServer) -> float:
    text = server.http().get("/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "pagedserve_num_preemptions_total")


def test_preempted_constrained_rows_still_end_valid(small_pool_server: RunningServer) -> None:
    """16 long constrained documents overflow a 40-block pool: rows are preempted, their KV
    freed and later recomputed, and the grammar state must survive that."""
    before = _preemptions(small_pool_server)
    requests = [("/v1/chat/completions",
                 {**_constrained_body(LONG_SCHEMA, i), "temperature": 1.0 if i % 2 else 0.0})
                for i in range(16)]
    choices = asyncio.run(_post_all(small_pool_server, requests))
    assert _preemptions(small_pool_server) > before, "the small pool never preempted"
    for choice in choices:
        answer = Answer(choice["message"]["content"], choice["finish_reason"])  # type: ignore[index]
        assert _invalid_json(answer, LONG_SCHEMA) is None, answer
    small_pool_server.wait_idle()


# ---------------------------------------------------------------- refused constraints


@dataclass(frozen=True, slots=True)
class Bad:
    name: str
    fields: dict[str, object]
    param: str  # the field the error must name (a dotted path below it is fine too)
    endpoint: str = "/v1/chat/completions"


BAD_SCHEMA = {"type": "frobnicate"}
BAD_PROPERTIES = {"type": "object", "properties": 5}
BAD_CASES = [
    Bad("response_format unknown schema type",
        {"response_format": json_schema_format(BAD_SCHEMA)}, "response_format"),
    Bad("response_format properties not an object",
        {"response_format": json_schema_format(BAD_PROPERTIES)}, "response_format"),
    Bad("response_format unknown type", {"response_format": {"type": "xml"}},
        "response_format"),
    Bad("guided_json unknown type", {"guided_json": BAD_SCHEMA}, "guided_json"),
    Bad("guided_json properties 5", {"guided_json": BAD_PROPERTIES}, "guided_json"),
    Bad("guided_json string not json", {"guided_json": "{not json"}, "guided_json"),
    Bad("guided_regex does not compile", {"guided_regex": "(a"}, "guided_regex"),
    Bad("guided_grammar lark does not compile", {"guided_grammar": "start: ((\n"},
        "guided_grammar"),
    Bad("guided_grammar gbnf does not compile", {"guided_grammar": 'root ::= ( "a"'},
        "guided_grammar"),
    Bad("structured_outputs bad regex", {"structured_outputs": {"regex": "(a"}},
        "structured_outputs"),
    Bad("structured_outputs bad schema", {"structured_outputs": {"json": BAD_SCHEMA}},
        "structured_outputs"),
    Bad("structured_outputs two constraints",
        {"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs"),
    Bad("two constraints", {"guided_regex": "a+", "guided_choice": ["a", "b"]}, "guided_"),
    Bad("response_format and guided_json",
        {"response_format": json_schema_format(SMALL_SCHEMA), "guided_json": SMALL_SCHEMA}, ""),
    Bad("streamed bad regex", {"guided_regex": "(a", "stream": True}, "guided_regex"),
    Bad("completions bad regex", {"guided_regex": "(a"}, "guided_regex", "/v1/completions"),
    Bad("completions bad schema", {"guided_json": BAD_SCHEMA}, "guided_json",
        "/v1/completions"),
    Bad("completions bad response_format", {"response_format": json_schema_format(BAD_SCHEMA)},
        "response_format", "/v1/completions"),
]


def _bad_body(case: Bad) -> dict[str, object]:
    base: dict[str, object] = ({"prompt": "Paged attention"}
                               if case.endpoint == "/v1/completions" else {"messages": MESSAGES})
    return {"model": MODEL_NAME, "max_tokens": 16, **base, **case.fields}


@pytest.mark.parametrize("case", BAD_CASES, ids=[case.name for case in BAD_CASES])
def test_bad_constraint_is_a_400_naming_the_field(server: RunningServer, case: Bad) -> None:
    response = server.http().post(case.endpoint, json=_bad_body(case))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if case.param:  # two constraints at once may name either, or neither
        assert isinstance(error["param"], str) and error["param"].startswith(case.param), error
    server.wait_idle()


def test_server_serves_after_bad_constraints(server: RunningServer) -> None:
    http = server.http()
    for case in BAD_CASES:
        assert http.post(case.endpoint, json=_bad_body(case)).status_code == 400
    server.wait_idle()
    answer = gather(chat(server, False, temperature=0.0,
                         response_format=json_schema_format(SMALL_SCHEMA)))[0]
    assert _invalid_json(answer, SMALL_SCHEMA) is None
    server.wait_idle()

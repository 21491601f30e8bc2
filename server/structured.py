"""Request fields → the engine's output constraint (response_format, vLLM's guided_* and
structured_outputs) and the tool plan: which tools the template shows, which call format is
parsed, and the grammar that forces a call for tool_choice "required" or a named function."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from engine import InvalidRequestError, StructuredOutputsParams
from server.errors import ApiError, from_engine_error
from server.protocol import (
    ChatCompletionRequest,
    FunctionDefinition,
    FunctionNameRef,
    NamedToolChoice,
    ResponseFormat,
    SamplingRequest,
    StructuredOutputsRequest,
    Tool,
)
from server.tool_parsers import PARSERS, FunctionSpec, ToolParser, parser_for_template

# the request fields that constrain the output; a request may use one of them
CONSTRAINT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar", "structured_outputs")
# the format a forced call takes when the chat template shows no format of its own
FALLBACK_TOOL_FORMAT = "json_array"
EMPTY_PARAMETERS: dict[str, object] = {"type": "object", "properties": {}}


def output_constraint(request: SamplingRequest) -> StructuredOutputsParams | None:
    """The request's one constraint, or None; two of them are a 400 naming the second."""
    given = [name for name in CONSTRAINT_FIELDS if _asks_for_constraint(request, name)]
    if not given:
        return None
    if len(given) > 1:
        raise ApiError(400, f"{given[1]} cannot be combined with {given[0]}: a request takes "
                       "one output constraint", param=given[1])
    name = given[0]
    try:
        return _constraint(name, getattr(request, name)).validate()
    except InvalidRequestError as exc:
        raise from_engine_error(exc) from exc


def _asks_for_constraint(request: SamplingRequest, name: str) -> bool:
    value = getattr(request, name)
    if isinstance(value, ResponseFormat):
        return value.type != "text"
    return value is not None


def _constraint(name: str, value: object) -> StructuredOutputsParams:
    if isinstance(value, ResponseFormat):
        if value.type == "json_object":
            return StructuredOutputsParams(json_object=True, param=name)
        assert value.json_schema is not None  # the model's validator
        schema = value.json_schema.schema_
        # OpenAI: a json_schema format without a schema is any JSON object
        if schema is None:
            return StructuredOutputsParams(json_object=True, param=name)
        return StructuredOutputsParams.from_schema(schema, name)
    if isinstance(value, StructuredOutputsRequest):
        return _structured_outputs(value, name)
    if name == "guided_json":
        return StructuredOutputsParams.from_schema(value, name)
    if name == "guided_regex":
        return StructuredOutputsParams(regex=str(value), param=name)
    if name == "guided_choice":
        assert isinstance(value, list)
        return StructuredOutputsParams(choice=tuple(value), param=name)
    assert name == "guided_grammar"
    return StructuredOutputsParams(grammar=str(value), param=name)


def _structured_outputs(value: StructuredOutputsRequest, name: str) -> StructuredOutputsParams:
    schema = (StructuredOutputsParams.from_schema(value.json_, name).json
              if value.json_ is not None else None)
    return StructuredOutputsParams(  # validate() then checks that exactly one is set
        json=schema, json_object=bool(value.json_object), regex=value.regex,
        choice=tuple(value.choice) if value.choice is not None else None,
        grammar=value.grammar, param=name)


# ---------------------------------------------------------------- tools


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one chat request uses its tools. The template shows them in every mode (as vLLM
    does); `constraint` forces a call (required, named); `parser` reads calls back out of the
    text (None with "none": the answer is text). `param` is the field the tools came in."""

    functions: tuple[FunctionSpec, ...]
    mode: Literal["none", "auto", "required", "named"]
    parser: ToolParser | None
    parallel: bool
    constraint: StructuredOutputsParams | None
    param: str = "tools"

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.functions)

    @property
    def template_tools(self) -> list[dict[str, object]]:
        return template_tools(self.functions)


def template_tools(functions: Sequence[FunctionSpec]) -> list[dict[str, object]]:
    """The tools as chat templates expect them (OpenAI's shape); /tokenize renders the same."""
    return [{"type": "function", "function": {
        "name": f.name, "description": f.description or "", "parameters": f.parameters}}
        for f in functions]


def function_specs(tools: Sequence[Tool]) -> tuple[FunctionSpec, ...]:
    return _specs([tool.function for tool in tools], "tools")


def plan_tools(request: ChatCompletionRequest, parser_name: str | None,
               chat_template: str | None, added_tokens: Mapping[str, int]) -> ToolPlan | None:
    """None when the request has no tools. `added_tokens` (the tokenizer's added tokens, text
    to id) tells the forced grammar which of the format's markers are tokens of their own."""
    functions, choice, choice_param = _tools_and_choice(request)
    tools_param = "functions" if choice_param == "function_call" else "tools"
    if not functions:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, f"{choice_param} needs tools to choose from",
                           param=choice_param)
        return None
    parallel = request.parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan(functions, "none", None, parallel, None, tools_param)
    if choice in (None, "auto"):
        name = parser_name or parser_for_template(chat_template)
        if name is None:
            raise ApiError(400, "tool_choice \"auto\" needs the model's tool-call format, and "
                           "its chat template shows none that pagedserve knows: start the "
                           "server with --tool-call-parser, or use tool_choice \"required\" "
                           "or a named function", param=choice_param)
        return ToolPlan(functions, "auto", PARSERS[name](), parallel, None, tools_param)
    parser = PARSERS[parser_name or parser_for_template(chat_template) or FALLBACK_TOOL_FORMAT]()
    if choice == "required":
        forced = functions
        mode: Literal["required", "named"] = "required"
    else:
        forced = tuple(f for f in functions if f.name == choice)
        if not forced:
            raise ApiError(400, f"{choice_param} names the function {choice!r}, which is not "
                           "among the tools", param=choice_param)
        mode, parallel = "named", False
    markers = {m: added_tokens[m] for m in parser.markers if m in added_tokens}
    grammar = parser.forced_grammar(forced, parallel, markers)
    return ToolPlan(functions, mode, parser, parallel,
                    StructuredOutputsParams(grammar=grammar, param=tools_param), tools_param)


def _tools_and_choice(request: ChatCompletionRequest
                      ) -> tuple[tuple[FunctionSpec, ...], str | None, str]:
    """(functions, "none" | "auto" | "required" | a function name | None, the choice's field)
    from tools/tool_choice or the legacy functions/function_call."""
    if request.functions is not None:
        if request.tools is not None:
            raise ApiError(400, "functions is the legacy form of tools: send one of them",
                           param="functions")
        return (_specs(request.functions, "functions"), _choice_name(request.function_call),
                "function_call")
    return (function_specs(request.tools or ()), _choice_name(request.tool_choice),
            "tool_choice")


def _choice_name(choice: str | NamedToolChoice | FunctionNameRef | None) -> str | None:
    if isinstance(choice, NamedToolChoice):
        return choice.function.name
    if isinstance(choice, FunctionNameRef):
        return choice.name
    return choice


def _specs(functions: Sequence[FunctionDefinition], param: str) -> tuple[FunctionSpec, ...]:
    names = [f.name for f in functions]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ApiError(400, f"{param} names a function more than once: {duplicated[0]}",
                       param=param)
    return tuple(FunctionSpec(f.name, f.description, f.parameters or dict(EMPTY_PARAMETERS))
                 for f in functions)


def parameter_constraints(plan: ToolPlan) -> list[StructuredOutputsParams]:
    """Each tool's parameters as a constraint: compiling them is how a schema is checked, so
    a tool whose parameters are not a schema is a 400 in every mode, as in OpenAI's API."""
    return [StructuredOutputsParams.from_schema(f.parameters, plan.param)
            for f in plan.functions]

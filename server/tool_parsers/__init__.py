"""Tool calls in model output: per-format parsers (whole and streamed), the grammars that force
a call, and bare JSON calls. `types` holds the plain data, `streamer` the one state machine
every format shares, `formats` the formats and their grammars, `bare_json` the fallback."""

from server.tool_parsers.bare_json import bare_json_calls, could_be_bare_json_call
from server.tool_parsers.formats import (
    PARSERS,
    HermesParser,
    JsonArrayParser,
    Llama3JsonParser,
    MistralParser,
    ToolParser,
    new_call_id,
    parser_for_template,
)
from server.tool_parsers.streamer import ToolCallStreamer
from server.tool_parsers.types import (
    CallSyntax,
    ExtractedCalls,
    FunctionSpec,
    GrammarShape,
    StreamDelta,
    ToolCall,
    ToolCallDelta,
)

__all__ = [
    "PARSERS", "CallSyntax", "ExtractedCalls", "FunctionSpec", "GrammarShape",
    "HermesParser", "JsonArrayParser", "Llama3JsonParser", "MistralParser", "StreamDelta",
    "ToolCall", "ToolCallDelta", "ToolCallStreamer", "ToolParser", "bare_json_calls",
    "could_be_bare_json_call", "new_call_id", "parser_for_template",
]

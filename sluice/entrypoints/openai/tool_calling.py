"""Tool calling on /v1/chat/completions: the request's tools and tool_choice -> how the output is read.

    tool_choice      what the model is told                    how its output is read
    "none"           tools in the chat template                as content
    "auto"           tools in the chat template                by --tool-call-parser (needs
                                                               --enable-auto-tool-choice)
    "required"       tools in the template; the output is      a JSON array [{"name", "parameters"}, ...]
                     constrained to a JSON array of calls      -> one call per item
    {"function": f}  tools in the template; the output is      the output is f's arguments
                     constrained to f's parameters schema

``tool_choice`` left out means "auto" when tools are given, else "none" (as OpenAI). The constrained modes use
structured outputs (SamplingParams.structured_outputs), so they need no parser.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from typing import Any

from sluice.entrypoints.openai.errors import bad_request
from sluice.entrypoints.openai.protocol import ChatCompletionRequest, ChatCompletionToolParam, ChatMessage
from sluice.entrypoints.openai.tool_parsers import ParsedOutput, PartialCall, ToolParser, get_tool_parser
from sluice.entrypoints.openai.tool_parsers.base import scan_call_objects
from sluice.entrypoints.openai.tool_parsers.json_scan import MalformedError, skip_whitespace
from sluice.sampling_params import SamplingParams, StructuredOutputsParams

AUTO_FLAGS = "--enable-auto-tool-choice and --tool-call-parser"


@dataclass(frozen=True)
class ToolCallConfig:
    """The server's flags: --enable-auto-tool-choice, --tool-call-parser."""
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None

    def check(self) -> None:
        """Start-up check: auto tool choice needs a parser, and the parser must exist."""
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (the model's call format)")
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)


def structured_outputs_available() -> bool:
    """Whether constrained decoding can run here (its grammar library is installed)."""
    return importlib.util.find_spec("xgrammar") is not None or importlib.util.find_spec("llguidance") is not None


def tool_choice_of(request: ChatCompletionRequest) -> tuple[str, str | None]:
    """("none" | "auto" | "required", None) or ("function", the forced function's name), after checking the
    request's tools (a function may be called "auto": its name never stands for a mode)."""
    choice = request.tool_choice if request.tool_choice is not None else "auto" if request.tools else "none"
    for index, tool in enumerate(request.tools or []):
        _check_tool(index, tool)
    if choice != "none" and not request.tools:
        raise bad_request(f"tool_choice {_shown(request.tool_choice)} needs tools", "tool_choice")
    if isinstance(choice, str):
        return choice, None
    names = [tool.function.name for tool in request.tools or []]
    if choice.function.name not in names:
        raise bad_request(f"tool_choice names the function {choice.function.name!r}, which is not among the "
                          f"tools ({', '.join(map(repr, names))})", "tool_choice")
    return "function", choice.function.name


def _shown(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else repr(choice.function.name)


def _check_tool(index: int, tool: ChatCompletionToolParam) -> None:
    import jsonschema
    name = tool.function.name
    if not name:
        raise bad_request(f"tools[{index}].function.name must not be empty", "tools")
    schema = tool.function.parameters
    if schema is None:
        return
    if schema.get("type", "object") != "object":
        raise bad_request(f"tools[{index}] ({name!r}): parameters must be a JSON schema of type 'object', got "
                          f"type {schema.get('type')!r}", "tools")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise bad_request(f"tools[{index}] ({name!r}): parameters is not a valid JSON schema: {e.message}",
                          "tools") from None


def parameters_schema(tool: ChatCompletionToolParam) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def required_calls_schema(tools: list[ChatCompletionToolParam], parallel: bool) -> dict[str, Any]:
    """A JSON array of one or more {"name": <a tool's name>, "parameters": <its schema>} (one at most when not
    ``parallel``); each tool's $defs move to the top, where its $refs ("#/$defs/...") point."""
    defs: dict[str, Any] = {}
    items = []
    for tool in tools:
        schema = dict(parameters_schema(tool))
        for name, definition in schema.pop("$defs", {}).items():
            if defs.setdefault(name, definition) != definition:
                raise bad_request(f"tools: two tools define $defs {name!r} differently; tool_choice \"required\" "
                                  "puts every tool's $defs in one schema", "tools")
        items.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                     "parameters": schema},
                      "required": ["name", "parameters"]})
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if not parallel:
        array["maxItems"] = 1
    if defs:
        array["$defs"] = defs
    return array


class RequiredToolsParser(ToolParser):
    """tool_choice "required": the output is the JSON array required_calls_schema describes."""
    name = "required"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = skip_whitespace(text, 0)
        if start >= len(text) and not final:
            return ParsedOutput()
        try:
            if start >= len(text) or text[start] != "[":
                raise MalformedError("expected a JSON array")
            calls = scan_call_objects(text, start + 1, final, separator=",", closing="]",
                                      arguments_keys=("parameters",))
        except (MalformedError, ValueError):
            if final:  # cut off (max_tokens): the calls the array completed before the cut still count
                complete = self._complete_calls(text, start)
                if complete:
                    return ParsedOutput(calls=complete)
            return ParsedOutput(content=text)
        return ParsedOutput(calls=calls)

    @staticmethod
    def _complete_calls(text: str, start: int) -> list[PartialCall]:
        """The leading calls of a cut-off array whose name and arguments are whole (a model that keeps adding
        calls until max_tokens still returns the ones it finished)."""
        if start >= len(text) or text[start] != "[":
            return []
        try:
            calls = scan_call_objects(text, start + 1, False, separator=",", closing="]",
                                      arguments_keys=("parameters",))
        except (MalformedError, ValueError):
            return []
        complete = []
        for call in calls:
            try:
                json.loads(call.arguments)
            except ValueError:
                break
            if call.name is None:
                break
            complete.append(call)
        return complete


class NamedFunctionParser(ToolParser):
    """tool_choice naming a function: the whole output is that function's arguments."""
    name = "named"

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return ParsedOutput(calls=[PartialCall(self.function_name, text.strip())])


@dataclass
class ToolPlan:
    """How one request's output is read: ``parser`` None for plain content."""
    choice: str  # "none" | "auto" | "required" | "function"
    parser: ToolParser | None
    max_calls: int | None  # 1 when parallel_tool_calls is false
    function: str | None = None  # the forced function's name (choice "function")

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")


def plan_tool_calls(request: ChatCompletionRequest, config: ToolCallConfig) -> ToolPlan:
    """Checks the request's tools and tool_choice against the server's flags (400s) and picks the parser."""
    choice, function = tool_choice_of(request)
    shown = repr(function) if function is not None else repr(choice)
    max_calls = 1 if request.parallel_tool_calls is False else None
    if choice == "none":
        return ToolPlan(choice, None, None)
    if choice == "auto":
        if not config.enable_auto_tool_choice or config.tool_call_parser is None:
            raise bad_request(f'"auto" tool choice requires {AUTO_FLAGS} to be set (tool_choice defaults to '
                              '"auto" when tools are given)', "tool_choice")
        return ToolPlan(choice, get_tool_parser(config.tool_call_parser), max_calls)
    if request.response_format is not None and request.response_format.type != "text":
        raise bad_request(f"tool_choice {shown} constrains the output itself; it cannot be combined with "
                          "response_format", "response_format")
    if not structured_outputs_available():
        raise bad_request(f"tool_choice {shown} needs structured outputs (constrained decoding), which this "
                          "server does not have", "tool_choice")
    if choice == "required":
        return ToolPlan(choice, RequiredToolsParser(), max_calls)
    return ToolPlan(choice, NamedFunctionParser(function), 1, function)


def apply_tool_plan(plan: ToolPlan, request: ChatCompletionRequest, params: SamplingParams) -> None:
    """Constrains the output for the forced choices (compact JSON: no run of whitespace can eat the token
    budget of a small model); lets the auto parser keep its format's tokens."""
    if plan.choice == "required":
        schema = required_calls_schema(request.tools or [], parallel=plan.max_calls is None)
        params.structured_outputs = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    elif plan.function is not None:
        tool = next(t for t in request.tools or [] if t.function.name == plan.function)
        params.structured_outputs = StructuredOutputsParams(json=parameters_schema(tool), disable_any_whitespace=True)
    elif plan.parser is not None:
        plan.parser.adjust_request(params)


def template_tools(tools: list[ChatCompletionToolParam] | None) -> list[dict[str, Any]] | None:
    """The tools as chat templates read them (Hugging Face's {"type": "function", "function": {...}})."""
    return [tool.model_dump(exclude_none=True) for tool in tools or []] or None


def template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    """One message as chat templates read it: text content; an assistant's tool_calls with their arguments as a
    dict (templates write ``arguments | tojson``); a tool message's tool_call_id."""
    rendered: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        rendered["tool_calls"] = [
            {"id": call.id, "type": call.type,
             "function": {"name": call.function.name,
                          "arguments": _arguments_dict(call.function.arguments, f"messages[{index}].tool_calls"
                                                                                f"[{number}].function.arguments")}}
            for number, call in enumerate(message.tool_calls)]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def _arguments_dict(arguments: str | dict[str, Any], where: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        raise bad_request(f"{where} is not valid JSON", "messages") from None
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be a JSON object", "messages")
    return value

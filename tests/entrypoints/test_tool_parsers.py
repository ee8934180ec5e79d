"""Tool-call parsers: each format read whole and as a stream, and the two readings agree.

A stream feeds the text a few characters at a time; the concatenated content deltas must equal the non-streamed
content, each call's name must come first in a chunk of its own with an id, and the concatenated argument
fragments must equal the non-streamed arguments string."""
from __future__ import annotations

import json

import pytest

from sluice.entrypoints.openai.protocol import DeltaMessage
from sluice.entrypoints.openai.tool_calling import NamedFunctionParser, RequiredToolsParser, required_calls_schema
from sluice.entrypoints.openai.tool_parsers import TOOL_PARSERS, ToolCallStreamer, ToolParser, get_tool_parser


def stream(parser: ToolParser, text: str, step: int, max_calls: int | None = None) -> list[DeltaMessage]:
    streamer = ToolCallStreamer(parser, max_calls)
    deltas = [d for i in range(0, len(text), step) for d in streamer.feed(text[i:i + step])]
    return deltas + streamer.finish()


def streamed_result(deltas: list[DeltaMessage]) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, [(name, arguments)]) a client assembles from the deltas; checks each call's chunk order."""
    content = "".join(d.content or "" for d in deltas) or None
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        assert not (delta.content and delta.tool_calls)
        for call in delta.tool_calls or []:
            if call.index not in calls:
                assert call.id and call.type == "function" and call.function.name
                assert call.function.arguments == ""  # the name goes out alone
                calls[call.index] = [call.function.name, ""]
            else:
                assert call.id is None and call.function.name is None
                calls[call.index][1] += call.function.arguments
    assert sorted(calls) == list(range(len(calls)))
    return content, [tuple(calls[i]) for i in sorted(calls)]


def both_ways(parser: ToolParser, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = parser.extract_tool_calls(text)
    whole = (content, [(c.function.name, c.function.arguments) for c in calls])
    for step in (1, 3, 7, len(text) or 1):
        assert streamed_result(stream(parser, text, step)) == whole, f"step {step}"
    return whole


WEATHER = '{"city": "Paris", "unit": "celsius"}'
CASES = {
    "hermes": [
        (f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>',
         None, [("get_weather", WEATHER)]),
        (f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\nDone.',
         "Let me check.\n\n\nDone.", [("get_weather", WEATHER), ("get_time", "{}")]),
        ('<tool_call>{"arguments": {"q": "a \\"}\\" b"}, "name": "search"}</tool_call>', None,
         [("search", '{"q": "a \\"}\\" b"}')]),
        ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", '{"a": 1}')]),
        ('<tool_call>{"name": "f"}</tool_call>', None, [("f", "{}")]),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', None, [("f", '{"a": 1}')]),  # eos before the tag
        ("No tools needed: 2 < 3 and <tool> is a word.", "No tools needed: 2 < 3 and <tool> is a word.", []),
        ("ends with <tool_c", "ends with <tool_c", []),
    ],
    "llama3_json": [
        ('<|python_tag|>{"name": "get_weather", "parameters": ' + WEATHER + "}", None, [("get_weather", WEATHER)]),
        ('{"name": "a", "parameters": {"x": [1, 2]}}; {"name": "b", "parameters": {}}', None,
         [("a", '{"x": [1, 2]}'), ("b", "{}")]),
        (' {"name": "a", "arguments": {"x": 1.5e3}}', None, [("a", '{"x": 1.5e3}')]),
        ("The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": ' + WEATHER + '}, {"name": "g", "arguments": {}}]',
         None, [("get_weather", WEATHER), ("g", "{}")]),
        ('Sure. [TOOL_CALLS]get_weather[ARGS]' + WEATHER + '[TOOL_CALLS]get_time[ARGS]{}', "Sure.",
         [("get_weather", WEATHER), ("get_time", "{}")]),
        ("Plain [TOOL answer", "Plain [TOOL answer", []),
    ],
    "pythonic": [
        ('[get_weather(city="Paris", unit=\'celsius\'), get_time()]', None,
         [("get_weather", WEATHER), ("get_time", "{}")]),
        ('<|python_start|>[search(q="a), b", n=3, opts={"deep": True, "tags": [1, None]})]<|python_end|>', None,
         [("search", '{"q": "a), b", "n": 3, "opts": {"deep": true, "tags": [1, null]}}')]),
        ("It is 4 [citation needed].", "It is 4 [citation needed].", []),
    ],
}


@pytest.mark.parametrize("name,text,content,calls", [(n, *case) for n, cases in CASES.items() for case in cases],
                         ids=[f"{n}-{i}" for n, cases in CASES.items() for i in range(len(cases))])
def test_streamed_and_whole_readings_agree(name, text, content, calls):
    assert both_ways(get_tool_parser(name), text) == (content, calls)


MALFORMED = {
    "hermes": ['<tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call>', '<tool_call>{"name": 1}</tool_call>',
               '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '<tool_call>{"name": "f", "argu',
               '<tool_call>{"name": "f"} extra</tool_call>', "<tool_call></tool_call>"],
    "llama3_json": ['{"name": "f", "parameters": {"a": 1}} trailing', '{"name": "f", "parameters": {', '{"nam',
                    '{"parameters": {}}'],
    "mistral": ["[TOOL_CALLS]", '[TOOL_CALLS][{"name": "f", "arguments": {"a": }}]', "[TOOL_CALLS][]",
                '[TOOL_CALLS]f[ARGS]{"a": 1', "[TOOL_CALLS]f"],
    "pythonic": ["[f(1, 2)]", "[f(a=1), g(", "[f(a=open('x'))]", "[1, 2]", "[f(**kw)]", "[]"],
}


@pytest.mark.parametrize("name,text", [(n, t) for n, texts in MALFORMED.items() for t in texts])
def test_malformed_or_cut_off_calls_are_content(name, text):
    parser = get_tool_parser(name)
    assert parser.extract_tool_calls(text) == (text.strip(), [])
    for step in (1, 4):
        stream(parser, text, step)  # never raises; what already went out as a call stays out


def test_content_is_held_back_only_while_it_may_start_a_call():
    streamer = ToolCallStreamer(get_tool_parser("hermes"))
    assert [d.content for d in streamer.feed("Hello <tool")] == ["Hello"]
    assert [d.content for d in streamer.feed("box> and")] == [" <toolbox> and"]
    assert streamer.finish() == []


def test_arguments_stream_in_fragments_before_the_call_closes():
    deltas = stream(get_tool_parser("hermes"), f'<tool_call>{{"name": "get_weather", "arguments": {WEATHER}}}'
                    "</tool_call>", step=4)
    fragments = [c.function.arguments for d in deltas for c in d.tool_calls or [] if c.function.name is None]
    assert len(fragments) > 3 and "".join(fragments) == WEATHER


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    parser = get_tool_parser("hermes")
    assert [c.function.name for c in parser.extract_tool_calls(text, max_calls=1)[1]] == ["a"]
    assert streamed_result(stream(parser, text, 5, max_calls=1))[1] == [("a", "{}")]


def test_ids_are_call_and_24_letters_or_digits_except_mistral_which_wants_9():
    for name in TOOL_PARSERS:
        call_id = get_tool_parser(name).make_call_id()
        if name == "mistral":
            assert len(call_id) == 9 and call_id.isalnum()
        else:
            assert call_id.startswith("call_") and len(call_id) == 29 and call_id[5:].isalnum()


def test_required_output_array_becomes_calls_streamed_and_whole():
    text = ' [{"name": "get_weather", "parameters": ' + WEATHER + '}, {"name": "get_time", "parameters": {}}] '
    assert both_ways(RequiredToolsParser(), text) == (None, [("get_weather", WEATHER), ("get_time", "{}")])
    cut_off = '[{"name": "f", "parameters": {"a": '  # max_tokens reached: the text is content
    assert RequiredToolsParser().extract_tool_calls(cut_off) == (cut_off.strip(), [])


def test_named_function_output_is_its_arguments():
    assert both_ways(NamedFunctionParser("get_weather"), "\n" + WEATHER + " \n") == (None, [("get_weather", WEATHER)])


def test_required_schema_is_an_array_of_name_and_parameters_per_tool():
    from sluice.entrypoints.openai.protocol import ChatCompletionToolParam
    tools = [ChatCompletionToolParam.model_validate(
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}}),
        ChatCompletionToolParam.model_validate({"type": "function", "function": {"name": "g"}})]
    schema = required_calls_schema(tools, parallel=False)
    import jsonschema
    jsonschema.validate([{"name": "f", "parameters": {"p": 3}}], schema)
    jsonschema.validate([{"name": "g", "parameters": {}}], schema)
    for bad in ([], [{"name": "f", "parameters": {"p": "x"}}], [{"name": "h", "parameters": {}}],
                [{"name": "g", "parameters": {}}] * 2):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert "maxItems" not in required_calls_schema(tools, parallel=True)
    assert json.dumps(schema)  # plain JSON for the grammar compiler


def test_two_tools_with_clashing_defs_are_a_400_for_required():
    from sluice.entrypoints.openai.errors import OpenAIError
    from sluice.entrypoints.openai.protocol import ChatCompletionToolParam

    def tool(name: str, p_type: str) -> ChatCompletionToolParam:
        return ChatCompletionToolParam.model_validate({"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": p_type}}}}})

    assert required_calls_schema([tool("f", "integer"), tool("g", "integer")], parallel=True)["$defs"] == \
        {"P": {"type": "integer"}}  # the same definition twice is one
    with pytest.raises(OpenAIError) as error:
        required_calls_schema([tool("f", "integer"), tool("g", "string")], parallel=True)
    assert error.value.status == 400 and "'P'" in error.value.message


@pytest.mark.parametrize("name", ["auto", "none", "required"])
def test_a_forced_function_named_like_a_mode_is_still_that_function(name):
    from sluice.entrypoints.openai.protocol import ChatCompletionRequest
    from sluice.entrypoints.openai.tool_calling import ToolCallConfig, apply_tool_plan, plan_tool_calls
    from sluice.sampling_params import SamplingParams

    request = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"x": {"type": "integer"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": name}}})
    plan = plan_tool_calls(request, ToolCallConfig())
    assert (plan.choice, plan.function, plan.forced, plan.max_calls) == ("function", name, True, 1)
    params = SamplingParams()
    apply_tool_plan(plan, request, params)
    assert params.structured_outputs.json == {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert both_ways(plan.parser, '{"x": 1}') == (None, [(name, '{"x": 1}')])

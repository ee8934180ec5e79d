"""tool_choice "required" and a named function: the output is constrained (structured outputs) to the tools'
schemas, so even the small default model (SmolLM2-135M-Instruct) returns calls whose arguments validate."""
from __future__ import annotations

import json

import jsonschema
import pytest

pytest.importorskip("xgrammar")  # constrained decoding

from tests.entrypoints.server_utils import RemoteServer  # noqa: E402

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
COMMON = dict(messages=ASK, tools=TOOLS, temperature=0, max_tokens=96)


@pytest.fixture(scope="module")
def client():
    server = RemoteServer(None, ["--max-model-len", "2048"])
    yield server.client()
    server.stop()


def _check(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _streamed_calls(chunks) -> tuple[list[tuple[str, str]], str | None]:
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if piece.id is not None:
                assert piece.function.name and piece.index not in calls
                calls[piece.index] = [piece.function.name, piece.function.arguments or ""]
            else:
                calls[piece.index][1] += piece.function.arguments
    return [tuple(calls[i]) for i in sorted(calls)], chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("parallel", [True, False])
def test_required_returns_calls_that_validate(client, parallel):
    response = client.chat.completions.create(model=client.models.list().data[0].id, tool_choice="required",
                                              parallel_tool_calls=parallel, **COMMON)
    choice = response.choices[0]
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check(call.function.name, call.function.arguments)
    if parallel:
        # A small model at temperature 0 may add the same call again and again until max_tokens: the calls it
        # completed before the cut are still returned, each valid.
        assert choice.finish_reason in ("tool_calls", "length")
        return
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    chunks = list(client.chat.completions.create(model=response.model, tool_choice="required",
                                                 parallel_tool_calls=parallel, stream=True, **COMMON))
    calls, finish_reason = _streamed_calls(chunks)
    assert finish_reason == "tool_calls"
    assert calls == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_named_function_returns_its_call(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    model = client.models.list().data[0].id
    response = client.chat.completions.create(model=model, tool_choice=named, **COMMON)
    choice = response.choices[0]
    [call] = choice.message.tool_calls
    assert call.function.name == "get_time" and choice.message.content is None
    assert choice.finish_reason == "stop"  # a named function ends as OpenAI's do
    _check("get_time", call.function.arguments)
    chunks = list(client.chat.completions.create(model=model, tool_choice=named, stream=True, **COMMON))
    calls, finish_reason = _streamed_calls(chunks)
    assert calls == [("get_time", call.function.arguments)] and finish_reason == "stop"

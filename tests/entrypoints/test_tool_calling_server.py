"""Tool calling end to end: a real `sluice serve --enable-auto-tool-choice --tool-call-parser hermes` over a
scripted tiny model (its reply to any chat is a fixed Hermes tool call, its <tool_call> tag a special token as
in Hermes 2 Pro), driven by the openai client."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest

from tests.entrypoints.server_utils import REPO_ROOT, RemoteServer
from tests.tiny_models import HERMES_TEMPLATE, save_scripted_tiny_model

MODEL = "scripted"
REPLY = ["I will check.", "<tool_call>", '\n{"name": "get_weather", ', '"arguments": {"city": ', '"Paris", ',
         '"unit": "celsius"}}', "\n</tool_call>"]
ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                                   "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = save_scripted_tiny_model(tmp_path_factory.mktemp("scripted"), REPLY, HERMES_TEMPLATE,
                                     special=frozenset({"<tool_call>"}))
    srv = RemoteServer(model, ["--served-model-name", MODEL, "--max-model-len", "2048", "--num-kv-blocks", "256",
                               "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_auto_tool_choice_returns_the_parsed_call(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check."
    [call] = choice.message.tool_calls
    assert CALL_ID.fullmatch(call.id) and call.type == "function"
    assert call.function.name == "get_weather" and call.function.arguments == ARGUMENTS


def test_streamed_tool_call_sends_the_name_first_then_argument_fragments(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL], stream=True,
                                                 tool_choice="auto"))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    pieces = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    first, rest = pieces[0], pieces[1:]
    assert CALL_ID.fullmatch(first.id) and first.type == "function" and first.index == 0
    assert first.function.name == "get_weather" and not first.function.arguments
    # How many fragments depends on how many tokens each stream chunk carries (a loaded machine merges them);
    # splitting at every step size is covered by test_tool_parsers.py.
    assert rest and all(p.index == 0 and p.id is None and p.function.name is None for p in rest)
    assert content == "I will check."
    assert "".join(p.function.arguments for p in rest) == ARGUMENTS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_streamed_tool_call_keeps_every_tokens_logprob(client):
    """Tokens the tool streamer holds back (a call may be starting) send their logprobs with the next chunk:
    the stream carries one logprob per generated token, the same as the non-streamed answer."""
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER_TOOL], logprobs=True, top_logprobs=1)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content or []]
    whole = client.chat.completions.create(**kwargs)
    assert len(streamed) == chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [t.token for t in streamed] == [t.token for t in whole.choices[0].logprobs.content]


def test_tool_choice_none_gives_the_text_as_content(client):
    """No parser: special tokens are skipped as usual (the auto tests pass only because hermes keeps them)."""
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL], tool_choice="none")
    choice = response.choices[0]
    assert choice.message.content == "".join(REPLY).replace("<tool_call>", "") and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


def test_chat_without_tools_is_unchanged(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK,
                                              extra_body={"skip_special_tokens": False})
    assert response.choices[0].message.content == "".join(REPLY) and not response.choices[0].message.tool_calls


def test_parallel_tool_calls_false_is_accepted(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER_TOOL],
                                              parallel_tool_calls=False)
    assert [c.function.name for c in response.choices[0].message.tool_calls] == ["get_weather"]


CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_def", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "CET"}}}]},
    {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees"},
    {"role": "tool", "tool_call_id": "call_def", "content": "noon"},
]


def test_a_conversation_with_tool_calls_and_results_renders(server, client):
    tokens = httpx.post(server.url("/tokenize"), json={"model": MODEL, "messages": CONVERSATION}, timeout=30)
    assert tokens.status_code == 200, tokens.text
    text = httpx.post(server.url("/detokenize"), json={"model": MODEL, "tokens": tokens.json()["tokens"]},
                      timeout=30).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '{"name": "get_time", "arguments": {"tz": "CET"}}' in text
    assert "<tool_response>\n18 degrees\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    response = client.chat.completions.create(model=MODEL, messages=CONVERSATION, tools=[WEATHER_TOOL, TIME_TOOL])
    assert response.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_tokenize_renders_the_tools_too(server):
    tokens = httpx.post(server.url("/tokenize"), json={"model": MODEL, "messages": ASK, "tools": [WEATHER_TOOL]},
                        timeout=30).json()["tokens"]
    text = httpx.post(server.url("/detokenize"), json={"model": MODEL, "tokens": tokens}, timeout=30).json()["prompt"]
    assert '"name": "get_weather"' in text and text.index("<tools>") < text.index("What is the weather")


def test_tools_reach_the_chat_template(server):
    body = {"model": MODEL, "messages": ASK, "tools": [WEATHER_TOOL], "max_tokens": 1, "tool_choice": "none"}
    with_tools = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=30).json()
    without = httpx.post(server.url("/v1/chat/completions"), json={**body, "tools": None}, timeout=30).json()
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 20


BAD = [
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "'get_time'"),
    ({"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "string"}}}]},
     "'lookup'"),
    ({"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object",
                                                                                   "required": 3}}}]}, "'lookup'"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tool_choice": "sometimes", "tools": [WEATHER_TOOL]}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
]


@pytest.mark.parametrize("body,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_tool_requests_are_400_naming_the_problem(server, body, needle):
    r = httpx.post(server.url("/v1/chat/completions"), json={"model": MODEL, "messages": ASK, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_auto_tool_choice_without_a_parser_is_a_start_up_error():
    result = subprocess.run([sys.executable, "-m", "sluice.entrypoints.cli", "serve", "--enable-auto-tool-choice",
                             "--device", "cpu"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--tool-call-parser" in result.stderr

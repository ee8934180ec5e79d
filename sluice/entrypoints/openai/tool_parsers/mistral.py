"""Mistral formats: ``[TOOL_CALLS]`` then a JSON array of calls, or (newer tokenizers) ``name[ARGS]{json}``
per call, each after its own ``[TOOL_CALLS]``; content may come before the first.

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

``[TOOL_CALLS]`` is a special token: requests keep special tokens in their text (adjust_request). Mistral's
chat templates want call ids of nine letters and digits, so this parser makes those.
"""
from __future__ import annotations

import json

from sluice.entrypoints.openai.tool_parsers.base import (ParsedOutput, PartialCall, ToolParser, held_back,
                                                         random_call_id, scan_call_objects)
from sluice.entrypoints.openai.tool_parsers.json_scan import MalformedError, skip_whitespace, value_end
from sluice.sampling_params import SamplingParams

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"

    def adjust_request(self, params: SamplingParams) -> None:
        params.skip_special_tokens = False

    def make_call_id(self) -> str:
        return random_call_id(9, prefix="")

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = text.find(TOOL_CALLS)
        if start < 0:
            return ParsedOutput(content=text if final else text[:len(text) - held_back(text, TOOL_CALLS)])
        body = text[start + len(TOOL_CALLS):]
        lead = skip_whitespace(body, 0)
        try:
            if lead < len(body) and body[lead] == "[":
                calls = scan_call_objects(body, lead + 1, final, separator=",", closing="]")
            elif lead < len(body):
                calls = _named_calls(body, final)
            elif final:
                raise MalformedError("no calls after [TOOL_CALLS]")
            else:
                calls = []
        except (MalformedError, ValueError):
            return ParsedOutput(content=text)
        return ParsedOutput(content=text[:start], calls=calls)


def _named_calls(body: str, final: bool) -> list[PartialCall]:
    """``name[ARGS]{...}`` calls separated by [TOOL_CALLS]."""
    calls: list[PartialCall] = []
    for index, part in enumerate(body.split(TOOL_CALLS)):
        last = index == body.count(TOOL_CALLS)
        name, found, arguments = part.partition(ARGS)
        if not found:
            bracket = name.find("[")
            if final or not last or (bracket >= 0 and not ARGS.startswith(name[bracket:])):
                raise MalformedError("expected name[ARGS]")
            break  # the name is still growing
        name = name.strip()
        if not name.isidentifier() and not all(c.isalnum() or c in "_-." for c in name):
            raise MalformedError("bad function name")
        start = skip_whitespace(arguments, 0)
        if start >= len(arguments):
            if final or not last:
                raise MalformedError("missing arguments")
            calls.append(PartialCall(name))
            break
        end = value_end(arguments, start, final or not last)
        if end is None:
            if final:
                raise MalformedError("the arguments are incomplete")
            calls.append(PartialCall(name, arguments[start:].rstrip()))
            break
        rest = arguments[end:].strip()
        if (rest and (final or not last or not TOOL_CALLS.startswith(rest))) \
                or not isinstance(json.loads(arguments[start:end]), dict):
            raise MalformedError("arguments must be one JSON object")
        calls.append(PartialCall(name, arguments[start:end]))
    return calls

"""Llama 3.1+ JSON format: optional ``<|python_tag|>``, then JSON objects {"name", "parameters"} joined by ';'.

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

The whole output is either calls or content: text that does not start with the tag or '{', or any call that
is not well-formed, makes all of it content. ``<|python_tag|>`` is a special token, so it is usually gone from
the detokenized text already.
"""
from __future__ import annotations

from sluice.entrypoints.openai.tool_parsers.base import ParsedOutput, ToolParser, scan_call_objects
from sluice.entrypoints.openai.tool_parsers.json_scan import MalformedError

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        lead = text.lstrip()
        if not final and PYTHON_TAG.startswith(lead):
            return ParsedOutput()  # nothing yet, or the tag's start
        body = lead[len(PYTHON_TAG):] if lead.startswith(PYTHON_TAG) else lead
        if not body.lstrip().startswith("{") and (final or body.strip()):
            return ParsedOutput(content=text)
        try:
            calls = scan_call_objects(body, 0, final, separator=";", closing=None)
        except (MalformedError, ValueError):
            return ParsedOutput(content=text)
        return ParsedOutput(calls=calls)

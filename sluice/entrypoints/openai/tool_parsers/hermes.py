"""Hermes format (Qwen 2.5 / 3, NousResearch Hermes): each call a JSON object between tags.

    Let me check.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Some checkpoints (Hermes 2 Pro) make the tags special tokens: requests keep special tokens in their text.
"""
from __future__ import annotations

from sluice.entrypoints.openai.tool_parsers.base import (ParsedOutput, PartialCall, ToolParser, call_from_scan,
                                                         held_back)
from sluice.entrypoints.openai.tool_parsers.json_scan import MalformedError, scan_object, skip_whitespace
from sluice.sampling_params import SamplingParams

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def adjust_request(self, params: SamplingParams) -> None:
        params.skip_special_tokens = False

    def parse(self, text: str, final: bool) -> ParsedOutput:
        parsed = ParsedOutput()
        position = 0
        while True:
            start = text.find(START, position)
            if start < 0:
                tail = text[position:]
                parsed.content += tail if final else tail[:len(tail) - held_back(tail, START)]
                return parsed
            parsed.content += text[position:start]
            body_start = start + len(START)
            end = text.find(END, body_start)
            call = _read_call(text[body_start:end if end >= 0 else len(text)], final or end >= 0)
            if call is None:  # not a well-formed call: its text is content
                parsed.content += text[start:end + len(END) if end >= 0 else len(text)]
            else:
                parsed.calls.append(call)
            if end < 0:
                return parsed
            position = end + len(END)


def _read_call(body: str, complete: bool) -> PartialCall | None:
    """The call in one tag's body; None when malformed (or, once ``complete``, not exactly one object)."""
    try:
        scan = scan_object(body, 0, complete)
        call = call_from_scan(body, scan, complete)
    except (MalformedError, ValueError):
        return None
    if complete and skip_whitespace(body, scan.end) != len(body):
        return None
    return call

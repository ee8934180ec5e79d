"""What every tool-call parser is: ``parse(text, final)`` over the model's output so far.

A parser turns the text a model generated into plain content and tool calls. It implements one method,
``parse``, which reads the text as far as it goes: ``final=False`` while a stream is still growing (it then
holds back what may turn into a call, e.g. a trailing ``<tool_`` or a call's name that is not complete yet),
``final=True`` for the whole output. Both readings agree: what ``parse(prefix, False)`` reports is a prefix of
what ``parse(whole, True)`` reports, so the non-streamed response (``extract_tool_calls``) and a stream
(``ToolCallStreamer``, which sends only the difference between two readings) give the same calls. Text that is
not a well-formed call is content: a malformed call never fails the request.
"""
from __future__ import annotations

import json
import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from sluice.entrypoints.openai.protocol import (DeltaFunctionCall, DeltaMessage, DeltaToolCall, FunctionCall,
                                                ToolCall)
from sluice.entrypoints.openai.tool_parsers.json_scan import (MalformedError, ObjectScan, scan_object,
                                                                 skip_whitespace)
from sluice.sampling_params import SamplingParams

_ALNUM = string.ascii_letters + string.digits


def random_call_id(length: int = 24, prefix: str = "call_") -> str:
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


@dataclass
class PartialCall:
    """One call as far as it is known: ``name`` None until complete; ``arguments`` the JSON text so far."""
    name: str | None
    arguments: str = ""


@dataclass
class ParsedOutput:
    content: str = ""  # raw: stripped by the reader (extract_tool_calls, ToolCallStreamer)
    calls: list[PartialCall] = field(default_factory=list)


class ToolParser(ABC):
    """Reads one model family's tool-call format. Subclasses set ``name`` and implement ``parse``."""

    name: str = ""

    @abstractmethod
    def parse(self, text: str, final: bool) -> ParsedOutput:
        """The content and calls in ``text`` (see the module docstring). ``final``: the text is complete, so
        every call returned is complete and anything that is not a well-formed call is content."""

    def read(self, text: str, final: bool) -> ParsedOutput:
        """``parse``, with any text it cannot read as content (a malformed call never fails a request)."""
        try:
            return self.parse(text, final)
        except (MalformedError, ValueError, RecursionError):
            return ParsedOutput(content=text)

    def adjust_request(self, params: SamplingParams) -> None:
        """Changes a request's sampling params so that the format survives detokenization (e.g. keep the
        special token that starts the calls)."""

    def make_call_id(self) -> str:
        return random_call_id()

    def extract_tool_calls(self, text: str, max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
        """The whole output -> (content or None, the first ``max_calls`` tool calls)."""
        parsed = self.read(text, final=True)
        calls = [ToolCall(id=self.make_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in parsed.calls[:max_calls] if c.name is not None]
        return parsed.content.strip() or None, calls


@dataclass
class _SentCall:
    id: str
    name: str
    arguments: str = ""


class ToolCallStreamer:
    """One choice's stream: text deltas in, DeltaMessages out (content, or a call's name in its own chunk with
    its id, then fragments of its arguments)."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser = parser
        self.max_calls = max_calls
        self.text = ""
        self._content_sent = ""
        self._calls_sent: list[_SentCall] = []

    @property
    def tools_called(self) -> bool:
        return bool(self._calls_sent)

    def feed(self, delta_text: str) -> list[DeltaMessage]:
        self.text += delta_text
        return self._diff(self.parser.read(self.text, final=False))

    def finish(self) -> list[DeltaMessage]:
        """The rest, once the output is complete (text held back as a possible call start, e.g.)."""
        return self._diff(self.parser.read(self.text, final=True))

    def _diff(self, parsed: ParsedOutput) -> list[DeltaMessage]:
        deltas: list[DeltaMessage] = []
        content = parsed.content.strip()  # trailing whitespace waits for the text that follows it
        if len(content) > len(self._content_sent) and content.startswith(self._content_sent):
            deltas.append(DeltaMessage(content=content[len(self._content_sent):]))
            self._content_sent = content
        for index, call in enumerate(parsed.calls[:self.max_calls]):
            if call.name is None:
                break  # calls go out in order, each name before its arguments
            if index == len(self._calls_sent):
                sent = _SentCall(self.parser.make_call_id(), call.name)
                self._calls_sent.append(sent)
                deltas.append(DeltaMessage(tool_calls=[DeltaToolCall(
                    index=index, id=sent.id, type="function", function=DeltaFunctionCall(name=call.name,
                                                                                         arguments=""))]))
            sent = self._calls_sent[index]
            if call.name != sent.name or len(call.arguments) <= len(sent.arguments) \
                    or not call.arguments.startswith(sent.arguments):
                continue
            deltas.append(DeltaMessage(tool_calls=[DeltaToolCall(
                index=index, function=DeltaFunctionCall(arguments=call.arguments[len(sent.arguments):]))]))
            sent.arguments = call.arguments
        return deltas


# ---- helpers the JSON-based formats share ----------------------------------------------------------------
def call_from_scan(text: str, scan: ObjectScan, final: bool,
                   arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> PartialCall:
    """A call read from an object {"name": ..., "arguments": {...}} (as far as it goes). A complete object must
    be valid JSON with a string name and object (or JSON-string) arguments, else MalformedError."""
    name_span = scan.fields.get("name")
    name = None
    if name_span is not None and name_span[1] is not None:
        name = json.loads(text[name_span[0]:name_span[1]])
        if not isinstance(name, str) or not name:
            raise MalformedError("a tool call's name must be a non-empty string")
    key = next((k for k in arguments_keys if k in scan.fields), None)
    if scan.end is None:
        if final:
            raise MalformedError("the tool call is incomplete")
        if key is None:
            return PartialCall(name)
        start, end = scan.fields[key]
        if text[start] == '"':  # arguments given as a JSON string: sent whole, once complete
            return PartialCall(name, _string_arguments(text[start:end]) if end is not None else "")
        return PartialCall(name, text[start:end].rstrip() if end is None else text[start:end])
    json.loads(text[scan.start:scan.end])  # the whole object must be valid JSON
    if name is None:
        raise MalformedError("a tool call needs a name")
    if key is None:
        return PartialCall(name, "{}")
    start, end = scan.fields[key]
    raw = text[start:end]
    if raw.startswith('"'):
        return PartialCall(name, _string_arguments(raw))
    if not raw.startswith("{"):
        raise MalformedError("a tool call's arguments must be an object")
    return PartialCall(name, raw)


def _string_arguments(raw: str) -> str:
    arguments = json.loads(raw)
    if not isinstance(json.loads(arguments), dict):
        raise MalformedError("a tool call's arguments must be an object")
    return arguments


def scan_call_objects(text: str, start: int, final: bool, separator: str, closing: str | None,
                      arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> list[PartialCall]:
    """Calls written as JSON objects one after another from ``text[start]``, joined by ``separator`` and, when
    ``closing`` is given, ended by it (a JSON array: separator ',' closing ']'). MalformedError otherwise; with
    ``final``, also when the sequence is incomplete."""
    calls: list[PartialCall] = []
    index = skip_whitespace(text, start)
    while True:
        if index >= len(text):
            if final and (closing is not None or not calls):
                raise MalformedError("the tool calls are incomplete")
            return calls
        if closing is not None and text[index] == closing and not calls:
            raise MalformedError("no tool calls")
        scan = scan_object(text, index, final)
        calls.append(call_from_scan(text, scan, final, arguments_keys))
        if scan.end is None:
            return calls
        index = skip_whitespace(text, scan.end)
        if index >= len(text):
            if final and closing is not None:
                raise MalformedError("the tool calls are incomplete")
            return calls
        if closing is not None and text[index] == closing:
            if skip_whitespace(text, index + 1) != len(text):
                raise MalformedError("text after the tool calls")
            return calls
        if text[index] != separator:
            raise MalformedError(f"expected {separator!r} between tool calls")
        index = skip_whitespace(text, index + 1)
        if index >= len(text) and not final:
            return calls


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker`` (kept out of content while
    a stream grows)."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0

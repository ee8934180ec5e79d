"""Finding JSON values in text that may still be growing (a stream), without validating them.

The tool-call parsers read a model's output twice: whole (the non-streamed response) and as it grows (a
stream). Both read a call's arguments as the same slice of the text, the JSON value as the model wrote it, so
the fragments a stream sends always add up to the arguments the whole text gives:

    {"name": "get_weather", "arguments": {"city": "Pa          <- growing: name known, arguments '{"city": "Pa'
    {"name": "get_weather", "arguments": {"city": "Paris"}}    <- complete: arguments '{"city": "Paris"}'
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_WHITESPACE = " \t\n\r"
_SCALAR_END = _WHITESPACE + ",}];"
# A stream re-reads its text at every delta: jumps between the characters that matter keep that in C.
_STRUCTURE = re.compile(r'["{}\[\]]')
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)  # a whole string, escapes included


class MalformedError(ValueError):
    """The text cannot be (the start of) what the parser expects."""


def skip_whitespace(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


def value_end(text: str, start: int, final: bool) -> int | None:
    """Index just past the JSON value that starts at ``text[start]``; None when the text ends inside it (a
    scalar that reaches the end of the text is complete only when ``final``). Brackets and strings are matched,
    nothing else is checked: json.loads validates the complete value."""
    first = text[start]
    if first == '"':
        return _string_end(text, start)
    if first in "{[":
        depth, index = 0, start
        while (match := _STRUCTURE.search(text, index)) is not None:
            index = match.start()
            char = text[index]
            if char == '"':
                end = _string_end(text, index)
                if end is None:
                    return None
                index = end
                continue
            depth += 1 if char in "{[" else -1
            if depth == 0:
                return index + 1
            index += 1
        return None
    if first in "}],:;":
        raise MalformedError(f"expected a JSON value at {start}")
    index = start
    while index < len(text) and text[index] not in _SCALAR_END:
        index += 1
    return index if index < len(text) or final else None


def _string_end(text: str, start: int) -> int | None:
    match = _STRING.match(text, start)
    return match.end() if match is not None else None


@dataclass
class ObjectScan:
    """A JSON object read so far: each key's value span (end None while the value is incomplete)."""
    start: int = 0  # the opening brace
    fields: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    end: int | None = None  # just past the closing brace, once seen


def scan_object(text: str, start: int, final: bool) -> ObjectScan:
    """Reads the object starting at ``text[start]`` (after whitespace) as far as the text goes."""
    index = skip_whitespace(text, start)
    scan = ObjectScan(start=index)
    if index >= len(text):
        return scan
    if text[index] != "{":
        raise MalformedError("expected '{'")
    index += 1
    while True:
        index = skip_whitespace(text, index)
        if index >= len(text):
            return scan
        if text[index] == "}":
            scan.end = index + 1
            return scan
        if text[index] != '"':
            raise MalformedError("expected a key")
        key_end = _string_end(text, index)
        if key_end is None:
            return scan
        key = json.loads(text[index:key_end])
        index = skip_whitespace(text, key_end)
        if index >= len(text):
            return scan
        if text[index] != ":":
            raise MalformedError("expected ':'")
        index = skip_whitespace(text, index + 1)
        if index >= len(text):
            return scan
        end = value_end(text, index, final)
        scan.fields[key] = (index, end)
        if end is None:
            return scan
        index = skip_whitespace(text, end)
        if index >= len(text):
            return scan
        if text[index] == ",":
            index += 1
        elif text[index] != "}":
            raise MalformedError("expected ',' or '}'")

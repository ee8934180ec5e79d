"""Pythonic format (Llama 3.2, Llama 4): a Python list of calls with keyword arguments, read with ``ast``.

    [get_weather(city="Paris", unit="celsius"), get_time()]

Argument values must be Python literals; each call's arguments become one JSON object. Llama 4 may wrap the
list in ``<|python_start|>`` ... ``<|python_end|>``. Output that is not such a list is content. In a stream a
call's name goes out when its ``name(`` is read and its arguments once its closing parenthesis is.
"""
from __future__ import annotations

import ast
import json
import re

from sluice.entrypoints.openai.tool_parsers.base import ParsedOutput, PartialCall, ToolParser, held_back
from sluice.entrypoints.openai.tool_parsers.json_scan import MalformedError

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"
_CALL_START = re.compile(r"\s*([A-Za-z_][\w.]*)\s*\(")


class PythonicToolParser(ToolParser):
    name = "pythonic"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        lead = text.strip()
        if not final and (not lead or PYTHON_START.startswith(lead)):
            return ParsedOutput()
        body = lead
        if lead.startswith(PYTHON_START):
            body = lead.removeprefix(PYTHON_START).removesuffix(PYTHON_END)
            body = (body if final else body[:len(body) - held_back(body, PYTHON_END)]).strip()
        if not body.startswith("["):
            return ParsedOutput(content=text if final or body else "")
        try:
            return ParsedOutput(calls=_final_calls(body) if final else _partial_calls(body))
        except (MalformedError, ValueError, SyntaxError, RecursionError):
            return ParsedOutput(content=text)


def _final_calls(body: str) -> list[PartialCall]:
    tree = ast.parse(body, mode="eval").body
    if not isinstance(tree, ast.List) or not tree.elts:
        raise MalformedError("expected a list of calls")
    return [_call(node) for node in tree.elts]


def _call(node: ast.expr) -> PartialCall:
    if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, (ast.Name, ast.Attribute)):
        raise MalformedError("expected name(keyword=value, ...)")
    arguments = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise MalformedError("**kwargs is not a literal")
        arguments[keyword.arg] = ast.literal_eval(keyword.value)
    return PartialCall(ast.unparse(node.func), json.dumps(arguments, ensure_ascii=False))


def _partial_calls(body: str) -> list[PartialCall]:
    """The calls of a list still being written: complete ones parsed, the last one by its name only."""
    calls: list[PartialCall] = []
    for start, end in _elements(body):
        if end is None:
            match = _CALL_START.match(body, start)
            if match:
                calls.append(PartialCall(match.group(1)))
            elif body[start:].strip() and not re.fullmatch(r"\s*[A-Za-z_][\w.]*\s*", body[start:]):
                raise MalformedError("expected a call")
            break
        calls.append(_call(ast.parse(body[start:end].strip(), mode="eval").body))
    return calls


def _elements(body: str) -> list[tuple[int, int | None]]:
    """Spans of the top-level elements of the list in ``body`` (end None for one still open). Strings (either
    quote, with escapes) and brackets are matched; nothing else is checked."""
    spans: list[tuple[int, int | None]] = []
    depth, index, start, quote = 0, 0, 1, ""
    while index < len(body):
        char = body[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:  # the list closed
                if body[start:index].strip():
                    spans.append((start, index))
                if body[index + 1:].strip():
                    raise MalformedError("text after the list")
                return spans
        elif char == "," and depth == 1:
            spans.append((start, index))
            start = index + 1
        index += 1
    spans.append((start, None))
    return spans

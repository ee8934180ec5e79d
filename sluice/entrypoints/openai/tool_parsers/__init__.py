"""Tool-call parsers by name (``--tool-call-parser``): each reads one model family's call format."""
from __future__ import annotations

from sluice.entrypoints.openai.tool_parsers.base import ParsedOutput, PartialCall, ToolCallStreamer, ToolParser
from sluice.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from sluice.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from sluice.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from sluice.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"--tool-call-parser {name!r} is not known; choose one of {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


__all__ = ["TOOL_PARSERS", "ParsedOutput", "PartialCall", "ToolCallStreamer", "ToolParser", "get_tool_parser"]

"""Server-sent events stay one line per event for every client line reader: text holding U+0085, U+2028 or
U+2029 (which JSON leaves raw, and str.splitlines-based readers such as httpx's iter_lines break on) arrives
whole, and parses back to the same text."""
from __future__ import annotations

import json

from httpx._decoders import LineDecoder

from sluice.entrypoints.openai.protocol import ChatCompletionStreamResponse
from sluice.entrypoints.openai.serving_engine import sse

AWKWARD_TEXT = "line\x85next\u2028sep\u2029para é 中 \U0001f600 \n\r\t"


def read_lines(stream: str) -> list[str]:
    decoder = LineDecoder()
    return [line for line in decoder.decode(stream) + decoder.flush() if line]


def chat_chunk(text: str) -> ChatCompletionStreamResponse:
    return ChatCompletionStreamResponse.model_validate(
        {"id": "chatcmpl-1", "model": "m", "choices": [{"index": 0, "delta": {"content": text}}]})


def test_a_pydantic_chunk_with_unicode_line_breaks_is_one_event_line():
    chunk = chat_chunk(AWKWARD_TEXT)
    lines = read_lines(sse(chunk) + sse({"text": AWKWARD_TEXT}))
    assert len(lines) == 2 and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][len("data: "):])["choices"][0]["delta"]["content"] == AWKWARD_TEXT
    assert json.loads(lines[1][len("data: "):])["text"] == AWKWARD_TEXT


def test_other_non_ascii_text_is_left_as_utf8():
    chunk = chat_chunk("é 中")
    assert "é 中" in sse(chunk)

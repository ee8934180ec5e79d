"""Structured outputs through `sluice serve` (engine core in its own process) with the real openai client."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.entrypoints.server_utils import RemoteServer

MESSAGES = [{"role": "user", "content": "Describe a fictional pet as JSON."}]


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: Literal[0, 2, 4]
    indoor: bool


@pytest.fixture(scope="module")
def server():
    srv = RemoteServer(None, ["--max-model-len", "256", "--num-kv-blocks", "128", "--max-num-seqs", "8"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_parse_with_a_pydantic_model_returns_the_parsed_object(client):
    completion = client.beta.chat.completions.parse(model=client.models.list().data[0].id, messages=MESSAGES,
                                                    response_format=Pet, max_tokens=120, temperature=0)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Pet), message.content


def test_completions_take_structured_outputs_and_guided_fields(server):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    bodies = [
        {"structured_outputs": {"json": schema, "disable_any_whitespace": True}},
        {"structured_outputs": {"regex": r"\d{3}-\d{4}"}},
        {"guided_choice": ["left", "right"], "guided_decoding_backend": "guidance"},
    ]
    texts = []
    for body in bodies:
        r = httpx.post(server.url("/v1/completions"), json={"prompt": "Answer:", "max_tokens": 96, "temperature": 0,
                                                          **body}, headers=server.headers(), timeout=120)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    jsonschema.validate(json.loads(texts[0]), schema)
    assert re.fullmatch(r"\d{3}-\d{4}", texts[1])
    assert texts[2] in ("left", "right")


def test_bad_schema_is_400_while_a_healthy_request_beside_it_finishes_unchanged(server, client):
    model = client.models.list().data[0].id
    healthy = dict(model=model, prompt="The sky is", max_tokens=8, temperature=0)
    alone = client.completions.create(**healthy).choices[0].text

    def bad():
        return httpx.post(server.url("/v1/chat/completions"), headers=server.headers(), timeout=120, json={
            "messages": MESSAGES, "response_format": {"type": "json_schema",
                                                      "json_schema": {"name": "x", "schema": {"type": "nope"}}}})

    with ThreadPoolExecutor(2) as pool:
        bad_future, ok_future = pool.submit(bad), pool.submit(lambda: client.completions.create(**healthy))
        r, ok = bad_future.result(), ok_future.result()
    assert r.status_code == 400 and "invalid JSON schema" in r.json()["error"]["message"]
    assert ok.choices[0].text == alone
    with pytest.raises(openai.BadRequestError, match="invalid regex"):
        client.completions.create(**healthy, extra_body={"guided_regex": "(unclosed"})

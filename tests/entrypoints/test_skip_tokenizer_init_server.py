"""`sluice serve --skip-tokenizer-init`: /v1/completions answers token-id prompts with empty text and, with
``return_token_ids``, the generated token ids (transformers' greedy tokens); everything that needs a tokenizer is
a 400 naming the field. In process (TestClient over a real engine), and once through the real command line
with the engine core in its own process."""
from __future__ import annotations

import argparse
import json
import random

import httpx
import pytest
from fastapi.testclient import TestClient

from sluice.config import EngineArgs
from sluice.engine.async_engine import AsyncLLM
from sluice.entrypoints.openai.api_server import build_app, serving_limits
from sluice.entrypoints.openai.serving_engine import ServingConfig
from sluice.metrics import PrometheusStatLogger
from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_models import hf_greedy, save_tiny_model

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """A tiny Llama with no tokenizer files; two prompts and transformers' greedy continuations."""
    path = save_tiny_model(tmp_path_factory.mktemp("serve_no_tokenizer") / "llama", tokenizer=False)
    rng = random.Random(1)
    prompts = [[rng.randrange(4, 384) for _ in range(n)] for n in (6, 21)]
    return str(path), prompts, hf_greedy(path, prompts, MAX_TOKENS)


@pytest.fixture(scope="module")
def client(bare_model):
    path, _, _ = bare_model
    engine_args = EngineArgs(model=path, skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=128,
                             num_kv_blocks=64, usage_context="server")
    llm = AsyncLLM.from_engine_args(engine_args)
    assert llm.tokenizer is None
    limits = serving_limits(llm.config, argparse.Namespace(max_n=8, generation_config="vllm"), None)
    _, guard, _ = build_app(llm, ServingConfig(["bare"], limits), PrometheusStatLogger("bare"))
    with TestClient(guard) as test_client:
        yield test_client


GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}


def test_token_id_prompts_get_transformers_greedy_token_ids_and_empty_text(client, bare_model):
    _, prompts, expected = bare_model
    r = client.post("/v1/completions", json={"prompt": prompts, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    for prompt, want, choice in zip(prompts, expected, body["choices"]):
        assert choice["text"] == "" and choice["finish_reason"] == "length"
        assert choice["token_ids"] == want and choice["prompt_token_ids"] == prompt
    assert body["usage"]["completion_tokens"] == MAX_TOKENS * len(prompts)
    plain = client.post("/v1/completions", json={"prompt": prompts[0], "max_tokens": 2}).json()["choices"][0]
    assert plain["text"] == "" and plain["token_ids"] is None  # ids only when asked for, as vLLM


def test_a_stream_carries_the_new_token_ids_in_each_chunk(client, bare_model):
    _, prompts, expected = bare_model
    r = client.post("/v1/completions", json={"prompt": prompts[1], "stream": True, **GREEDY})
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert [t for c in choices for t in c["token_ids"]] == expected[1]
    assert choices[0]["prompt_token_ids"] == prompts[1] and all(c["prompt_token_ids"] is None for c in choices[1:])
    assert "".join(c["text"] for c in choices) == ""


def test_logprob_tokens_name_their_ids(client, bare_model):
    _, prompts, expected = bare_model
    r = client.post("/v1/completions", json={"prompt": prompts[0], "logprobs": 1, **GREEDY})
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [f"token_id:{t}" for t in expected[0]]


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": "a text prompt"}, "prompt"),
    ("/v1/completions", {"prompt": [5, 6], "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ("/tokenize", {"prompt": "a text prompt"}, "prompt"),
    ("/detokenize", {"tokens": [5, 6]}, "tokens"),
])
def test_what_needs_a_tokenizer_is_a_400_naming_the_field_and_the_flag(client, route, body, param):
    r = client.post(route, json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and "--skip-tokenizer-init" in error["message"]


def test_stop_strings_need_a_tokenizer(client):
    r = client.post("/v1/completions", json={"prompt": [5, 6], "stop": ["x"], "max_tokens": 2})
    assert r.status_code == 400 and "needs a tokenizer" in r.json()["error"]["message"]


def test_sluice_serve_with_the_flag_serves_token_id_prompts(bare_model):
    path, prompts, expected = bare_model
    server = RemoteServer(path, ["--skip-tokenizer-init", "--dtype", "float32", "--max-model-len", "128",
                                 "--num-kv-blocks", "64"])
    try:
        r = httpx.post(server.url("/v1/completions"), json={"prompt": prompts[0], **GREEDY}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected[0] and r.json()["choices"][0]["text"] == ""
    finally:
        server.stop()

"""/v1/embeddings end to end: one real `sluice serve` of a tiny embedding model (a sentence-transformers
folder: the pooling runner is auto-detected) driven by the real openai client; and, in process, a
generation model's server refusing embeddings."""
from __future__ import annotations

import json

import numpy as np
import openai
import pytest
import torch
from transformers import AutoTokenizer

from tests.entrypoints.server_utils import RemoteServer
from tests.entrypoints.test_openai_server import wait_until_idle
from tests.pooling.embedding_models import hf_embeddings, save_embedding_model

MODEL = "tiny-embed"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello world", "Paged attention keeps the KV cache. " * 4]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_embedding_model(tmp_path_factory.mktemp("tiny-embed"), "qwen3", "LAST",
                                matryoshka_dimensions=[8, 16])


@pytest.fixture(scope="module")
def server(model_path):
    srv = RemoteServer(model_path, ["--served-model-name", MODEL, "--max-model-len", "128",
                                    "--max-num-batched-tokens", "16", "--num-kv-blocks", "64"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _reference(model_path, token_ids: list[list[int]]) -> list[np.ndarray]:
    return [v.numpy() for v in hf_embeddings(model_path, token_ids, "LAST", normalize=True)]


def test_float_and_base64_embeddings_match_transformers(client, server, model_path):
    token_ids = [AutoTokenizer.from_pretrained(model_path).encode(t) for t in TEXTS]
    expected = _reference(model_path, token_ids)
    as_float = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    as_base64 = client.embeddings.create(model=MODEL, input=TEXTS)  # the client asks for base64 and decodes it
    assert as_float.object == "list" and as_float.model == MODEL
    assert [d.index for d in as_float.data] == [0, 1, 2]
    for got_float, got_base64, want in zip(as_float.data, as_base64.data, expected):
        # The second request hits the prefix cache (other chunk shapes): equal up to float32 rounding.
        np.testing.assert_allclose(got_base64.embedding, got_float.embedding, atol=1e-6, rtol=0)
        np.testing.assert_allclose(got_float.embedding, want, atol=1e-5, rtol=0)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == sum(map(len, token_ids))
    raw = server.client().embeddings.with_raw_response.create(model=MODEL, input="hello", encoding_format="base64")
    payload = json.loads(raw.text)
    assert payload["id"].startswith("embd-") and isinstance(payload["data"][0]["embedding"], str)
    assert wait_until_idle(server)["sluice:kv_cache_usage_perc"] == 0.0  # every block back in the pool


def test_token_id_inputs_and_single_string(client, model_path):
    token_ids = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 60))]
    expected = _reference(model_path, token_ids)
    many = client.embeddings.create(model=MODEL, input=token_ids, encoding_format="float")
    one = client.embeddings.create(model=MODEL, input=token_ids[0], encoding_format="float")
    for got, want in zip(many.data, expected):
        np.testing.assert_allclose(got.embedding, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(one.data[0].embedding, many.data[0].embedding, atol=1e-6, rtol=0)
    assert one.usage.prompt_tokens == 5
    single = client.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert len(single.data) == 1 and len(single.data[0].embedding) == 96


def test_matryoshka_dimensions(client, model_path):
    full = torch.tensor(_reference(model_path, [[5, 6, 7]])[0])
    raw = torch.tensor(client.embeddings.create(model=MODEL, input=[5, 6, 7], encoding_format="float",
                                                extra_body={"normalize": False}).data[0].embedding)
    short = client.embeddings.create(model=MODEL, input=[5, 6, 7], dimensions=8, encoding_format="float")
    np.testing.assert_allclose(short.data[0].embedding, torch.nn.functional.normalize(raw[:8], dim=0),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(torch.nn.functional.normalize(raw, dim=0), full, atol=1e-5, rtol=0)
    with pytest.raises(openai.BadRequestError) as error:
        client.embeddings.create(model=MODEL, input="hello", dimensions=12)
    assert error.value.status_code == 400 and "supports only [8, 16]" in error.value.body["message"]
    assert error.value.body["type"] == "invalid_request_error"


def test_bad_inputs_are_400s(client):
    for bad in ([], [[]], [999999]):
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model=MODEL, input=bad)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="hello")


def test_embedding_model_refuses_generation(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
    assert "embedding model" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       stream=True)
    assert "embedding model" in error.value.body["message"]


def test_generation_model_refuses_embeddings(tmp_path):
    from fastapi.testclient import TestClient

    from sluice.config import EngineArgs
    from sluice.engine.async_engine import AsyncLLM
    from sluice.entrypoints.openai.api_server import build_app
    from sluice.entrypoints.openai.sampling import ServingLimits
    from sluice.entrypoints.openai.serving_engine import ServingConfig
    from sluice.metrics import PrometheusStatLogger
    from tests.tiny_models import save_tiny_model

    path = save_tiny_model(tmp_path / "gen", "llama")
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(path), device="cpu", max_model_len=64))
    config = ServingConfig(["gen"], ServingLimits(max_model_len=64, vocab_size=384))
    _, guard, _ = build_app(engine, config, PrometheusStatLogger("gen"))
    with TestClient(guard) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        with pytest.raises(openai.BadRequestError) as error:
            client.embeddings.create(model="gen", input="hello")
        assert "generation model" in error.value.body["message"] and error.value.body["param"] == "model"
        assert client.completions.create(model="gen", prompt="hi", max_tokens=2).choices[0].text is not None

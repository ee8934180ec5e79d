"""LoRA on the OpenAI server, through the real openai client: --lora-modules (name=path and JSON), the model
field picks an adapter, /v1/models lists adapters with their parent, and runtime load/unload with their errors;
unloading an adapter lets its running requests finish."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.entrypoints.server_utils import RemoteServer
from tests.lora.peft_adapters import save_peft_adapter
from tests.tiny_models import hf_greedy, save_tiny_model

BASE = "tiny"
PROMPT = [17, 99, 42, 250, 8, 61, 13]
MAX_TOKENS = 6
GREEDY = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-server")
    base = save_tiny_model(root / "base")
    expected = {BASE: hf_greedy(base, [PROMPT], MAX_TOKENS)[0]}
    for i, (name, rank, targets) in enumerate([("sql", 4, ["q_proj", "v_proj"]), ("chat", 8, ["o_proj", "down_proj"]),
                                               ("late", 8, ["gate_proj", "up_proj"])], start=1):
        expected[name] = save_peft_adapter(base, root / name, rank, targets, seed=i, prompts=[PROMPT],
                                           max_new_tokens=MAX_TOKENS)[0]
    save_peft_adapter(base, root / "too_big", 16, ["q_proj"], seed=7)
    server = RemoteServer(base, ["--served-model-name", BASE, "--max-model-len", "128", "--num-kv-blocks", "128",
                                 "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                                 "--lora-modules", f"sql={root / 'sql'}",
                                 json.dumps({"name": "chat", "path": str(root / "chat"), "base_model_name": BASE})],
                          env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    yield server, root, expected
    server.stop()


def _complete(client: openai.OpenAI, model: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0,
                                           extra_body=GREEDY)
    return completion.choices[0].model_extra["token_ids"]


def test_model_field_picks_the_adapter(setup):
    server, _, expected = setup
    client = server.client()
    for model in (BASE, "sql", "chat"):
        assert _complete(client, model) == expected[model], model
    with pytest.raises(openai.NotFoundError):
        _complete(client, "no-such-adapter")


def test_models_lists_adapters_with_their_parent(setup):
    server, root, _ = setup
    cards = {card.id: card for card in server.client().models.list().data}
    assert {BASE, "sql", "chat"} <= set(cards)
    assert cards["sql"].model_extra["parent"] == BASE and cards["sql"].model_extra["root"] == str(root / "sql")
    assert cards[BASE].model_extra["parent"] is None


def test_lora_requests_info_names_the_adapters(setup):
    server, _, _ = setup
    _complete(server.client(), "sql")
    text = httpx.get(server.url("/metrics"), timeout=10).text
    info = [line for line in text.splitlines() if line.startswith("sluice:lora_requests_info{")]
    assert len(info) == 1 and 'max_lora="2"' in info[0] and 'running_lora_adapters=""' in info[0]


def _post(server: RemoteServer, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url(route), json=body, timeout=30)


def test_runtime_load_and_unload_with_their_errors(setup):
    server, root, expected = setup
    client = server.client()
    loaded = _post(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(root / "late")})
    assert loaded.status_code == 200
    assert _complete(client, "late") == expected["late"]
    duplicate = _post(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(root / "sql")})
    assert duplicate.status_code == 400 and "already been loaded" in duplicate.text
    bad_path = _post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(root / "nowhere")})
    assert bad_path.status_code == 400 and "adapter_config.json" in bad_path.text
    too_big = _post(server, "/v1/load_lora_adapter", {"lora_name": "big", "lora_path": str(root / "too_big")})
    assert too_big.status_code == 400 and "max_lora_rank" in too_big.text
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "nope"}).status_code == 404
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        _complete(client, "late")
    assert "late" not in {card.id for card in client.models.list().data}


def test_unloading_lets_running_requests_finish(setup):
    server, root, expected = setup
    client = server.client()
    loaded = _post(server, "/v1/load_lora_adapter", {"lora_name": "brief", "lora_path": str(root / "sql")})
    assert loaded.status_code == 200
    stream = client.completions.create(model="brief", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0,
                                       stream=True, extra_body=GREEDY)
    chunks = [next(stream)]  # the request is running
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "brief"}).status_code == 200
    chunks += list(stream)
    assert [t for c in chunks for t in (c.choices[0].model_extra.get("token_ids") or [])] == expected["sql"]

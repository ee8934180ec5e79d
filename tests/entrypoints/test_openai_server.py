"""The OpenAI-compatible server end to end: one real `sluice serve` subprocess for the module, driven by
the real openai client (and raw httpx where the wire format itself is the point)."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_models import save_tiny_model

API_KEY = "sk-sluice-test"
MODEL = "tiny"
MAX_MODEL_LEN = 192
NO_EOS = {"ignore_eos": True}  # the random model may sample eos at any time; most tests want exact lengths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
    srv = RemoteServer(model, ["--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                               "--num-kv-blocks", "512", "--max-num-seqs", "32", "--max-n", "8",
                               "--max-request-body-bytes", "65536"], api_key=API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def wait_until_idle(server: RemoteServer, timeout: float = 30.0) -> dict[str, float]:
    """Polls /metrics until nothing runs or waits; returns that snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = server.metrics()
        idle = metrics["sluice:num_requests_running"] == 0 and metrics["sluice:num_requests_waiting"] == 0
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


# ---- completions -----------------------------------------------------------------------------------
def test_completion_reports_usage_and_length_finish(client, server):
    prompt = "The quick brown fox"
    num_prompt_tokens = httpx.post(server.url("/tokenize"), json={"prompt": prompt},
                                   headers=server.headers()).json()["count"]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, extra_body=NO_EOS)
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == num_prompt_tokens
    assert out.usage.completion_tokens == 6
    assert out.usage.total_tokens == num_prompt_tokens + 6


def test_token_id_prompt_equals_text_prompt(client, server):
    prompt = "Paged attention keeps"
    ids = httpx.post(server.url("/tokenize"), json={"prompt": prompt}, headers=server.headers()).json()["tokens"]
    by_text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body=NO_EOS)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, extra_body=NO_EOS)
    assert by_text.choices[0].text == by_ids.choices[0].text


def test_batched_prompts_with_n_give_prompt_major_choice_indices(client):
    out = client.completions.create(model=MODEL, prompt=["The quick", "def main"], n=3, max_tokens=4,
                                    temperature=1.0, seed=7, extra_body=NO_EOS)
    assert sorted(c.index for c in out.choices) == list(range(6))
    assert out.usage.completion_tokens == 6 * 4


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_text_equals_non_streamed_text_for_the_same_seed(client, endpoint):
    kwargs = dict(model=MODEL, max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, extra_body=NO_EOS)
    if endpoint == "completions":
        full = client.completions.create(prompt="Continuous batching", **kwargs).choices[0].text
        chunks = client.completions.create(prompt="Continuous batching", stream=True, **kwargs)
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    else:
        messages = [{"role": "user", "content": "Say something."}]
        full = client.chat.completions.create(messages=messages, **kwargs).choices[0].message.content
        chunks = list(client.chat.completions.create(messages=messages, stream=True, **kwargs))
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full and len(full) > 0


def test_stream_usage_arrives_in_a_final_chunk_without_choices(client):
    chunks = list(client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=NO_EOS))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"


def test_stop_string_ends_the_text_before_it(client):
    kwargs = dict(model=MODEL, prompt="The quick brown", max_tokens=24, temperature=0, extra_body=NO_EOS)
    text = client.completions.create(**kwargs).choices[0].text
    start = next(i for i in range(1, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].strip())
    stop = text[start:start + 2]
    out = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop  # vLLM's extra field
    assert out.text == text[:text.index(stop)]
    kept = client.completions.create(stop=[stop], **{**kwargs, "extra_body": {**NO_EOS,
                                     "include_stop_str_in_output": True}}).choices[0]
    assert kept.text == text[:text.index(stop)] + stop


def test_completion_logprobs_in_openai_shape(client):
    out = client.completions.create(model=MODEL, prompt="The lazy dog", max_tokens=4, temperature=0, logprobs=3,
                                    extra_body=NO_EOS).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == 4 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == out.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(x <= 0.0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    # greedy: the sampled token is the most likely one
    assert all(max(top.values()) == pytest.approx(x) for top, x in zip(lp.top_logprobs, lp.token_logprobs))


def test_echo_puts_the_prompt_before_the_completion(client):
    plain = client.completions.create(model=MODEL, prompt="The lazy dog", max_tokens=4, temperature=0,
                                      extra_body=NO_EOS).choices[0].text
    echoed = client.completions.create(model=MODEL, prompt="The lazy dog", max_tokens=4, temperature=0,
                                       echo=True, extra_body=NO_EOS).choices[0].text
    assert echoed == "The lazy dog" + plain


def test_echo_with_logprobs_gives_prompt_logprobs_or_says_it_cannot(server):
    r = httpx.post(server.url("/v1/completions"), headers=server.headers(), json={
        "model": MODEL, "prompt": "The lazy dog", "max_tokens": 2, "echo": True, "logprobs": 1})
    if r.status_code == 200:  # once the engine produces prompt logprobs
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["token_logprobs"][0] is None and len(lp["tokens"]) > 2
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


# ---- chat -----------------------------------------------------------------------------------------
def test_chat_completion_with_n_and_logprobs(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    num_prompt = httpx.post(server.url("/tokenize"), json={"messages": messages},
                            headers=server.headers()).json()["count"]
    out = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_completion_tokens=5,
                                         logprobs=True, top_logprobs=2, seed=3, extra_body=NO_EOS)
    assert out.object == "chat.completion" and [c.index for c in out.choices] == [0, 1]
    assert out.usage.prompt_tokens == num_prompt and out.usage.completion_tokens == 10
    for choice in out.choices:
        assert choice.message.role == "assistant" and choice.finish_reason == "length"
        assert len(choice.logprobs.content) == 5
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in choice.logprobs.content)


def test_chat_stream_with_n_finishes_every_choice_once(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3, max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_body=NO_EOS))
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]
    assert chunks[-1].usage.completion_tokens == 12


# ---- models, tokenizer, health ---------------------------------------------------------------------
def test_models_lists_the_served_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_tokenize_then_detokenize_round_trips(server):
    text = "héllo wörld 12345"
    tokens = httpx.post(server.url("/tokenize"), json={"prompt": text, "add_special_tokens": False},
                        headers=server.headers()).json()["tokens"]
    back = httpx.post(server.url("/detokenize"), json={"tokens": tokens}, headers=server.headers()).json()
    assert back["prompt"] == text


def test_health_version_and_metrics_need_no_key(server):
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/version")).json()["version"]
    assert httpx.get(server.url("/metrics")).status_code == 200


# ---- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_missing_or_wrong_api_key_is_401(server, headers):
    r = httpx.post(server.url("/v1/completions"), json={"prompt": "x", "max_tokens": 1}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_openai_client_with_wrong_key_raises_authentication_error(server):
    bad = openai.OpenAI(base_url=server.url("/v1"), api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"


def test_prompt_over_max_model_len_is_400_naming_both_lengths(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[5] * (MAX_MODEL_LEN + 8), max_tokens=1)
    assert str(MAX_MODEL_LEN) in e.value.message and str(MAX_MODEL_LEN + 8) in e.value.message


BAD_BODIES = [  # (route, body, status, text the message must contain)
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "maximum context length"),
    ("/v1/completions", {"prompt": "x", "n": 10**6}, 400, "n must be between"),
    ("/v1/completions", {"prompt": "x", "logprobs": 10**9}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "seed": 2**80}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": "two"}, 400, "n"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "'suffix' is not supported"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "priority": 5}, 400, "priority"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "out of range"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     '"auto" tool choice requires --enable-auto-tool-choice'),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}},
     400, "invalid JSON schema"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "(ab"}, 400, "invalid regex"),
    ("/v1/completions", {"prompt": "x", "guided_choice": ["a"], "guided_regex": "a"}, 400, "exactly one of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs requires logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
]


@pytest.mark.parametrize("route,body,status,needle", BAD_BODIES, ids=[f"{r}:{list(b)[-1]}" for r, b, *_ in BAD_BODIES])
def test_bad_requests_get_openai_error_json_not_500(server, route, body, status, needle):
    r = httpx.post(server.url(route), json={"model": MODEL, **body}, headers=server.headers(), timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert needle in error["message"]


def test_malformed_json_is_400(server):
    r = httpx.post(server.url("/v1/completions"), content=b'{"prompt": "x",', headers={
        **server.headers(), "content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_oversized_body_is_413(server):
    r = httpx.post(server.url("/v1/completions"), json={"model": MODEL, "prompt": "x" * 70000},
                   headers=server.headers())
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_unknown_route_is_404_json(server):
    r = httpx.get(server.url("/v1/nothing"), headers=server.headers())
    assert r.status_code == 404 and "error" in r.json()


# ---- metrics and load ------------------------------------------------------------------------------
def test_metrics_parse_and_counters_move(client, server):
    before = wait_until_idle(server)
    out = client.completions.create(model=MODEL, prompt="Paged attention", max_tokens=7, temperature=0,
                                    extra_body=NO_EOS)
    after = wait_until_idle(server)
    assert after["sluice:prompt_tokens_total"] - before["sluice:prompt_tokens_total"] == out.usage.prompt_tokens
    assert after["sluice:generation_tokens_total"] - before["sluice:generation_tokens_total"] == 7
    key = "sluice:request_success_total[finished_reason=length]"
    assert after[key] - before[key] == 1
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        name = f"sluice:{histogram}_count"
        assert after[name] - before[name] == 1
    assert after["sluice:inter_token_latency_seconds_count"] - before["sluice:inter_token_latency_seconds_count"] == 6
    assert after["sluice:prefix_cache_queries_total"] > before["sluice:prefix_cache_queries_total"]
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                  "prefix_cache_hits_total"):
        assert f"sluice:{gauge}" in after


def test_64_streaming_clients_with_a_quarter_disconnecting(server):
    async_client = server.async_client()
    finishing_tokens, abandoned_tokens = 16, 150

    async def finisher(i: int) -> tuple[str, int, str | None]:
        stream = await async_client.completions.create(
            model=MODEL, prompt=f"client {i} says", max_tokens=finishing_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body=NO_EOS)
        text, usage, finish = "", 0, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage, finish

    async def deserter(i: int) -> int:
        stream = await async_client.completions.create(
            model=MODEL, prompt=f"client {i} leaves", max_tokens=abandoned_tokens, stream=True, extra_body=NO_EOS)
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.close()  # drops the connection mid-stream
        return seen

    async def run_all():
        return await asyncio.gather(*(deserter(i) if i % 4 == 0 else finisher(i) for i in range(64)))

    before = wait_until_idle(server)
    results = asyncio.run(run_all())
    finished = [r for i, r in enumerate(results) if i % 4]
    assert all(usage == finishing_tokens and finish == "length" for _, usage, finish in finished)
    assert httpx.get(server.url("/health")).status_code == 200
    after = wait_until_idle(server)
    assert after["sluice:num_requests_running"] == 0 and after["sluice:kv_cache_usage_perc"] == 0.0
    generated = after["sluice:generation_tokens_total"] - before["sluice:generation_tokens_total"]
    # the 16 deserters were aborted long before their 150 tokens (no blocks leaked, no work wasted)
    assert generated < 48 * finishing_tokens + 16 * abandoned_tokens / 2


def test_non_streaming_client_that_gives_up_aborts_its_request(server):
    before = wait_until_idle(server)
    # 180 tokens take at least 180 engine steps (over 0.18 s even for this tiny model): the client gives up first.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url("/v1/completions"), headers=server.headers(), timeout=0.1,
                   json={"model": MODEL, "prompt": "long", "n": 8, "max_tokens": 180, "ignore_eos": True})
    after = wait_until_idle(server)
    assert after["sluice:kv_cache_usage_perc"] == 0.0
    assert after["sluice:generation_tokens_total"] - before["sluice:generation_tokens_total"] < 8 * 180 / 2
    assert httpx.get(server.url("/health")).status_code == 200

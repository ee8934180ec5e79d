"""Issue #25's defects as regressions against a real `sluice serve`, in both process modes (one server per
mode for the whole module): each bad request gets its 4xx in OpenAI's shape, the next normal request succeeds
and /health stays 200. The split server refuses request chat templates (the default); the in-process one runs
with --trust-request-chat-template. Also GuideLLM's streaming shape, the vLLM routes and flags new users
reach for, and a bounded hypothesis fuzz run (fixed seed and example count) on the split server."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from sluice.tokenizer import CHAT_TEMPLATE_TIMEOUT_S
from tests.entrypoints.server_utils import REPO_ROOT, RemoteServer
from tests.tiny_models import save_tiny_model

API_KEY = "sk-hardening"
MODEL = "tiny"
SURROGATE = "\ud800"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module", params=["split", "no-split"])
def server(request, model_path):
    split = request.param == "split"
    extra = ["--served-model-name", MODEL, "--max-model-len", "192", "--num-kv-blocks", "512", "--max-num-seqs", "32",
             "--max-num-queued-reqs", "4", "--max-request-body-bytes", "262144"]
    extra += ["--process-split"] if split else ["--no-process-split", "--trust-request-chat-template"]
    srv = RemoteServer(model_path, extra, api_key=API_KEY, model_as_flag=not split)
    srv.mode = request.param
    yield srv
    srv.stop()


def post(server: RemoteServer, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = json.dumps(body, ensure_ascii=True)  # lone surrogates travel as \ud800 escapes, as a client sends them
    return httpx.post(server.url(path), content=content, timeout=60,
                      headers={"content-type": "application/json", **server.headers(), **(headers or {})})


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_still_serving(server: RemoteServer) -> None:
    assert httpx.get(server.url("/health"), timeout=10).status_code == 200
    r = post(server, "/v1/completions", {"prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


# ---- defect 1: one request killed the server ----------------------------------------------------------------
def test_lone_surrogate_bad_word_is_a_400_and_the_server_lives(server):
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "bad_words": [SURROGATE]})
    assert "surrogate" in assert_openai_error(r, 400)["message"]
    assert_still_serving(server)


def test_chat_template_kwargs_that_change_the_renderer_are_a_400(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for kwargs in ({"tokenize": False}, {"chat_template": "x"}, {"not an identifier": 1}):
        r = post(server, "/v1/chat/completions", {**body, "chat_template_kwargs": kwargs})
        assert "chat_template_kwargs" in assert_openai_error(r, 400)["message"]
    r = post(server, "/v1/chat/completions", {**body, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text  # a plain template variable is fine
    assert_still_serving(server)


# ---- defect 2: chat_template read any file ------------------------------------------------------------------
def test_request_chat_template_is_text_never_a_path_and_needs_trust(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "chat_template": "/etc/passwd"}
    r = post(server, "/v1/chat/completions", body)
    if server.mode == "split":  # the default: refused, whatever the template
        assert "--trust-request-chat-template" in assert_openai_error(r, 400, "chat_template")["message"]
        missing = post(server, "/v1/chat/completions", {**body, "chat_template": "/no/such/file"})
        assert missing.json() == r.json()  # no probing for files either
    else:  # trusted: the text is rendered as a template, so the prompt is the path's own characters
        assert r.status_code == 200, r.text
        expected = post(server, "/tokenize", {"prompt": "/etc/passwd", "add_special_tokens": False}).json()["count"]
        assert r.json()["usage"]["prompt_tokens"] == expected
    assert_still_serving(server)


@pytest.mark.parametrize("template, seconds", [
    ("{% set s = 'x' * 300000000 %}{{ s }}", 2.0),  # refused before the string is built
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", 2.0),  # more than max_prompt_chars: stops early
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     CHAT_TEMPLATE_TIMEOUT_S + 3.0),  # stops at the render deadline
])
def test_a_request_template_is_bounded_in_time_and_size(server, template, seconds):
    if server.mode == "split":
        pytest.skip("request templates need --trust-request-chat-template")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "chat_template": template}
    start = time.monotonic()
    error = assert_openai_error(post(server, "/v1/chat/completions", body), 400, "chat_template")
    assert time.monotonic() - start < seconds and "chat_template" in error["message"], error
    assert_still_serving(server)


def test_a_slow_template_does_not_stall_other_requests(server):
    """Templates render in processes of their own: one looping until its deadline leaves the API server free."""
    if server.mode == "split":
        pytest.skip("request templates need --trust-request-chat-template")
    slow = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "chat_template":
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"}
    finished: dict[str, float] = {}

    def send_slow() -> None:
        assert_openai_error(post(server, "/v1/chat/completions", slow), 400, "chat_template")
        finished["slow"] = time.monotonic()

    thread = threading.Thread(target=send_slow)
    start = time.monotonic()
    thread.start()
    time.sleep(0.5)  # the slow render is under way
    for _ in range(3):
        r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}],
                                                  "max_tokens": 4, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finished["normal"] = time.monotonic()
    thread.join()
    assert finished["normal"] < finished["slow"], "the normal chats waited for the slow render"
    assert finished["normal"] - start < CHAT_TEMPLATE_TIMEOUT_S - 1.0


# ---- defect 3: inputs without bounds ------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, param", [
    ("stop", ["s"] * 65, "stop"),
    ("bad_words", ["w"] * 257, "bad_words"),
    ("logit_bias", {str(i): 1.0 for i in range(1025)}, "logit_bias"),
    ("prompt", ["a"] * 257, "prompt"),
    ("prompt", "word " * 40000, "prompt"),  # more characters than 192 tokens can spell: refused before tokenizing
])
def test_oversized_inputs_are_refused_before_the_work(server, field, value, param):
    body = {"prompt": "hi", "max_tokens": 1, field: value}
    assert_openai_error(post(server, "/v1/completions", body), 400, param)


def test_a_request_prompts_all_start_together(server):
    r = post(server, "/v1/completions", {"prompt": ["a b"] * 30, "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200 and len(r.json()["choices"]) == 30


def test_oversized_body_is_413(server):
    assert_openai_error(post(server, "/v1/completions", {"prompt": "x" * 300000}), 413)


# ---- defect 4: lone surrogates ------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "a" + SURROGATE, "max_tokens": 1}),
    ("/tokenize", {"prompt": SURROGATE}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {SURROGATE: 1}}),
])
def test_lone_surrogates_are_a_400_on_a_kept_alive_connection(server, path, body):
    with httpx.Client(headers=server.headers(), timeout=30) as client:
        r = client.post(server.url(path), content=json.dumps(body), headers={"content-type": "application/json"})
        assert_openai_error(r, 400)
        assert client.get(server.url("/health")).status_code == 200  # the same connection still works


# ---- defect 5: admission control ----------------------------------------------------------------------------
def test_simultaneous_requests_within_free_slots_are_all_admitted(server):
    async def burst():
        async with server.async_client() as client:
            return await asyncio.gather(*(client.completions.create(
                model=MODEL, prompt="hi", max_tokens=4, extra_body={"ignore_eos": True}) for _ in range(24)),
                return_exceptions=True)
    results = asyncio.run(burst())  # 24 <= 32 free slots, --max-num-queued-reqs 4: nothing truly waits
    assert all(not isinstance(r, Exception) for r in results), results


# ---- defect 6: the small ones -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["4", True, 4.0])
def test_numbers_are_strictly_typed(server, value):
    assert_openai_error(post(server, "/v1/completions", {"prompt": "hi", "max_tokens": value}), 400, "max_tokens")


def test_405_names_the_allowed_methods(server):
    r = httpx.get(server.url("/v1/completions"), headers=server.headers())
    assert_openai_error(r, 405)
    assert "POST" in r.headers["allow"]


def test_bearer_scheme_is_case_insensitive_and_a_wrong_key_is_401(server):
    ok = post(server, "/tokenize", {"prompt": "hi"}, headers={"Authorization": f"bearer {API_KEY}"})
    assert ok.status_code == 200
    assert_openai_error(post(server, "/tokenize", {"prompt": "hi"}, headers={"Authorization": "Bearer nope"}), 401)


def test_empty_api_key_is_refused_at_start():
    result = subprocess.run([sys.executable, "-m", "sluice.entrypoints.cli", "serve", "--api-key", ""],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--api-key" in result.stderr and "empty" in result.stderr


# ---- what vLLM users hit ------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_guidellm_stream_shape_gets_usage_in_every_chunk(server, endpoint):
    body = {"model": MODEL, "max_tokens": 6, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "hi"}]}
    else:
        path, body = "/v1/completions", {**body, "prompt": "hello there"}
    with httpx.stream("POST", server.url(path), json=body, headers=server.headers(), timeout=60) as r:
        assert r.status_code == 200
        lines = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    usages = [c["usage"] for c in chunks]
    assert all(u is not None for u in usages)
    completion_tokens = [u["completion_tokens"] for u in usages]
    assert completion_tokens == sorted(completion_tokens) and completion_tokens[-1] == 6
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)


def test_models_retrieve_ping_and_docs(server):
    client = server.client()
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert httpx.get(server.url("/ping")).status_code == 200
    assert httpx.post(server.url("/ping")).status_code == 200
    assert httpx.get(server.url("/docs")).status_code == 200


# ---- the fuzzer -----------------------------------------------------------------------------------------------
_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                  st.sampled_from(["\ud800", "a\udfffb", "\x00", "{{ 7 * 7 }}", "/etc/passwd", "🙂" * 5]))
_json = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                     max_leaves=12)
_fields = {
    "/v1/completions": ["prompt", "max_tokens", "n", "temperature", "top_p", "top_k", "stop", "logit_bias",
                        "bad_words", "logprobs", "echo", "stream", "stream_options", "seed", "min_tokens"],
    "/v1/chat/completions": ["messages", "max_tokens", "chat_template_kwargs", "chat_template", "top_logprobs",
                             "logprobs", "stop", "stream", "response_format", "n"],
    "/tokenize": ["prompt", "messages", "add_special_tokens"],
    "/detokenize": ["tokens"],
}
_valid = {"/v1/completions": {"prompt": "hi", "max_tokens": 2},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
          "/tokenize": {"prompt": "hi"}, "/detokenize": {"tokens": [1, 2]}}


@st.composite
def _requests(draw):
    path = draw(st.sampled_from(sorted(_fields)))
    body = dict(_valid[path])
    for name in draw(st.lists(st.sampled_from(_fields[path]), max_size=3, unique=True)):
        body[name] = draw(_json)
    if draw(st.booleans()):  # deep nesting
        body[draw(st.sampled_from(_fields[path]))] = json.loads("[" * 300 + "]" * 300)
    return path, body


def test_fuzzed_requests_never_get_a_5xx_or_a_non_openai_error(server):
    if server.mode != "split":
        pytest.skip("one process mode is enough for the fuzzer")
    seen: list[int] = []

    @seed(25)
    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(_requests())
    def check(request):
        path, body = request
        text = json.dumps(body, ensure_ascii=True, allow_nan=True)
        r = httpx.post(server.url(path), content=text, headers={"content-type": "application/json",
                                                                 **server.headers()}, timeout=60)
        seen.append(r.status_code)
        assert r.status_code < 500, (path, text[:500], r.text)
        if r.status_code >= 400:
            assert_openai_error(r, r.status_code)
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")

    check()
    assert 200 in seen and 400 in seen
    assert_still_serving(server)


def test_generation_config_gives_defaults_for_fields_a_request_leaves_out(tmp_path):
    from sluice.entrypoints.openai.protocol import CompletionRequest
    from sluice.entrypoints.openai.sampling import ServingLimits, build_sampling_params, generation_config_defaults
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "top_p": 0.8, "do_sample": True}))
    defaults = generation_config_defaults("auto", str(tmp_path))
    assert defaults == {"temperature": 0.3, "top_p": 0.8}
    assert generation_config_defaults("vllm", str(tmp_path)) == {}
    limits = ServingLimits(max_model_len=64, vocab_size=100, sampling_defaults=defaults)
    params = build_sampling_params(CompletionRequest(prompt="hi", top_p=0.5), max_tokens=4, logprobs=None,
                                   prompt_logprobs=None, limits=limits)
    assert (params.temperature, params.top_p) == (0.3, 0.5)

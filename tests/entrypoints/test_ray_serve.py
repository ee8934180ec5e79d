"""sluice on Ray Serve (sluice/ray_serve.py), on a local Ray instance this module starts and stops (loopback only).

Two engine replicas of the default model answer the real `openai` client, streamed and not; the prompt text the
prefix router matches is what requests share; killing one replica's actor under load loses no request that had
not started streaming (the ingress retries it on the other replica), and Serve brings the replica back.
"""
from __future__ import annotations

import threading
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import openai  # noqa: E402

from sluice.ray_serve import RoutedRequest, _parse, build_app, routing_text  # noqa: E402
from tests.entrypoints.server_utils import free_port  # noqa: E402

APP = "sluice"


def test_routing_text_is_the_prompt_or_the_chat_in_order():
    assert routing_text("completions", {"prompt": "You are a tutor. Q: why?"}) == "You are a tutor. Q: why?"
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert routing_text("chat", chat) == "system:Be brief.\nuser:Hi\n"
    assert RoutedRequest("p", "completions", {}).prompt == "p"  # the attribute Serve's prefix router reads
    assert [_parse(v) for v in ("2", "0.5", "true", "none", "cpu")] == [2, 0.5, True, None, "cpu"]


def test_unknown_arguments_are_refused_before_anything_starts():
    with pytest.raises(ValueError, match="unknown arguments: max_replica"):
        build_app({"model": None, "max_replica": "2"})


@pytest.fixture(scope="module")
def app_url():
    ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": None, "device": "cpu", "max_model_len": "512", "num_kv_blocks": "128",
                             "min_replicas": "2", "max_replicas": "2", "num_cpus": "1",
                             "health_check_period_s": "1", "cpu_threads": "1"}), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
    assert not ray.is_initialized()


def engine_replicas() -> list[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in names if "sluice-engine" in a["name"] and a["name"].startswith("SERVE_REPLICA"))


def running_engine_replicas() -> int:
    deployment = serve.status().applications[APP].deployments[f"{APP}-engine"]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_two_replicas_answer_stream_and_survive_a_killed_replica(app_url):
    client = openai.OpenAI(base_url=app_url + "/v1", api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6,
                                           temperature=0)
    assert completion.choices[0].finish_reason in ("length", "stop") and completion.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}],
                                                 max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and len([c for c in chunks if c.choices]) > 2 and 0 < chunks[-1].usage.completion_tokens <= 6
    with pytest.raises(openai.BadRequestError, match="parameter 'best_of_all' is not supported"):
        client.completions.create(model=model, prompt="x", max_tokens=1, extra_body={"best_of_all": 2})
    assert len(engine_replicas()) == 2 and running_engine_replicas() == 2

    # Load: non-streamed requests (their first byte is the whole answer), each on its own connection.
    results: list[object] = []

    def one(i: int) -> None:
        try:
            r = client.completions.create(model=model, prompt=f"Story {i}: once upon a time", max_tokens=24,
                                          temperature=0, extra_body={"ignore_eos": True})
            results.append(r.usage.completion_tokens)
        except Exception as e:  # noqa: BLE001 - the assertion below names it
            results.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the requests are in the replicas now
    victim = engine_replicas()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(120)
    assert results == [24] * 8, results

    # The survivor answers at once; Serve replaces the killed replica.
    assert client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0).choices
    deadline = time.monotonic() + 120
    while not (running_engine_replicas() == 2 and victim not in engine_replicas()):
        assert time.monotonic() < deadline, serve.status()
        time.sleep(0.5)
    assert client.completions.create(model=model, prompt="Hello again", max_tokens=2, temperature=0).choices

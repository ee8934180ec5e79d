"""`sluice serve --api-server-count 2`: two API server processes on one port in front of one engine core.

The engine core routes each request's outputs to the API server that sent it (ClientRouter, checked on its
own first); end to end, concurrent streams over many connections all complete with the right text, both
API servers answer some of them (a response id names its API server), /metrics adds both up (and shows the
core's scheduler series), SIGTERM drains both and exits 0, and a killed core turns /health 503 and makes the
server exit 1.
"""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from sluice.core.interface import EngineCoreOutput
from sluice.engine.core_proc import ClientRouter
from sluice.entrypoints.cli import main
from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_models import save_tiny_model

POOL_FLAGS = ["--api-server-count", "2", "--max-model-len", "256", "--num-kv-blocks", "128"]


# ---- the core's side: who gets what -----------------------------------------------------------------------
def test_router_sends_each_client_its_own_outputs_and_leaves_idle_clients_alone():
    router = ClientRouter(num_clients=3)
    router.add("a", 0)
    router.add("b", 1)
    outputs = [EngineCoreOutput("a", [5]), EngineCoreOutput("b", [6], finish_reason="length")]
    assert router.route(outputs, senders=set()) == [(0, outputs[:1]), (1, outputs[1:])]
    # b finished, so client 1 has nothing in the core; client 2 hears only after it sent something.
    assert router.route([EngineCoreOutput("a", [7])], senders={2}) == [(0, [EngineCoreOutput("a", [7])]), (2, [])]
    router.forget(["a"])  # an abort
    assert router.route([], senders=set()) == []
    router.add("c", 2)
    assert router.close(2) == ["c"] and router.route([], senders={2}) == []  # a closed client hears nothing


def test_several_api_servers_need_the_process_split(capsys):
    assert main(["serve", "--api-server-count", "2", "--no-process-split"]) == 1
    assert "--api-server-count 2 needs the engine core in its own process" in capsys.readouterr().err


# ---- end to end ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("pool") / "tiny")


class Stream(threading.Thread):
    """One streamed greedy completion on its own connection; keeps the response id, text and usage."""

    def __init__(self, server: RemoteServer, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.server, self.max_tokens = server, max_tokens
        self.started = threading.Event()
        self.ids: set[str] = set()
        self.text, self.completion_tokens, self.errors = "", None, []

    def run(self) -> None:
        body = {"prompt": "The quick brown fox", "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", self.server.url("/v1/completions"), json=body, timeout=120) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    self.errors.append(event["error"])
                    continue
                self.ids.add(event["id"])
                self.text += "".join(choice["text"] for choice in event["choices"])
                if event.get("usage"):
                    self.completion_tokens = event["usage"]["completion_tokens"]
                self.started.set()


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def api_server_index(response_id: str) -> int:
    return int(re.fullmatch(r"cmpl-(\d+)-[0-9a-f]{32}", response_id).group(1))


def test_two_api_servers_share_the_port_and_the_core_and_drain_on_sigterm(model_path):
    server = RemoteServer(model_path, [*POOL_FLAGS, "--shutdown-timeout", "60"])
    try:
        expected = httpx.post(server.url("/v1/completions"), timeout=60, json={
            "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True}).json()
        streams = [Stream(server, max_tokens=24) for _ in range(16)]  # 16 connections: the kernel spreads them
        for stream in streams:
            stream.start()
        for stream in streams:
            stream.join(120)
        assert all(not s.errors and s.completion_tokens == 24 for s in streams)
        assert {s.text for s in streams} == {expected["choices"][0]["text"]}
        indices = {api_server_index(i) for s in streams for i in s.ids} | {api_server_index(expected["id"])}
        assert indices == {0, 1}  # both API servers served some of them (each id is one of a single stream)
        metrics = server.metrics()  # either API server reports both, and the core's own series
        assert metrics["sluice:request_success_total[finished_reason=length]"] == 17
        assert metrics["sluice:generation_tokens_total"] == 17 * 24
        assert metrics["sluice:num_requests_running"] == metrics["sluice:num_requests_waiting"] == 0
        assert metrics["sluice:kv_cache_usage_perc"] == 0 and "sluice:prefix_cache_queries_total" in metrics

        in_flight = [Stream(server, max_tokens=200) for _ in range(6)]
        for stream in in_flight:
            stream.start()
        assert all(stream.started.wait(60) for stream in in_flight)
        server.send_signal(signal.SIGTERM)
        for stream in in_flight:
            stream.join(120)
        assert [s.completion_tokens for s in in_flight] == [200] * 6 and not any(s.errors for s in in_flight)
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_killed_engine_core_turns_every_api_server_503_and_the_server_exits_1(model_path):
    server = RemoteServer(model_path, POOL_FLAGS)
    try:
        # /health answered, but maybe by one of them: wait until both serve (a core killed earlier is a failed start).
        assert wait_for(lambda: all(f"server[api-server-{i}]: serving" in server.log() for i in (0, 1)))
        core_pid = int(re.search(r"engine core in process (\d+)", server.log()).group(1))
        os.kill(core_pid, signal.SIGKILL)
        killed = time.monotonic()
        statuses = []  # (seconds since the kill, status)
        while server.proc.poll() is None:
            try:  # a new connection each time: the kernel picks either API server
                status = httpx.get(server.url("/health"), timeout=1).status_code
                statuses.append((time.monotonic() - killed, status))
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        # An idle API server looks at the core every 0.5 s (later on a loaded machine), then answers 503 for a
        # second before it exits: the last 200 comes soon after the kill, and only 503s follow it.
        last_ok = max((i for i, (_, status) in enumerate(statuses) if status == 200), default=-1)
        assert last_ok < 0 or statuses[last_ok][0] < 2.0, statuses
        assert all(status == 503 for _, status in statuses[last_ok + 1:]) and len(statuses) - last_ok > 5, statuses
        assert server.proc.wait(30) == 1
        log = server.log()
        assert "server[api-server-0]: the engine died" in log and "server[api-server-1]: the engine died" in log
    finally:
        server.stop()

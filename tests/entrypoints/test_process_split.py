"""The engine core in its own process: same outputs as in-process, aborts free KV blocks, and a killed core
turns /health 503 and makes the server exit non-zero instead of hanging."""
from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest

from sluice.config import EngineArgs
from sluice.engine.core_client import MPClient
from sluice.engine.errors import EngineCoreDeadError
from sluice.engine.llm_engine import LLMEngine
from sluice.sampling_params import SamplingParams
from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("split") / "tiny"))


def _run(engine: LLMEngine) -> dict[str, list[list[int]]]:
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = [c.token_ids for c in output.outputs]
    return finished


def test_split_engine_matches_in_process_engine_and_frees_aborted_blocks(tiny_model):
    args = dict(model=tiny_model, device="cpu", num_kv_blocks=64)
    requests = [("greedy", "The quick brown fox", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
                ("seeded-n2", [5, 6, 7, 8], SamplingParams(max_tokens=6, n=2, seed=11, ignore_eos=True))]
    local = LLMEngine.from_engine_args(EngineArgs(**args))
    for request_id, prompt, params in requests:
        local.add_request(request_id, prompt, params)
    expected = _run(local)
    split = LLMEngine.from_engine_args(EngineArgs(**args), process_split=True)
    client = split.engine_core
    try:
        assert isinstance(client, MPClient) and client.process.pid != os.getpid()
        assert split.config.num_kv_tokens == 64 * 16 and client.config == local.config  # one resolved config
        for request_id, prompt, params in requests:
            split.add_request(request_id, prompt, params)
        split.add_request("aborted", [9] * 40, SamplingParams(max_tokens=400, ignore_eos=True))
        split.step()
        split.abort_request("aborted")
        assert _run(split) == expected
        split.step()  # with nothing in flight, waits until the core has applied the abort
        stats = client.make_stats()
        assert (stats.num_running_reqs, stats.num_waiting_reqs, stats.kv_cache_usage) == (0, 0, 0.0)
        client.process.kill()
        client.process.join(10)
        with pytest.raises(EngineCoreDeadError, match="exit code"):
            split.add_request("late", [5], SamplingParams(max_tokens=1))
    finally:
        split.shutdown()


def test_killed_engine_core_turns_health_503_and_server_exits_with_an_error(tiny_model):
    server = RemoteServer(tiny_model, ["--process-split", "--num-kv-blocks", "128"])
    try:
        core_pid = int(re.search(r"engine core in process (\d+)", server.log()).group(1))
        with httpx.stream("POST", server.url("/v1/completions"), timeout=30,
                          json={"model": tiny_model, "prompt": "The quick", "max_tokens": 400, "ignore_eos": True,
                                "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # the stream is running
            os.kill(core_pid, signal.SIGKILL)
            rest = "\n".join(lines)
        assert '"error"' in rest  # the in-flight stream ends with an error event, not silence
        statuses = []
        deadline = time.monotonic() + 10
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(server.url("/health"), timeout=1).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        assert 503 in statuses and 200 not in statuses
        assert server.proc.wait(15) == 1
        assert "the engine died" in server.log()
    finally:
        server.stop()


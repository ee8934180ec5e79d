"""`--data-parallel-size 2`: two engine cores behind the API servers, requests routed by prompt prefix and load.

The router on its own first (consistent hashing of the first prompt block, the overload and full-KV escapes, each
core's devices); then a real server of the default model with two cores and two API servers: every request is
answered, both cores take a share, requests that share a prefix find it in their core's prefix cache (per-core
hit counters in the one /metrics), and SIGTERM stops it all with exit 0.
"""
from __future__ import annotations

import os
import random
import signal
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from sluice.core.request import Request
from sluice.engine.dp_client import BALANCE_ABS_THRESHOLD, DPClient, PrefixRouter, core_env
from sluice.entrypoints.cli import main
from sluice.sampling_params import SamplingParams
from sluice.stats import SchedulerStats
from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_models import save_tiny_model

BLOCK = 16


def request(prompt_token_ids: list[int], request_id: str = "r") -> Request:
    return Request(request_id, prompt_token_ids, SamplingParams(max_tokens=1))


# ---- the router ------------------------------------------------------------------------------------------------
def test_requests_sharing_the_first_block_go_to_one_core_and_prefixes_spread_over_all():
    router = PrefixRouter(num_cores=2, block_size=BLOCK)
    rng = random.Random(0)
    prefixes = [[rng.randrange(50_000) for _ in range(BLOCK)] for _ in range(200)]
    for prefix in prefixes[:20]:
        cores = {router.affinity(request(prefix + [rng.randrange(50_000) for _ in range(rng.randrange(40))]))
                 for _ in range(5)}
        assert len(cores) == 1
    share = sum(router.affinity(request(p)) for p in prefixes) / len(prefixes)
    assert 0.35 < share < 0.65


def test_a_third_core_takes_prefixes_only_from_the_others_not_between_them():
    two, three = PrefixRouter(2, BLOCK), PrefixRouter(3, BLOCK)
    rng = random.Random(1)
    prompts = [[rng.randrange(50_000) for _ in range(BLOCK)] for _ in range(300)]
    moved = [(two.affinity(request(p)), three.affinity(request(p))) for p in prompts]
    assert all(new == old or new == 2 for old, new in moved)  # consistent hashing: nothing moves between 0 and 1
    assert 0.2 < sum(new == 2 for _, new in moved) / len(moved) < 0.5


def test_an_overloaded_or_full_prefix_core_is_passed_over_for_the_least_loaded():
    router = PrefixRouter(2, BLOCK)
    prompt = list(range(100, 100 + BLOCK))
    home = router.affinity(request(prompt))
    other = 1 - home
    loads = [0, 0]
    loads[home] = BALANCE_ABS_THRESHOLD  # busier, but not by enough
    assert router.choose(request(prompt), loads, [0.1, 0.1]) == home
    loads[home] = BALANCE_ABS_THRESHOLD + 1
    assert router.choose(request(prompt), loads, [0.1, 0.1]) == other
    kv = [0.0, 0.0]
    kv[home] = 0.97
    assert router.choose(request(prompt), [0, 0], kv) == other


class RecordingCore:
    """Stands in for one core's MPClient: records what the DPClient sends it."""

    def __init__(self, num_kv_blocks: int) -> None:
        self.info = SimpleNamespace(num_kv_blocks=num_kv_blocks)
        self.config = SimpleNamespace(num_kv_blocks=num_kv_blocks)
        self.latest_stats = SchedulerStats()
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.stopped: list[str] = []
        self._pipe = os.pipe()
        self.poll_handles = (self._pipe[0],)

    num_unfinished = property(lambda self: len(self.added) - len(self.aborted) - len(self.stopped))

    def add_request(self, request: Request) -> None:
        self.added.append(request.request_id)

    def abort_requests(self, ids) -> None:
        self.aborted += ids

    def stop_requests(self, ids) -> None:
        self.stopped += ids


def test_aborts_and_stops_go_to_the_core_that_owns_the_request_and_n_children_stay_together():
    cores = [RecordingCore(100), RecordingCore(80)]
    client = DPClient(SimpleNamespace(cache=SimpleNamespace(block_size=BLOCK)), cores)
    assert client.config.num_kv_blocks == 80  # requests are validated against the smallest core
    prompts = {f"p{i}": [i] * BLOCK for i in range(40)}
    for request_id, prompt in prompts.items():
        client.add_request(request(prompt, request_id))
    for i in range(3):
        client.add_request(Request(f"n-{i}", [7] * BLOCK, SamplingParams(), parent_request_id="n"))
    assert all(cores[client.router.affinity(request(p))].added.count(r) == 1 for r, p in prompts.items())
    assert sum(f"n-{i}" in cores[0].added for i in range(3)) in (0, 3)
    client.abort_requests(["p1", "p2", "unknown"])
    client.stop_requests(["p3"])
    for r in ("p1", "p2"):
        assert [r in core.aborted for core in cores] == [r in core.added for core in cores]
    assert [("p3" in core.stopped) for core in cores] == [("p3" in core.added) for core in cores]
    assert client.num_routed == [len(core.added) for core in cores] and min(client.num_routed) > 0


def test_each_core_gets_its_own_gpus_or_its_share_of_the_cpu_threads():
    def config(device: str, dp: int, tp: int = 1, cpu_threads: int | None = None):
        return SimpleNamespace(device=SimpleNamespace(type=device), model=SimpleNamespace(cpu_threads=cpu_threads),
                               parallel=SimpleNamespace(data_parallel_size=dp, tensor_parallel_size=tp))

    assert core_env(config("cuda", 2, tp=2), 1, {}) == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert core_env(config("cuda", 2), 1, {"CUDA_VISIBLE_DEVICES": "4,6"}) == {"CUDA_VISIBLE_DEVICES": "6"}
    with pytest.raises(ValueError, match="needs 4 GPUs; 2 visible"):
        core_env(config("cuda", 2, tp=2), 1, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert int(core_env(config("cpu", 2), 0, {})["SLUICE_CPU_THREADS"]) >= 1
    assert core_env(config("cpu", 2, cpu_threads=3), 0, {}) == {}  # given per core


def test_data_parallel_needs_the_process_split(capsys):
    assert main(["serve", "--data-parallel-size", "2", "--no-process-split"]) == 1
    assert "--data-parallel-size 2 runs each engine core in its own process" in capsys.readouterr().err


# ---- offline -----------------------------------------------------------------------------------------------------
def test_offline_llm_over_two_cores_generates_what_one_core_does(tmp_path):
    from sluice import LLM

    model = str(save_tiny_model(tmp_path / "tiny"))
    prompts = [f"topic {t} " * 12 + f"question {q}" for t in range(6) for q in range(2)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    flags = {"device": "cpu", "dtype": "float32", "max_model_len": 256, "num_kv_blocks": 64}
    expected = [o.outputs[0].token_ids for o in LLM(model, **flags).generate(prompts, params, use_tqdm=False)]
    llm = LLM(model, data_parallel_size=2, **flags)
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        n = SamplingParams(max_tokens=4, temperature=0.8, seed=1, n=3)
        (fanned,) = llm.generate([prompts[0]], n, use_tqdm=False)
        client = llm.llm_engine.engine_core
        assert [o.outputs[0].token_ids for o in outputs] == expected
        assert len(fanned.outputs) == 3 and all(len(c.token_ids) == 4 for c in fanned.outputs)
        assert all(routed > 0 for routed in client.num_routed), client.num_routed
        assert not client.has_unfinished_requests()
    finally:
        llm.llm_engine.shutdown()


# ---- end to end --------------------------------------------------------------------------------------------------
TOPICS = ["the tides of the North Sea", "baking sourdough bread", "the orbit of Mars", "medieval castles",
          "how bees make honey", "the history of chess", "volcanoes of Iceland", "the rules of cricket"]


def system_prompt(topic: str) -> str:
    return (f"You are a patient teacher who explains {topic} to curious students. Answer in plain words, one "
            f"short paragraph at a time, and always stay on the subject of {topic}. Question: ")


@pytest.mark.slow
def test_two_cores_answer_everything_share_the_load_and_keep_prefixes_together():
    server = RemoteServer(None, ["--data-parallel-size", "2", "--api-server-count", "2", "--max-model-len", "512",
                                 "--num-kv-blocks", "256"], startup_timeout=300)
    try:
        client = server.client(timeout=120)

        model = client.models.list().data[0].id

        def complete(prompt: str):
            return client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                             extra_body={"ignore_eos": True})

        with ThreadPoolExecutor(8) as pool:  # each topic's first request, all at once
            first = list(pool.map(complete, [system_prompt(t) + "why?" for t in TOPICS]))
            repeats = list(pool.map(complete, [system_prompt(t) + q for t in TOPICS for q in ("how?", "when?")]))
        assert all(r.choices[0].finish_reason == "length" for r in first + repeats)

        metrics = server.metrics()
        queries = [metrics.get(f"sluice:prefix_cache_queries_total[engine={i}]", 0) for i in (0, 1)]
        hits = [metrics.get(f"sluice:prefix_cache_hits_total[engine={i}]", 0) for i in (0, 1)]
        assert all(q > 0 for q in queries), queries  # both cores took a share
        # Every repeat went to the core that had its topic's prompt: its system prompt's full blocks (at least
        # two of them) were hits there. Routed without regard to prefixes, about half of them would miss.
        assert sum(hits) >= len(repeats) * 2 * BLOCK, hits
        assert metrics["sluice:request_success_total[finished_reason=length]"] == len(first) + len(repeats)
        assert metrics["sluice:num_requests_running[engine=0]"] == metrics["sluice:num_requests_running[engine=1]"] == 0

        server.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
    finally:
        server.stop()

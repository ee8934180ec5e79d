"""`--distributed-executor-backend ray` on the CPU: rank 1 as a Ray actor in a placement group gives exactly the
single-rank engine's greedy output; a killed actor makes the next step raise an error naming its rank; Ray is
left as it was found (a local instance the engine started is shut down, a cluster it joined is not).
"""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from sluice import LLM, SamplingParams  # noqa: E402
from sluice.distributed import executor  # noqa: E402
from sluice.distributed.executor import TPWorkerDiedError  # noqa: E402
from tests.distributed.test_tensor_parallel import TIGHT_ENGINE, _greedy, _prompts  # noqa: E402
from tests.engine.test_hf_equivalence import assert_no_leaked_blocks  # noqa: E402
from tests.tiny_models import save_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", tie_word_embeddings=True,
                           attention_bias=True, mlp_bias=True)


@pytest.fixture(autouse=True)
def no_ray_left_behind():
    assert not ray.is_initialized()
    yield
    if ray.is_initialized():  # a failed test must not leave its Ray to the next
        ray.shutdown()


def test_ray_ranks_match_one_rank_and_the_local_ray_is_shut_down(model_path):
    prompts = _prompts()
    single = LLM(model=str(model_path), **TIGHT_ENGINE)
    expected = _greedy(single, prompts)
    llm = LLM(model=str(model_path), tensor_parallel_size=2, distributed_executor_backend="ray", **TIGHT_ENGINE)
    try:
        runner = llm.llm_engine.core.runner
        assert type(runner).__name__ == "RayExecutor" and len(runner.worker_actors) == 1
        rank0_bundle, rank1_bundle = runner._placement_group.bundle_specs  # rank 0's bundle held too, on this node
        assert rank0_bundle == {"CPU": 1, f"node:{ray.util.get_node_ip_address()}": 0.001}
        assert rank1_bundle == {"CPU": 1}
        assert _greedy(llm, prompts) == expected
        assert_no_leaked_blocks(llm)
        assert llm.llm_engine.core.make_stats().num_preemptions > 0
    finally:
        llm.llm_engine.shutdown()
    assert not ray.is_initialized()


def test_killed_actor_fails_the_next_step_naming_its_rank(model_path, monkeypatch):
    monkeypatch.setattr(executor, "DEATH_GRACE_S", 60.0)  # the watchdog would end this (the test's) process
    ray.init(num_cpus=2, include_dashboard=False)  # an existing Ray: the engine joins it and leaves it running
    llm = LLM(model=str(model_path), tensor_parallel_size=2, distributed_executor_backend="ray", dtype="float32",
              device="cpu", max_model_len=64, num_kv_blocks=32)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    try:
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
        (actor,) = llm.llm_engine.core.runner.worker_actors
        ray.kill(actor)
        with pytest.raises(TPWorkerDiedError, match="tensor-parallel worker rank 1 \\(Ray actor .*\\) died"):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    assert ray.is_initialized()
    assert ray.util.placement_group_table() == {} or all(
        entry["state"] == "REMOVED" for entry in ray.util.placement_group_table().values())
    ray.shutdown()

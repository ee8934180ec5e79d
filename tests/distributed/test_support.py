"""What a tensor-parallel engine refuses, each with an error naming the reason (no process is started)."""
from __future__ import annotations

import sys

import pytest

from sluice.config import DeviceConfig, EngineArgs, create_engine_config
from sluice.distributed.support import per_rank_heads
from sluice.layers.linear import check_tp_heads
from tests.tiny_models import save_tiny_model

CPU = DeviceConfig(type="cpu")


@pytest.mark.parametrize("overrides, message", [
    (dict(pipeline_parallel_size=2), "pipeline parallelism is not supported"),
    (dict(tensor_parallel_size=2, enable_lora=True), "LoRA"),
    (dict(tensor_parallel_size=2, quantization="fp8"), "quantization 'fp8' is not supported"),
    (dict(tensor_parallel_size=2, speculative_config={"method": "ngram", "num_speculative_tokens": 2}),
     "speculative decoding"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="threads"), "distributed_executor_backend"),
])
def test_flags_tensor_parallelism_cannot_serve_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**overrides).validate()


@pytest.mark.parametrize("arch, overrides, message", [
    ("qwen3_moe", dict(num_key_value_heads=2, moe_intermediate_size=41), "must divide moe_intermediate_size \\(41\\)"),
    ("qwen2", {}, "must divide the number of KV heads \\(3\\) or be a multiple of it"),  # 3 KV heads over 2 ranks
    ("llama", dict(num_attention_heads=3, num_key_value_heads=1, hidden_size=48), "attention heads \\(3\\)"),
])
def test_models_that_do_not_shard_are_refused(tmp_path, arch, overrides, message):
    path = save_tiny_model(tmp_path / arch, arch, **overrides)
    with pytest.raises(ValueError, match=message):
        create_engine_config(EngineArgs(model=str(path), tensor_parallel_size=2), CPU)


def test_pooling_engines_are_refused(tmp_path):
    path = save_tiny_model(tmp_path / "llama", "llama")
    with pytest.raises(ValueError, match="pooling"):
        create_engine_config(EngineArgs(model=str(path), tensor_parallel_size=2, runner="pooling"), CPU)


def test_ray_backend_is_accepted_when_ray_is_installed_and_refused_otherwise(monkeypatch):
    EngineArgs(tensor_parallel_size=2, distributed_executor_backend="ray").validate()
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    with pytest.raises(ValueError, match="'ray' needs the ray package"):
        EngineArgs(tensor_parallel_size=2, distributed_executor_backend="ray").validate()
    EngineArgs(tensor_parallel_size=1, distributed_executor_backend="ray").validate()  # no ranks to start


def test_kv_heads_split_or_replicate_across_ranks():
    assert per_rank_heads(8, 4, 2) == (4, 2)
    assert per_rank_heads(8, 2, 4) == (2, 1)  # two ranks per KV head
    assert per_rank_heads(8, 1, 4) == (2, 1)  # one KV head on every rank
    check_tp_heads(8, 2, 4)
    with pytest.raises(ValueError):
        check_tp_heads(12, 3, 2)

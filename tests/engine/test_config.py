"""EngineArgs: vLLM's flag names, defined once, validated with errors that name the field."""
from __future__ import annotations

import argparse
import logging

import pytest

from sluice.config import EngineArgs, resolve_batch_limits
from sluice.engine.stats import IterationStats, LoggingStatLogger, SchedulerStats


def test_cli_flags_carry_vllm_names_and_round_trip():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--block-size", "32",
                              "--no-enable-prefix-caching", "--gpu-memory-utilization", "0.5",
                              "--num-kv-blocks", "100", "--load-format", "dummy", "--scheduling-policy", "priority"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.max_num_seqs, engine_args.max_num_batched_tokens, engine_args.block_size) == (8, 64, 32)
    assert engine_args.enable_prefix_caching is False
    assert (engine_args.num_kv_blocks, engine_args.load_format, engine_args.scheduling_policy) == (
        100, "dummy", "priority")


@pytest.mark.parametrize("device_type, large_gpu, usage_context, expected", [
    ("cuda", True, "llm", (1024, 16384)),
    ("cuda", True, "server", (1024, 8192)),
    ("cuda", False, "llm", (256, 8192)),
    ("cuda", False, "server", (256, 2048)),
    ("cpu", False, "llm", (256, 2048)),
    ("cpu", False, "server", (256, 2048)),
])
def test_batch_limits_default_as_vllm_picks_them_per_device(device_type, large_gpu, usage_context, expected):
    limits = resolve_batch_limits(EngineArgs(usage_context=usage_context), 131072, device_type, large_gpu)
    assert (limits.max_num_seqs, limits.max_num_batched_tokens) == expected


def test_given_batch_limits_win_over_the_defaults_and_short_contexts_shrink_the_cpu_budget():
    given = EngineArgs(max_num_seqs=8, max_num_batched_tokens=64)
    assert resolve_batch_limits(given, 131072, "cuda", True) == resolve_batch_limits(given, 128, "cpu", False)
    assert resolve_batch_limits(given, 128, "cpu", False).max_num_seqs == 8
    assert resolve_batch_limits(EngineArgs(), 1024, "cpu", False).max_num_batched_tokens == 1024
    assert resolve_batch_limits(EngineArgs(), 128, "cpu", False).max_num_batched_tokens == 512


def test_async_scheduling_and_long_prefill_flags_parse():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert EngineArgs.from_cli_args(parser.parse_args([])).async_scheduling is None  # auto: on for CUDA
    args = parser.parse_args(["--no-async-scheduling", "--long-prefill-token-threshold", "256"])
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.async_scheduling, engine_args.long_prefill_token_threshold) == (False, 256)
    assert "--usage-context" not in parser.format_help()  # set by the entrypoint, not a flag


@pytest.mark.parametrize("field, value, message", [
    ("block_size", 12, "block_size"),
    ("max_num_seqs", 0, "max_num_seqs"),
    ("gpu_memory_utilization", 1.5, "gpu_memory_utilization"),
    ("num_kv_blocks", 0, "num_kv_blocks"),
    ("dtype", "float8", "dtype"),
    ("swap_space", 4.0, "swap_space"),
    ("tensor_parallel_size", 2, "tensor_parallel_size"),
    ("long_prefill_token_threshold", -1, "long_prefill_token_threshold"),
    ("usage_context", "batch", "usage_context"),
])
def test_invalid_engine_args_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**{field: value}).validate()


def test_llm_rejects_unknown_arguments_before_loading_anything():
    from sluice import LLM
    with pytest.raises(TypeError, match="max_num_sequences"):
        LLM(model="unused", max_num_sequences=4)


def test_periodic_stats_line_reports_throughput_and_cache_state(caplog):
    stat_logger = LoggingStatLogger(interval=0.0)
    with caplog.at_level(logging.INFO, logger="sluice.stats"):
        stat_logger.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=1, kv_cache_usage=0.25,
                                          prefix_cache_queries=200, prefix_cache_hits=50),
                           IterationStats(num_prompt_tokens=10, num_generation_tokens=3))
    line = caplog.records[-1].getMessage()
    assert "running 3, waiting 1, KV cache 25.0%" in line and "prefix cache hit rate 25.0%" in line

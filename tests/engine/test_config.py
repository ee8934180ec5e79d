"""EngineArgs: vLLM's flag names, defined once, validated with errors that name the field; create_engine_config:
every default decided once, in one frozen EngineConfig; the README's flag table states those defaults."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from pathlib import Path

import pytest

from sluice.config import (BATCH_DEFAULTS, EngineArgs, DeviceConfig, EngineConfig, ObservabilityConfig,
                           create_engine_config, default_description, resolve_batch_limits)
from sluice.engine.stats import IterationStats, LoggingStatLogger, SchedulerStats
from tests.tiny_models import save_tiny_model

H100 = DeviceConfig("cuda", "NVIDIA H100 80GB HBM3", 85 * 10**9)
A100 = DeviceConfig("cuda", "NVIDIA A100-SXM4-80GB", 85 * 10**9)
L4 = DeviceConfig("cuda", "NVIDIA L4", 24 * 2**30)
CPU = DeviceConfig("cpu")
README = Path(__file__).resolve().parents[2] / "README.md"


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


@pytest.mark.parametrize("device, usage_context, expected", [
    (H100, "llm", (1024, 16384)),
    (H100, "server", (1024, 8192)),
    (A100, "llm", (256, 8192)),
    (L4, "server", (256, 2048)),
    (CPU, "llm", (256, 2048)),
    (CPU, "server", (256, 2048)),
])
def test_batch_limits_default_as_vllm_picks_them_per_device(device, usage_context, expected):
    assert resolve_batch_limits(EngineArgs(usage_context=usage_context), 131072, device) == expected


def test_given_batch_limits_win_over_the_defaults_and_short_contexts_shrink_the_cpu_budget():
    given = EngineArgs(max_num_seqs=8, max_num_batched_tokens=64)
    assert resolve_batch_limits(given, 131072, H100) == resolve_batch_limits(given, 128, CPU) == (8, 64)
    assert resolve_batch_limits(EngineArgs(), 1024, CPU)[1] == 1024
    assert resolve_batch_limits(EngineArgs(), 128, CPU)[1] == 512


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("config") / "tiny"))


def test_engine_config_resolves_every_default_once_and_is_frozen(tiny_model):
    config = create_engine_config(EngineArgs(model=tiny_model, usage_context="server"), device=H100)
    assert isinstance(config, EngineConfig) and config.device.is_large_gpu
    assert (config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens) == (1024, 8192)
    assert config.scheduler.async_scheduling and config.model.device == "cuda" and config.model.dtype == "float32"
    assert config.scheduler.max_model_len == config.model.max_model_len == config.model.context_length
    assert config.cache.num_blocks is None  # the core sizes it
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scheduler.max_num_batched_tokens = 1  # type: ignore[misc]
    on_cpu = create_engine_config(EngineArgs(model=tiny_model, max_num_batched_tokens=96), device=CPU)
    assert on_cpu.scheduler.max_num_batched_tokens == 96 and not on_cpu.scheduler.async_scheduling


def test_the_kv_cache_caps_max_model_len_in_the_one_config(tiny_model):
    config = create_engine_config(EngineArgs(model=tiny_model, max_model_len=200, block_size=16), device=CPU)
    sized = config.with_kv_cache(num_blocks=8)  # 128 tokens of KV
    assert (sized.cache.num_blocks, sized.num_kv_tokens, sized.max_model_len) == (8, 128, 128)
    assert sized.model.max_model_len == 200  # what was asked stays on record
    assert config.with_kv_cache(num_blocks=64).max_model_len == 200


def test_observability_flags_resolve_into_their_own_section_off_by_default(tiny_model):
    config = create_engine_config(EngineArgs(model=tiny_model), device=CPU)
    assert config.observability == ObservabilityConfig()
    assert not config.observability.kv_cache_metrics and config.observability.otlp_traces_endpoint is None
    traced = create_engine_config(EngineArgs(model=tiny_model, kv_cache_metrics=True, kv_cache_metrics_sample=0.5,
                                             otlp_traces_endpoint="http://127.0.0.1:4318",
                                             collect_detailed_traces="all"), device=CPU)
    assert traced.observability == ObservabilityConfig(True, 0.5, "http://127.0.0.1:4318", "all")


def test_a_folder_without_tokenizer_files_fails_at_start_with_one_line(tiny_model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(tiny_model, name), bare / name)
    with pytest.raises(ValueError) as error:
        create_engine_config(EngineArgs(model=str(bare)), device=CPU)
    message = str(error.value)
    assert "\n" not in message and str(bare) in message and "--skip-tokenizer-init" in message
    assert create_engine_config(EngineArgs(model=str(bare), skip_tokenizer_init=True), device=CPU).model.skip_tokenizer_init


def test_readme_engine_flag_table_states_the_resolved_defaults():
    """Each row of the README's engine-flag table names an EngineArgs flag and its default as config.py states it
    (default_description, which the --help text uses too)."""
    rows = re.findall(r"^\| `--([a-z-]+)`[^|]*\| ([^|]+) \|", README.read_text(), flags=re.MULTILINE)
    assert len(rows) >= 15
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    for flag, default in rows:
        name = flag.replace("-", "_")
        assert name in fields, f"README documents --{flag}, which is not an engine flag"
        assert default == default_description(name), (
            f"README's default for --{flag} is {default!r}; config.py says {default_description(name)!r}")
    help_text = EngineArgs.add_cli_args(argparse.ArgumentParser()).format_help()
    assert "16384 offline / 8192" in " ".join(help_text.split())  # --help reads the same table


README_DEVICE_ROWS = {  # the README's row label -> BATCH_DEFAULTS key and a device of that class
    "GPU of 70 GiB or more, not an A100": ("large_gpu", H100),
    "other GPU": ("gpu", L4),
    "CPU": ("cpu", CPU),
}


def test_readme_batch_defaults_table_matches_batch_defaults_per_device():
    """The README's per-device table states BATCH_DEFAULTS, and the resolution picks those numbers."""
    rows = re.findall(r"^\| ([^|`]+?) \| (\d+) \| (\d+) \| (\d+) \|$", README.read_text(), flags=re.MULTILINE)
    assert {label for label, *_ in rows} == set(README_DEVICE_ROWS)
    assert set(BATCH_DEFAULTS) == {key for key, _ in README_DEVICE_ROWS.values()}
    for label, seqs, offline, served in rows:
        key, device = README_DEVICE_ROWS[label]
        defaults = BATCH_DEFAULTS[key]
        assert (int(seqs), int(offline), int(served)) == (
            defaults.max_num_seqs, defaults.max_num_batched_tokens_offline,
            defaults.max_num_batched_tokens_served), f"README's {label!r} row disagrees with BATCH_DEFAULTS[{key!r}]"
        long_context = 1 << 20
        assert resolve_batch_limits(EngineArgs(usage_context="llm"), long_context, device) == (
            int(seqs), int(offline))
        assert resolve_batch_limits(EngineArgs(usage_context="server"), long_context, device) == (
            int(seqs), int(served))


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
    ("swap_space", -1.0, "swap_space"),
    ("kv_offload_space", -1.0, "kv_offload_space"),
    ("preemption_mode", "swap", "swap_space"),
    ("preemption_mode", "evict", "preemption_mode"),
    ("tensor_parallel_size", 0, "tensor_parallel_size"),
    ("pipeline_parallel_size", 2, "pipeline_parallel_size"),
    ("long_prefill_token_threshold", -1, "long_prefill_token_threshold"),
    ("usage_context", "batch", "usage_context"),
    ("max_model_len", 0, "max_model_len"),
    ("kv_cache_metrics_sample", 0.0, "kv_cache_metrics_sample"),
    ("collect_detailed_traces", "all", "otlp_traces_endpoint"),
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

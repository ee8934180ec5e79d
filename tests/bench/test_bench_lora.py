"""LoRA in the benchmarks: `bench throughput --num-loras` times the base and the LoRA engine on the same
requests; `bench make-loras` writes adapters the server loads; `bench serve --lora-mix` sends each adapter its
share of the requests and reports every adapter's TTFT percentiles."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from sluice.bench.lora import assign_adapters, parse_lora_mix, per_adapter_metrics
from sluice.bench.serve_client import RequestResult
from sluice.entrypoints.cli import main
from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("bench-lora") / "tiny"))


def test_throughput_runs_base_and_lora_on_the_same_requests(tiny_model, tmp_path, capsys):
    out = tmp_path / "lora.json"
    argv = ["bench", "throughput", "--model", tiny_model, "--num-prompts", "6", "--length-scale", "0.05",
            "--kv-cache-memory", str(4 << 20), "--num-warmup-prompts", "1", "--no-progress",
            "--num-loras", "3", "--lora-rank", "4", "--output-json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    base, lora = report["engine_base"], report["engine"]
    assert (base["num_requests"], lora["num_requests"]) == (6, 6)
    assert base["output_tokens"] == lora["output_tokens"] and base["prompt_tokens"] == lora["prompt_tokens"]
    assert not base["enable_lora"] and lora["enable_lora"] and lora["max_loras"] == 3
    assert report["lora"]["num_loras"] == 3 and report["lora"]["lora_rank"] == 4
    assert report["lora_over_base"] == pytest.approx(lora["output_tokens_per_s"] / base["output_tokens_per_s"])
    table = capsys.readouterr().out
    assert "sluice-base" in table and "sluice-3-loras-r4" in table and "over base" in table


def test_lora_mix_weights_set_each_adapters_share_of_the_requests():
    mix = parse_lora_mix(["noisy:8", "a", "b:1"])
    assert mix == {"noisy": 8.0, "a": 1.0, "b": 1.0}
    counts = Counter(assign_adapters(10000, mix, seed=0))
    assert counts["noisy"] / counts["a"] == pytest.approx(8, rel=0.1)
    assert counts["a"] / counts["b"] == pytest.approx(1, rel=0.15)
    assert assign_adapters(50, mix, seed=3) == assign_adapters(50, mix, seed=3)
    with pytest.raises(ValueError, match="positive"):
        parse_lora_mix(["a:0"])


def test_per_adapter_metrics_split_ttft_and_group_the_light_adapters():
    mix = {"noisy": 8.0, "a": 1.0, "b": 1.0}
    names = ["noisy", "a", "noisy", "b"]
    results = [RequestResult(success=True, output_tokens=2, ttft=t, latency=t + 0.1) for t in (1.0, 0.1, 2.0, 0.3)]
    report = per_adapter_metrics(names, results, mix, duration_s=4.0, slos={})
    assert report["per_adapter"]["noisy"]["completed"] == 2
    assert report["per_adapter"]["a"]["ttft_ms_p50"] == pytest.approx(100.0)
    assert report["light_adapters"]["adapters"] == ["a", "b"]
    assert report["light_adapters"]["completed"] == 2
    assert report["light_adapters"]["ttft_ms_p99"] == pytest.approx(300.0, rel=0.02)


def test_serve_with_a_lora_mix_against_a_lora_server(tiny_model, tmp_path, capsys):
    folder = tmp_path / "loras"
    assert main(["bench", "make-loras", "--model", tiny_model, "--num-loras", "2", "--lora-rank", "4",
                 "--out", str(folder)]) == 0
    modules = capsys.readouterr().out.split()[1:]
    assert modules == [f"lora-0={folder / 'lora-0'}", f"lora-1={folder / 'lora-1'}"]
    server = RemoteServer(tiny_model, ["--served-model-name", "tiny", "--num-kv-blocks", "256", "--enable-lora",
                                       "--max-loras", "2", "--max-lora-rank", "4", "--lora-modules", *modules])
    try:
        out = tmp_path / "mix.json"
        assert main(["bench", "serve", "--base-url", server.base_url, "--model", "tiny", "--tokenizer", tiny_model,
                     "--num-prompts", "12", "--length-scale", "0.05", "--request-rate", "inf",
                     "--lora-mix", "lora-0:3", "lora-1:1", "--output-json", str(out), "--no-progress"]) == 0
    finally:
        server.stop()
    report = json.loads(out.read_text())
    engine = report["engine"]
    assert (engine["completed"], engine["failed"]) == (12, 0)
    assert report["lora_mix"] == {"lora-0": 3.0, "lora-1": 1.0}
    per_adapter = engine["per_adapter"]
    assert sum(m["completed"] for m in per_adapter.values()) == 12
    assert engine["light_adapters"]["adapters"] == ["lora-1"]
    assert "Per adapter" in capsys.readouterr().out

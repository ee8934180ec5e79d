"""`sluice bench serve` (W5): metric definitions on hand-made timings, and a full run against a real server."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sluice.bench.datasets import generate_workload
from sluice.bench.serve import RequestResult, arrival_gaps, calculate_metrics, parse_goodput
from sluice.entrypoints.cli import main
from tests.entrypoints.server_utils import RemoteServer
from tests.tiny_models import save_tiny_model

LATENCY_FIELDS = [f"{m}_ms_{s}" for m in ("ttft", "tpot", "itl", "e2e") for s in ("mean", "std", "p50", "p90", "p99")]


def test_poisson_gaps_average_one_over_the_rate_and_inf_sends_at_once():
    gaps = arrival_gaps(4000, request_rate=16.0, burstiness=1.0, seed=0)
    assert np.mean(gaps) == pytest.approx(1 / 16, rel=0.05)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.1)  # exponential: cv 1
    bursty = arrival_gaps(4000, request_rate=16.0, burstiness=0.25, seed=0)
    assert np.mean(bursty) == pytest.approx(1 / 16, rel=0.1)
    assert np.std(bursty) / np.mean(bursty) == pytest.approx(2.0, rel=0.1)  # gamma: cv 1/sqrt(shape)
    assert arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]


def test_metrics_follow_vllm_definitions():
    # 1 s run; request A: ttft 100 ms, 3 more tokens 50 ms apart; B: ttft 600 ms, one token; C failed.
    a = RequestResult(success=True, prompt_len=10, output_tokens=4, ttft=0.1, latency=0.25, itl=[0.05] * 3)
    b = RequestResult(success=True, prompt_len=20, output_tokens=1, ttft=0.6, latency=0.6)
    c = RequestResult(success=False, prompt_len=30, error="HTTP 500")
    m = calculate_metrics([a, b, c], duration_s=1.0, slos_ms={"ttft": 500.0, "tpot": 50.0})
    assert (m.completed, m.failed, m.total_input_tokens, m.total_output_tokens) == (2, 1, 30, 5)
    assert m.requests_per_s == 2.0 and m.output_tokens_per_s == 5.0 and m.total_tokens_per_s == 35.0
    assert m.latency_ms["tpot_ms_mean"] == pytest.approx(50.0)  # (250 - 100) / 3; B has no TPOT
    assert m.latency_ms["itl_ms_p50"] == pytest.approx(50.0)
    assert m.latency_ms["ttft_ms_mean"] == pytest.approx(350.0)
    assert m.latency_ms["e2e_ms_p50"] == pytest.approx(425.0)
    assert m.goodput_requests_per_s == 1.0  # A meets both SLOs (<=), B misses TTFT


def test_goodput_spec_names_the_bad_part():
    assert parse_goodput(["ttft:500", "tpot:50", "e2e:9000"]) == {"ttft": 500.0, "tpot": 50.0, "e2e": 9000.0}
    with pytest.raises(ValueError, match="goodput.*itl"):
        parse_goodput(["itl:5"])
    with pytest.raises(ValueError, match="goodput.*milliseconds"):
        parse_goodput(["ttft:fast"])


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("bench-serve") / "tiny")
    server = RemoteServer(model, ["--process-split", "--served-model-name", "tiny", "--num-kv-blocks", "256"])
    yield server, model
    server.stop()


def test_bench_serve_against_a_real_server_writes_a_complete_report(tiny_server, tmp_path, capsys):
    server, model = tiny_server
    out = tmp_path / "w5.json"
    argv = ["bench", "serve", "--base-url", server.base_url, "--model", "tiny", "--tokenizer", str(model),
            "--num-prompts", "8", "--length-scale", "0.05", "--request-rate", "40", "--max-concurrency", "4",
            "--goodput", "ttft:60000", "tpot:60000", "--output-json", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    for key in ("workload", "device", "model", "sluice_commit", "date", "engine", "peers", "ratios",
                "roofline_fraction", "request_rate", "burstiness", "max_concurrency", "goodput_slo_ms"):
        assert key in report, key
    assert (report["workload"], report["model"], report["request_rate"], report["max_concurrency"]) == \
        ("W5", "tiny", 40.0, 4)
    engine = report["engine"]
    for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "goodput_requests_per_s",
                *LATENCY_FIELDS):
        assert isinstance(engine[key], float), key
    # The server's max_model_len (from /v1/models) shapes the same seeded W1 requests.
    requests = generate_workload("W1", 384, 8, seed=0, max_model_len=512, length_scale=0.05)
    assert (engine["completed"], engine["failed"]) == (8, 0)
    assert engine["total_output_tokens"] == sum(r.output_len for r in requests)  # ignore_eos: all tokens asked
    assert engine["total_input_tokens"] == sum(len(r.prompt_token_ids) for r in requests)
    assert engine["goodput_requests_per_s"] == pytest.approx(engine["requests_per_s"])  # generous SLOs: all good
    assert 0 < engine["ttft_ms_p50"] <= engine["e2e_ms_p50"] and 0 < engine["itl_ms_p50"] <= engine["itl_ms_p99"]
    table = capsys.readouterr().out
    assert "Successful requests:" in table and "Median TTFT (ms):" in table and "P99 ITL (ms):" in table


def test_bench_serve_counts_failures_and_exits_non_zero(tiny_server, tmp_path):
    server, model = tiny_server
    out = tmp_path / "bad.json"
    argv = ["bench", "serve", "--base-url", server.base_url, "--model", "no-such-model", "--vocab-size", "384",
            "--max-model-len", "512", "--num-prompts", "2", "--length-scale", "0.05", "--num-warmup-prompts", "0",
            "--output-json", str(out), "--no-progress"]
    assert main(argv) == 1
    engine = json.loads(out.read_text())["engine"]
    assert (engine["completed"], engine["failed"]) == (0, 2) and "HTTP 404" in engine["errors"][0]

"""`sluice bench serve` (W5): metric definitions on hand-made timings, and a full run against a real server."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sluice.bench.datasets import generate_workload, long_prompt_requests, spread_evenly
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


def test_long_prompts_come_at_even_intervals_and_leave_the_short_requests_as_they_were():
    short = generate_workload("W1", 384, 9, seed=0)
    long = long_prompt_requests(384, 2, prompt_len=300, output_len=5, seed=0)
    assert [len(r.prompt_token_ids) for r in long] == [300, 300] and long[0] != long[1]
    mixed = spread_evenly(short, long)
    assert [is_long for _, is_long in mixed] == [False] * 3 + [True] + [False] * 3 + [True] + [False] * 3
    assert [r for r, is_long in mixed if not is_long] == short


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("bench-serve") / "tiny")
    server = RemoteServer(model, ["--process-split", "--served-model-name", "tiny", "--num-kv-blocks", "256",
                                  "--max-num-batched-tokens", "128"])  # a long prompt is prefilled in chunks
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


def test_long_prompt_mix_reports_the_short_requests_inter_token_latency_on_its_own(tiny_server, tmp_path, capsys):
    server, model = tiny_server
    out = tmp_path / "stall.json"
    argv = ["bench", "serve", "--base-url", server.base_url, "--model", "tiny", "--tokenizer", str(model),
            "--num-prompts", "8", "--length-scale", "0.05", "--request-rate", "40", "--long-prompt-len", "384",
            "--num-long-prompts", "2", "--long-prompt-output-len", "4", "--output-json", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert (report["long_prompt_len"], report["num_long_prompts"], report["long_prompt_output_len"]) == (384, 2, 4)
    engine, short, long = report["engine"], report["engine"]["short_requests"], report["engine"]["long_requests"]
    assert (engine["completed"], short["completed"], long["completed"], engine["failed"]) == (10, 8, 2, 0)
    assert (long["total_input_tokens"], long["total_output_tokens"]) == (2 * 384, 2 * 4)
    requests = generate_workload("W1", 384, 8, seed=0, max_model_len=512, length_scale=0.05)
    assert short["total_input_tokens"] == sum(len(r.prompt_token_ids) for r in requests)  # the W1 requests
    for key in LATENCY_FIELDS:
        assert isinstance(short[key], float) and isinstance(long[key], float), key
    assert 0 < short["itl_ms_p50"] <= short["itl_ms_p99"]
    assert short["itl_p99_over_p50"] == pytest.approx(short["itl_ms_p99"] / short["itl_ms_p50"])
    table = capsys.readouterr().out
    assert "Short requests among 2 long prompts" in table and "P99 / median ITL, short requests:" in table


# ---- W8: multi-turn ---------------------------------------------------------------------------------------
def test_w8_think_times_are_seeded_exponential_and_leave_the_tokens_alone():
    from sluice.bench.multiturn import generate_conversations

    slow = generate_conversations(1000, 400, seed=5, think_time_s=10.0)
    assert slow == generate_conversations(1000, 400, seed=5, think_time_s=10.0)
    gaps = [t for c in slow for t in c.think_times]
    assert all(len(c.think_times) == len(c.user_turns) - 1 for c in slow)
    assert 9.0 <= np.mean(gaps) <= 11.0 and min(gaps) >= 0 and np.median(gaps) < np.mean(gaps)  # exponential
    at_once = generate_conversations(1000, 400, seed=5, think_time_s=0.0)
    assert all(t == 0.0 for c in at_once for t in c.think_times)
    assert [(c.context, c.user_turns, c.output_lens) for c in at_once] == \
        [(c.context, c.user_turns, c.output_lens) for c in slow]
    with pytest.raises(ValueError, match="think_time_s"):
        generate_conversations(1000, 2, think_time_s=-1.0)


def test_w8_conversations_are_seeded_and_fit_the_context():
    from sluice.bench.multiturn import generate_conversations

    conversations = generate_conversations(1000, 50, seed=3)
    assert conversations == generate_conversations(1000, 50, seed=3)
    assert all(4 <= len(c.user_turns) == len(c.output_lens) <= 8 for c in conversations)
    assert 1600 <= np.mean([len(c.context) for c in conversations]) <= 2400
    assert 240 <= np.mean([len(u) for c in conversations for u in c.user_turns]) <= 360
    assert 120 <= np.mean([n for c in conversations for n in c.output_lens]) <= 180
    for c in generate_conversations(1000, 50, seed=3, max_model_len=3000):
        assert len(c.context) + sum(len(u) + n for u, n in zip(c.user_turns, c.output_lens)) <= 3000
        assert len(c.user_turns) >= 1


def test_prefix_cache_counters_are_read_and_differenced():
    from sluice.bench.multiturn import counter_deltas, prefix_cache_counters

    page = ("# HELP sluice:prefix_cache_hits_total hits\n# TYPE sluice:prefix_cache_hits_total counter\n"
            'sluice:prefix_cache_hits_total{model_name="m"} 30.0\n'
            'sluice:prefix_cache_hits_created{model_name="m"} 1.7e9\n'
            'sluice:prefix_cache_queries_total{model_name="m"} 100.0\n'
            'sluice:num_requests_running{model_name="m"} 3.0\n')
    before = {'sluice:prefix_cache_hits_total{model_name="m"}': 10.0,
              'sluice:prefix_cache_queries_total{model_name="m"}': 60.0}
    counters = prefix_cache_counters(page)
    assert set(counters) == set(before)
    result = counter_deltas(before, counters)
    assert result["hit_rates"] == {'sluice:prefix_cache_hit_rate{model_name="m"}': pytest.approx(0.5)}


def test_w8_against_a_real_server_resends_histories_that_hit_the_prefix_cache(tiny_server, tmp_path, monkeypatch):
    import asyncio
    from collections import Counter

    from sluice.bench.multiturn import generate_conversations

    slept = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay, *args, **kwargs):
        slept.append(delay)
        return await real_sleep(delay, *args, **kwargs)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    server, model = tiny_server
    out = tmp_path / "w8.json"
    argv = ["bench", "serve", "--workload", "W8", "--base-url", server.base_url, "--model", "tiny", "--tokenizer",
            str(model), "--num-conversations", "3", "--length-scale", "0.05", "--request-rate", "40",
            "--think-time", "0.02", "--output-json", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    engine = report["engine"]
    conversations = generate_conversations(384, 3, seed=0, length_scale=0.05, max_model_len=512)
    num_turns = sum(len(c.user_turns) for c in conversations)
    assert (report["workload"], report["think_time_s"], engine["num_turns"], engine["completed"], engine["failed"]) == \
        ("W8", 0.02, num_turns, num_turns, 0)
    assert engine["history"] == "ids"  # the server's own tokens went back into each history
    # Turn t's prompt: context + every earlier user message and output + its own user message.
    expected_input = sum(len(c.context) * len(c.user_turns)
                         + sum((len(c.user_turns) - t) * len(u) + (len(c.user_turns) - t - 1) * n
                               for t, (u, n) in enumerate(zip(c.user_turns, c.output_lens)))
                         for c in conversations)
    assert engine["total_input_tokens"] == expected_input
    assert engine["later_turns"]["completed"] == num_turns - 3 and engine["first_turns"]["completed"] == 3
    rates = engine["prefix_cache"]["hit_rates"]
    assert rates and all(0 < rate < 1 for rate in rates.values())  # later turns found their histories
    # every user's think time before each later turn was waited out
    thinks = Counter(t for c in generate_conversations(384, 3, seed=0, length_scale=0.05, max_model_len=512,
                                                       think_time_s=0.02) for t in c.think_times)
    assert sum(thinks.values()) == num_turns - 3 and not thinks - Counter(slept)

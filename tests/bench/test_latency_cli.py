"""`sluice bench latency` end to end on a tiny random model: per-batch latencies, with and without speculative
decoding, and the prompt-echo prompts."""
from __future__ import annotations

import json

import pytest

from sluice.entrypoints.cli import main
from tests.tiny_models import save_tiny_model

SMALL = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", str(4 << 20), "--input-len", "24",
         "--output-len", "6", "--num-iters", "2", "--num-iters-warmup", "1", "--batch-sizes", "1,3"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("bench") / "tiny"))


def _run(tiny_model: str, out, *extra: str) -> dict:
    assert main(["bench", "latency", "--model", tiny_model, "--output-json", str(out), *SMALL, *extra]) == 0
    return json.loads(out.read_text())


def test_latency_per_batch_size(tiny_model, tmp_path, capsys):
    report = _run(tiny_model, tmp_path / "plain.json")
    assert [r["batch_size"] for r in report["results"]] == [1, 3]
    for result in report["results"]:
        assert len(result["latencies_s"]) == 2 and result["avg_latency_s"] > 0
        assert set(result["percentiles_s"]) == {"10", "25", "50", "75", "90", "99"}
        assert "spec_decode" not in result
    assert "p99" in capsys.readouterr().out


def test_latency_with_a_draft_model_reports_acceptance(tiny_model, tmp_path):
    spec = json.dumps({"model": tiny_model, "num_speculative_tokens": 2})
    report = _run(tiny_model, tmp_path / "spec.json", "--speculative-config", spec, "--prompt-echo")
    assert report["prompt_echo"] and report["speculative_config"] == spec
    for result in report["results"]:
        assert result["spec_decode"]["acceptance_rate"] == 1.0  # the target drafts for itself
        assert result["spec_decode"]["mean_acceptance_length"] > 1

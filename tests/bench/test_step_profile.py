"""benchmarks/step_profile.py end to end on the CPU, with a tiny model standing in for L8: the script runs only
on the device otherwise, where a crash costs a call."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_model

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_profile.py"


@pytest.fixture(scope="module")
def step_profile():
    spec = importlib.util.spec_from_file_location("step_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workload", ["W1", "W7"])
def test_a_run_writes_every_step_and_a_summary(step_profile, workload, tmp_path, monkeypatch):
    tiny = save_tiny_model(tmp_path / "tiny", tokenizer=False)  # the script writes the tokenizer, as for L8
    monkeypatch.setattr(step_profile, "write_l8_config", lambda work_dir: str(tiny))
    out = tmp_path / "steps.json"
    monkeypatch.setattr(sys, "argv", ["step_profile.py", "--out", str(out), "--workload", workload,
                                      "--num-prompts", "12", "--kv-cache-memory", str(16 << 20)])
    step_profile.main()
    report = json.loads(out.read_text())
    steps, summary = report["steps"], report["summary"]
    assert report["workload"] == workload and steps
    assert sum(r["tokens"] for r in steps) > 0
    kinds = {r["kind"] for r in steps}
    assert kinds <= set(step_profile.step_kinds()) | {"empty"}
    assert summary["empty_steps"] == sum(r["kind"] == "empty" for r in steps)
    assert summary["total_s"] > 0

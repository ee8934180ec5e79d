"""`--peers vllm`: the bench runs vLLM's offline API in a process of its own, on the same requests, and reports
the ratio. vLLM itself is not installable here: a package named vllm with the same API surface (LLM,
SamplingParams, RequestOutput-shaped results), written by the test, stands in for it and records what it got."""
from __future__ import annotations

import json
import textwrap

import pytest

from sluice.bench.datasets import generate_workload
from sluice.bench.vllm_peer import fingerprint
from sluice.entrypoints.cli import main
from tests.tiny_models import save_tiny_model

SMALL = ["--length-scale", "0.05", "--kv-cache-memory", str(4 << 20), "--num-warmup-prompts", "1", "--no-progress"]

FAKE_VLLM = '''
import json, os, time
from types import SimpleNamespace

__version__ = "0.0.0+stand-in"
RECORD = os.environ["FAKE_VLLM_RECORD"]
SHORT_BY = int(os.environ.get("FAKE_VLLM_SHORT_BY", "0"))


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class LLM:
    def __init__(self, **kwargs):
        self.engine_args = kwargs
        self.calls = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append({"prompts": [p["prompt_token_ids"] for p in prompts],
                           "params": [vars(p) for p in params]})
        with open(RECORD, "w") as f:
            json.dump({"engine_args": self.engine_args, "calls": self.calls}, f)
        time.sleep(0.01)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7] * max(p.max_tokens - SHORT_BY, 0))])
                for p in params]
'''


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("bench") / "tiny"))


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(record))
    return site, record


def test_vllm_peer_runs_the_same_requests_in_its_own_process(tiny_model, tmp_path, fake_vllm):
    site, record = fake_vllm
    out = tmp_path / "w1.json"
    argv = ["bench", "throughput", "--model", tiny_model, "--output-json", str(out), *SMALL, "--workload", "W1",
            "--num-prompts", "5", "--peers", "vllm", "--vllm-pythonpath", str(site), "--dtype", "float32"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    requests = generate_workload("W1", 384, 5, seed=0, max_model_len=512, length_scale=0.05)
    peer = report["peers"]["vllm"]
    assert peer["output_tokens"] == sum(r.output_len for r in requests)
    assert peer["vllm_version"] == "0.0.0+stand-in"
    assert peer["requests_fingerprint"] == fingerprint([(r.prompt_token_ids, r.output_len) for r in requests])
    assert report["ratios"]["vllm"] == pytest.approx(report["engine"]["output_tokens_per_s"]
                                                     / peer["output_tokens_per_s"])
    seen = json.loads(record.read_text())
    args = seen["engine_args"]
    assert (args["model"], args["dtype"], args["seed"], args["enable_prefix_caching"]) == \
        (tiny_model, "float32", 0, True)
    warmup, timed = seen["calls"]
    assert warmup["prompts"] == [list(reversed(r.prompt_token_ids)) for r in requests[:4]]
    assert timed["prompts"] == [r.prompt_token_ids for r in requests]
    assert [p["max_tokens"] for p in timed["params"]] == [r.output_len for r in requests]
    assert all(p["ignore_eos"] and p["temperature"] == 1.0 and p["top_p"] == 1.0 for p in timed["params"])


def test_a_vllm_that_returns_short_outputs_fails_the_run(tiny_model, tmp_path, fake_vllm, monkeypatch):
    site, _ = fake_vllm
    monkeypatch.setenv("FAKE_VLLM_SHORT_BY", "1")
    argv = ["bench", "throughput", "--model", tiny_model, "--output-json", str(tmp_path / "x.json"), *SMALL,
            "--num-prompts", "2", "--peers", "vllm", "--vllm-pythonpath", str(site)]
    with pytest.raises(RuntimeError, match="vllm peer exited"):
        main(argv)


def test_vllm_peer_without_an_install_fails_before_any_model_loads(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLUICE_VLLM_PYTHONPATH", raising=False)
    argv = ["bench", "throughput", "--model", tiny_model, *SMALL, "--peers", "vllm"]
    assert main(argv) != 0
    assert "needs --vllm-pythonpath" in capsys.readouterr().err
    assert main(argv + ["--vllm-pythonpath", str(tmp_path)]) != 0
    assert "holds no vllm package" in capsys.readouterr().err

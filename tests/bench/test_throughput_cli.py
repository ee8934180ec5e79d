"""`sluice bench throughput` end to end on a tiny random model, peers included, in-process."""
from __future__ import annotations

import json

import pytest

from sluice.bench.datasets import generate_workload
from sluice.entrypoints.cli import main
from tests.tiny_models import save_tiny_model

# Tiny requests (W1 lengths x 0.05: prompts and outputs of about 4-20 tokens) and a 4 MiB KV cache keep this fast.
SMALL = ["--length-scale", "0.05", "--kv-cache-memory", str(4 << 20), "--num-warmup-prompts", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("bench") / "tiny"))


def _run(tiny_model: str, out, *extra: str) -> dict:
    argv = ["bench", "throughput", "--model", tiny_model, "--output-json", str(out), *SMALL, *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_w1_with_both_peers_writes_a_complete_report(tiny_model, tmp_path, capsys):
    report = _run(tiny_model, tmp_path / "w1.json", "--workload", "W1", "--num-prompts", "4",
                  "--peers", "hf,hf-cb", "--peer-num-prompts", "2")
    for key in ("workload", "device", "model", "sluice_commit", "date", "engine", "peers", "ratios",
                "roofline_fraction"):
        assert key in report, key
    assert (report["workload"], report["device"], report["model"]) == ("W1", "cpu", tiny_model)
    requests = generate_workload("W1", 384, 4, seed=0, max_model_len=512, length_scale=0.05)
    engine = report["engine"]
    assert engine["num_requests"] == 4
    assert 0 < engine["output_tokens"] <= sum(r.output_len for r in requests)
    assert engine["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in requests)
    assert set(report["peers"]) == {"hf", "hf-cb"}
    # On the CPU hf-cb's KV cache is the engine's size (256-token pages), not a share of host memory.
    kv_tokens = report["num_kv_blocks"] * 16
    assert report["peers"]["hf-cb"]["num_kv_blocks"] == -(-kv_tokens // 256)
    for name, peer in report["peers"].items():
        assert peer["num_requests"] == 2
        assert peer["output_tokens"] == sum(r.output_len for r in requests[:2]), name
        for metric in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
            assert peer[metric] > 0
        assert report["ratios"][name] == pytest.approx(engine["output_tokens_per_s"] / peer["output_tokens_per_s"])
    assert 0 < report["roofline_fraction"] < 1
    table = capsys.readouterr().out
    assert "sluice" in table and "hf-cb" in table and "roofline fraction" in table


def test_engine_ignores_eos_and_end_of_turn_so_every_asked_token_is_produced(tiny_model, tmp_path):
    report = _run(tiny_model, tmp_path / "eos.json", "--workload", "W1", "--num-prompts", "8", "--seed", "3")
    requests = generate_workload("W1", 384, 8, seed=3, max_model_len=512, length_scale=0.05)
    assert report["engine"]["output_tokens"] == sum(r.output_len for r in requests)


def test_w4_runs_prefix_caching_on_and_off(tiny_model, tmp_path):
    report = _run(tiny_model, tmp_path / "w4.json", "--workload", "W4", "--num-prompts", "3",
                  "--length-scale", "0.1", "--max-model-len", "256")
    on, off = report["engine"], report["engine_prefix_caching_off"]
    assert on["enable_prefix_caching"] and not off["enable_prefix_caching"]
    assert on["prefix_cache_hit_rate"] > 0.5  # two of three prompts find the 205-token prefix
    assert off["prefix_cache_hit_rate"] == 0
    assert report["prefix_caching_speedup"] == pytest.approx(off["elapsed_s"] / on["elapsed_s"])
    assert report["peers"] == {} and report["ratios"] == {}


def test_bad_peer_name_fails_before_loading_anything(tiny_model, tmp_path, capsys):
    assert main(["bench", "throughput", "--model", tiny_model, "--peers", "hf,vllm"]) == 1
    assert "peers" in capsys.readouterr().err


def test_l8_without_a_tokenizer_says_which_flag_is_missing(capsys):
    assert main(["bench", "throughput", "--model", "L8", "--num-prompts", "1"]) == 1
    assert "tokenizer" in capsys.readouterr().err


def test_g9_is_the_gemma2_9b_shape_with_alternating_windows(tmp_path):
    from sluice.bench.cli import G9_NAME, resolve_model
    from sluice.config import EngineArgs
    from sluice.models.loader import load_hf_config
    from sluice.models.model_config import hf_kv_sliding_window, hf_layer_sliding_windows
    from sluice.models.registry import get_model_class

    resolved = resolve_model(EngineArgs(model=G9_NAME, tokenizer="any"), str(tmp_path))
    assert resolved.name == "G9" and resolved.engine_args.load_format == "dummy"
    config = load_hf_config(resolved.engine_args.model)
    assert get_model_class(config).__name__ == "Gemma2ForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim, config.vocab_size) == (42, 3584, 256, 256000)
    assert hf_layer_sliding_windows(config)[:2] == [4096, None]
    assert hf_kv_sliding_window(config) is None  # global layers keep every block


def test_q30a3_without_a_tokenizer_says_which_flag_is_missing(capsys):
    assert main(["bench", "throughput", "--model", "Q30A3", "--num-prompts", "1"]) == 1
    err = capsys.readouterr().err
    assert "tokenizer" in err and "Q30A3" in err


def test_compare_runs_the_quantized_and_unquantized_model_on_the_same_requests(tiny_model, tmp_path, capsys):
    report = _run(tiny_model, tmp_path / "cmp.json", "--workload", "W1", "--num-prompts", "3",
                  "--quantization", "rtn", "--compare")
    quantized, unquantized = report["engine"], report["engine_unquantized"]
    assert report["quantization"] == "rtn" and quantized["engine_args"]["quantization"] == "rtn"
    assert (quantized["prompt_tokens"], quantized["output_tokens"]) == (unquantized["prompt_tokens"],
                                                                        unquantized["output_tokens"])
    assert report["quantized_speedup"] == pytest.approx(quantized["output_tokens_per_s"]
                                                        / unquantized["output_tokens_per_s"])
    table = capsys.readouterr().out
    assert "sluice-unquantized" in table and "--quantization rtn vs unquantized" in table


def test_compare_without_quantization_says_what_is_missing(tiny_model, capsys):
    assert main(["bench", "throughput", "--model", tiny_model, "--compare", "--num-prompts", "1"]) == 1
    assert "--compare runs the model with and without --quantization, or structured requests" \
        in capsys.readouterr().err


def test_compare_on_w7_runs_the_requests_unconstrained_at_their_own_and_the_constrained_lengths(tiny_model, tmp_path,
                                                                                              capsys):
    report = _run(tiny_model, tmp_path / "w7.json", "--workload", "W7", "--num-prompts", "3", "--compare")
    constrained, own, matched = (report["engine"], report["engine_unconstrained"],
                                 report["engine_unconstrained_matched"])
    requests = generate_workload("W7", 384, 3, seed=0, max_model_len=512, length_scale=0.05)
    assert report["structured_requests"] == 3
    assert own["output_tokens"] == sum(r.output_len for r in requests)  # ignore_eos: every token asked for
    assert matched["output_tokens"] == constrained["output_tokens"]  # the same tokens: the grammar's cost alone
    assert constrained["prompt_tokens"] == own["prompt_tokens"] == matched["prompt_tokens"]
    assert report["structured_over_unconstrained"] == pytest.approx(constrained["output_tokens_per_s"]
                                                                    / own["output_tokens_per_s"])
    assert report["structured_over_matched"] == pytest.approx(constrained["output_tokens_per_s"]
                                                              / matched["output_tokens_per_s"])
    table = capsys.readouterr().out
    assert "sluice-unconstrained-matched" in table and "structured over unconstrained" in table


def test_fp8_kv_cache_flag_runs_and_is_reported(tiny_model, tmp_path):
    report = _run(tiny_model, tmp_path / "fp8.json", "--workload", "W1", "--num-prompts", "4",
                  "--kv-cache-dtype", "fp8", "--calculate-kv-scales")
    requests = generate_workload("W1", 384, 4, seed=0, max_model_len=512, length_scale=0.05)
    assert report["engine"]["output_tokens"] == sum(r.output_len for r in requests)
    settings = report["engine"]["engine_args"]
    assert settings["kv_cache_dtype"] == "fp8" and settings["calculate_kv_scales"]


def test_warmup_runs_the_bitmask_at_every_row_count_the_kernel_specialises_on():
    from sluice.bench.throughput import warmup_requests

    requests = generate_workload("W7", 384, 40, seed=0, max_model_len=512, structured_fraction=0.5)
    structured = [r for r in requests if r.json_schema is not None]
    warmup = warmup_requests(requests, 4)
    assert [(w.prompt_token_ids, w.output_len) for w in warmup[:4]] == \
        [(r.prompt_token_ids[::-1], min(r.output_len, 8)) for r in requests[:4]]
    extra = warmup[4:]
    assert [w.json_schema for w in extra] == [r.json_schema for r in structured[:16]]
    # Outputs ending one step apart: 16 constrained rows, then 15, ... down to 1.
    assert [w.output_len for w in extra] == list(range(1, 17))
    assert all(w.output_len <= r.output_len for w, r in zip(extra, structured))
    assert len(warmup_requests([r for r in requests if r.json_schema is None], 4)) == 4  # none constrained


def test_a_run_with_swap_space_reports_how_its_preemptions_were_made(tiny_model, tmp_path):
    # W3's long decodes at a few blocks of KV: requests are preempted, and --preemption-mode swap swaps each out.
    argv = ["bench", "throughput", "--model", tiny_model, "--output-json", str(tmp_path / "w3.json"),
            "--length-scale", "0.05", "--num-kv-blocks", "12", "--num-warmup-prompts", "1", "--no-progress",
            "--workload", "W3", "--num-prompts", "6", "--swap-space", "0.01", "--preemption-mode", "swap"]
    assert main(argv) == 0
    engine = json.loads((tmp_path / "w3.json").read_text())["engine"]
    offload = engine["kv_offload"]
    assert engine["num_preemptions"] > 0
    assert offload["num_swapped_preemptions"] == engine["num_preemptions"]
    assert offload["num_recomputed_preemptions"] == 0
    assert offload["swap_out_bytes"] > 0 and offload["swap_in_bytes"] == offload["swap_out_bytes"]
    plain = _run(tiny_model, tmp_path / "w1.json", "--workload", "W1", "--num-prompts", "2")["engine"]
    assert "kv_offload" not in plain

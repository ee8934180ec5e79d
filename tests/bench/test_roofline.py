"""Roofline lower bounds against the hand numbers of docs/benchmarks.md's Limits."""
from __future__ import annotations

import pytest

from sluice.bench.roofline import ModelShape, count_prefill_tokens, workload_roofline

L8 = ModelShape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, dtype_bytes=2)


def test_l8_shape_has_8b_parameters_and_128_kib_of_kv_per_token():
    assert L8.num_params == pytest.approx(8.03e9, rel=1e-3)
    assert L8.kv_bytes_per_token == 128 * 1024


def test_one_decode_step_reading_only_weights_takes_about_5_ms_on_the_h100():
    roofline = workload_roofline(L8, prompt_lens=[1], output_lens=[1], avg_batch=1)
    assert roofline.decode_s == pytest.approx(5.0e-3, rel=0.02)


def test_decode_step_of_256_sequences_at_1k_context_reads_weights_plus_kv():
    # 256 requests each producing one token at context 1024: one step of 15 GB weights + 32 GiB of KV.
    roofline = workload_roofline(L8, prompt_lens=[1024] * 256, output_lens=[1] * 256, avg_batch=256)
    expected = (L8.decode_weight_bytes + 256 * 1024 * L8.kv_bytes_per_token) / 3.0e12
    assert roofline.decode_s == pytest.approx(expected)
    assert 14e-3 < roofline.decode_s < 17e-3


def test_prefill_bound_is_two_flops_per_parameter_per_token_plus_attention():
    roofline = workload_roofline(L8, prompt_lens=[1000], output_lens=[1], avg_batch=1, peak_flops=1e15)
    matmul_s = 2 * L8.matmul_params * 1000 / 1e15
    assert matmul_s < roofline.prefill_s < matmul_s * 1.1


def test_fraction_is_lower_bound_over_measured_time():
    roofline = workload_roofline(L8, prompt_lens=[1], output_lens=[1], avg_batch=1)
    assert roofline.fraction(roofline.lower_bound_s * 4) == pytest.approx(0.25)


def test_prefix_caching_computes_a_shared_prefix_once_and_always_the_last_token():
    prefix = list(range(64))
    prompts = [prefix + [1000 + i] * 16 for i in range(3)]
    assert count_prefill_tokens(prompts, block_size=16, prefix_caching=False) == 3 * 80
    assert count_prefill_tokens(prompts, block_size=16, prefix_caching=True) == 80 + 2 * 16
    repeated = [prefix, prefix]
    assert count_prefill_tokens(repeated, block_size=16, prefix_caching=True) == 64 + 1


def test_a_hit_must_start_at_the_first_block():
    # Same second block after a different first block: the chained hash does not match.
    prompts = [[1] * 16 + [2] * 16, [3] * 16 + [2] * 16]
    assert count_prefill_tokens(prompts, block_size=16, prefix_caching=True) == 64


def test_bad_constants_are_refused():
    with pytest.raises(ValueError, match="avg_batch"):
        workload_roofline(L8, [1], [1], avg_batch=0)


def test_q30a3_shape_has_30_5b_parameters_of_which_3_3b_active(tmp_path):
    from sluice.bench.cli import write_q30a3_config
    from sluice.models.loader import load_hf_config

    shape = ModelShape.from_hf_config(load_hf_config(write_q30a3_config(str(tmp_path))), dtype_bytes=2)
    assert (shape.num_experts, shape.num_experts_per_tok, shape.moe_intermediate_size) == (128, 8, 768)
    assert shape.intermediate_size == 0  # no dense MLP beside the experts
    assert shape.num_params == pytest.approx(30.53e9, rel=1e-3)
    assert shape.matmul_params + shape.vocab_size * shape.hidden_size == pytest.approx(3.35e9, rel=1e-2)


def test_moe_decode_step_reads_the_experts_its_batch_hits():
    moe = ModelShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=0,
                     vocab_size=100, tie_word_embeddings=False, dtype_bytes=2, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=32)
    expert_bytes = 2 * moe.num_layers * moe.expert_params
    assert moe.step_weight_bytes(1) == moe.decode_weight_bytes
    # 4 sequences choosing 2 of 8 experts hit 8 * (1 - (3/4) ** 4) of them on average
    expected_hit = 8 * (1 - 0.75 ** 4)
    assert moe.step_weight_bytes(4) == pytest.approx(moe.decode_weight_bytes + (expected_hit - 2) * expert_bytes)
    assert moe.step_weight_bytes(10_000) == pytest.approx(moe.decode_weight_bytes + 6 * expert_bytes)
    roofline = workload_roofline(moe, prompt_lens=[1] * 4, output_lens=[1] * 4, avg_batch=4)
    assert roofline.decode_s == pytest.approx((moe.step_weight_bytes(4) + 4 * moe.kv_bytes_per_token) / 3.0e12)


def test_moe_bound_sums_each_steps_batch():
    """Experts hit per step are concave in the batch: a run of steps at batch 1 and 255 reads fewer expert
    bytes than 2 steps at their average, 128, so the bound follows the steps the run made."""
    moe = ModelShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=0,
                     vocab_size=100, tie_word_embeddings=False, dtype_bytes=2, num_experts=64, num_experts_per_tok=2,
                     moe_intermediate_size=32)
    per_step = workload_roofline(moe, [1] * 256, [1] * 256, avg_batch=128, decode_batches={1: 1, 255: 1})
    at_average = workload_roofline(moe, [1] * 256, [1] * 256, avg_batch=128)
    kv = (256 * moe.kv_bytes_per_token) / 3.0e12
    assert per_step.decode_s == pytest.approx((moe.step_weight_bytes(1) + moe.step_weight_bytes(255)) / 3.0e12 + kv)
    assert at_average.decode_s == pytest.approx(2 * moe.step_weight_bytes(128) / 3.0e12 + kv)
    assert per_step.decode_s < at_average.decode_s
    dense = ModelShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                       vocab_size=100, tie_word_embeddings=False, dtype_bytes=2)
    assert workload_roofline(dense, [1] * 256, [1] * 256, 128, decode_batches={1: 1, 255: 1}).decode_s == \
        pytest.approx(workload_roofline(dense, [1] * 256, [1] * 256, 128).decode_s)


def test_fp8_kv_cache_halves_the_kv_bytes_of_a_bf16_model():
    import dataclasses

    from sluice.bench.schedule_bound import l8_shape

    bf16 = l8_shape()
    fp8 = dataclasses.replace(bf16, kv_dtype_bytes=1)
    assert fp8.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token
    assert fp8.decode_weight_bytes == bf16.decode_weight_bytes

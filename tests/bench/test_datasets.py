"""Workload generators W1-W4: seeded, with the shapes docs/benchmarks.md documents."""
from __future__ import annotations

import numpy as np
import pytest

from sluice.bench.datasets import FIRST_TOKEN_ID, fit_to_context, generate_workload, shared_prefix_len

VOCAB = 49152


def test_same_seed_gives_same_requests_and_another_seed_differs():
    first = generate_workload("W1", VOCAB, num_prompts=20, seed=0)
    again = generate_workload("W1", VOCAB, num_prompts=20, seed=0)
    other = generate_workload("W1", VOCAB, num_prompts=20, seed=1)
    assert first == again
    assert first != other


def test_w1_lengths_are_clipped_lognormals_with_the_documented_means():
    requests = generate_workload("W1", VOCAB)
    assert len(requests) == 1000
    prompts = np.array([len(r.prompt_token_ids) for r in requests])
    outputs = np.array([r.output_len for r in requests])
    assert prompts.min() >= 4 and prompts.max() <= 1024
    assert outputs.min() >= 4 and (prompts + outputs).max() <= 2048
    assert 190 <= prompts.mean() <= 250  # "mean prompt about 220"
    assert 170 <= outputs.mean() <= 230  # "mean output about 200"


def test_token_ids_avoid_the_special_range_and_cover_the_vocabulary():
    ids = np.concatenate([r.prompt_token_ids for r in generate_workload("W2", 1000, num_prompts=8)])
    assert ids.min() >= FIRST_TOKEN_ID and ids.max() < 1000
    assert len(np.unique(ids)) > 950


def test_w2_is_1024_in_128_out():
    requests = generate_workload("W2", VOCAB, num_prompts=5)
    assert [(len(p), o) for p, o in requests] == [(1024, 128)] * 5


def test_w3_defaults_to_256_requests_uniform_in_100_to_1024():
    requests = generate_workload("W3", VOCAB)
    assert len(requests) == 256
    lengths = [len(r.prompt_token_ids) for r in requests] + [r.output_len for r in requests]
    assert min(lengths) >= 100 and max(lengths) <= 1024
    assert max(lengths) - min(lengths) > 800  # spread over the whole range, not a constant


def test_w4_shares_a_2048_token_prefix_and_keeps_128_unique_tokens_each():
    requests = generate_workload("W4", VOCAB, num_prompts=10)
    assert shared_prefix_len(requests) == 2048
    assert all(len(r.prompt_token_ids) == 2048 + 128 and r.output_len == 128 for r in requests)
    suffixes = {tuple(r.prompt_token_ids[2048:]) for r in requests}
    assert len(suffixes) == 10


@pytest.mark.parametrize("workload", ["W1", "W2", "W3"])
def test_requests_fit_a_short_context(workload):
    for r in generate_workload(workload, VOCAB, num_prompts=200, max_model_len=256):
        assert len(r.prompt_token_ids) + r.output_len <= 256
        assert r.output_len >= 1


def test_w4_shrinks_its_prefix_to_fit_and_refuses_a_context_too_short():
    requests = generate_workload("W4", VOCAB, num_prompts=3, max_model_len=512)
    assert shared_prefix_len(requests) == 512 - 128 - 128
    with pytest.raises(ValueError, match="max_model_len"):
        generate_workload("W4", VOCAB, num_prompts=3, max_model_len=256)
    scaled = generate_workload("W4", VOCAB, num_prompts=3, max_model_len=256, length_scale=0.1)
    assert shared_prefix_len(scaled) == 205


def test_length_scale_shrinks_nominal_lengths():
    assert [(len(p), o) for p, o in generate_workload("W2", VOCAB, num_prompts=1, length_scale=0.125)] == [(128, 16)]


def test_fit_to_context_cuts_the_prompt_first_down_to_half_the_context():
    assert fit_to_context(100, 50, 512) == (100, 50)
    assert fit_to_context(400, 200, 512) == (312, 200)
    assert fit_to_context(1000, 900, 512) == (256, 256)


@pytest.mark.parametrize("kwargs, field", [
    (dict(workload="W9"), "workload"),
    (dict(num_prompts=0), "num_prompts"),
    (dict(vocab_size=5), "vocab_size"),
    (dict(length_scale=0.0), "length_scale"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    args = dict(workload="W1", vocab_size=VOCAB) | kwargs
    with pytest.raises(ValueError, match=field):
        generate_workload(**args)

"""Tensor parallelism on the CPU: two processes over gloo give exactly the single-rank engine's greedy output.

Each engine runs with a 16-token step budget (chunked prefill everywhere), a KV pool small enough to force
preemption, and prefix caching on (the second round hits the cache). The models exercise every sharding
rule: tied embeddings and row-parallel biases (Llama), a vocabulary that does not split evenly and a single
KV head replicated on both ranks (Qwen2), experts split along their intermediate dimension (Qwen2-MoE); with
async scheduling (rank 0 launches a step before collecting the last).
"""
from __future__ import annotations

import random

import pytest

from sluice import LLM, SamplingParams
from tests.engine.test_hf_equivalence import assert_no_leaked_blocks
from tests.tiny_models import hf_greedy, save_tiny_model

MAX_NEW_TOKENS = 6
TIGHT_ENGINE = dict(dtype="float32", device="cpu", max_model_len=128, max_num_batched_tokens=16, block_size=4,
                    num_kv_blocks=20, enable_prefix_caching=True)
MODELS = {
    # 4 heads, 2 KV heads (one per rank); tied embeddings; biases on o_proj and down_proj (row-parallel)
    "llama": dict(arch="llama", tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    # 6 heads, 1 KV head (replicated on both ranks); vocab 383 (rank 1's last row is padding); qkv bias
    "qwen2_one_kv_head": dict(arch="qwen2", num_key_value_heads=1, vocab_size=383),
    # experts split along their intermediate dimension, a shared expert, a dense layer (mlp_only_layers)
    "qwen2_moe": dict(arch="qwen2_moe", num_key_value_heads=2),
}


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 383) for _ in range(n)] for n in (1, 17, 33)]
    shared = [rng.randrange(4, 383) for _ in range(24)]
    return prompts + [shared + [rng.randrange(4, 383) for _ in range(k)] for k in (2, 11)]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module", params=list(MODELS))
def tiny_model(request, tmp_path_factory):
    spec = dict(MODELS[request.param])
    path = save_tiny_model(tmp_path_factory.mktemp(request.param), spec.pop("arch"), **spec)
    prompts = _prompts()
    return path, prompts, hf_greedy(path, prompts, MAX_NEW_TOKENS)


def test_two_ranks_match_one_rank_and_transformers(tiny_model):
    path, prompts, expected = tiny_model
    single = LLM(model=str(path), **TIGHT_ENGINE)
    single_rank = _greedy(single, prompts)
    assert single_rank == expected
    llm = LLM(model=str(path), tensor_parallel_size=2, async_scheduling=True, **TIGHT_ENGINE)
    try:
        core = llm.llm_engine.core
        assert core.runner.kv_spec.num_kv_heads == max(1, single.llm_engine.core.runner.kv_spec.num_kv_heads // 2)
        for _ in range(2):  # the second round hits the prefix cache
            assert _greedy(llm, prompts) == expected
            assert_no_leaked_blocks(llm)
        stats = core.make_stats()
        assert stats.num_preemptions > 0
        assert stats.prefix_cache_hits > 0
        assert_random_samples_are_every_ranks_tokens(llm, single, prompts[:3])
    finally:
        llm.llm_engine.shutdown()


def assert_random_samples_are_every_ranks_tokens(llm: LLM, single: LLM, prompts: list[list[int]]) -> None:
    """Unseeded sampling draws differently on each rank's RNG; every rank must still go on from rank 0's tokens.
    A rank that appended its own draw would compute K/V of other tokens: the logprobs rank 0 reports for its
    samples would then differ from the single-rank engine's prompt logprobs of the same sequences."""
    params = SamplingParams(temperature=1.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    check = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    for prompt, output in zip(prompts, outputs):
        sampled = output.outputs[0]
        reference = single.generate([{"prompt_token_ids": prompt + sampled.token_ids}], check, use_tqdm=False)[0]
        for i, (token_id, logprobs) in enumerate(zip(sampled.token_ids, sampled.logprobs)):
            expected = reference.prompt_logprobs[len(prompt) + i][token_id].logprob
            assert logprobs[token_id].logprob == pytest.approx(expected, abs=1e-4)


def test_four_ranks_match_one_rank(tmp_path):
    """TP=4: 8 heads (2 per rank) over 2 KV heads, each KV head replicated on two ranks; vocab 383 split in four
    with padding on the last rank."""
    path = save_tiny_model(tmp_path / "llama4", "llama", num_attention_heads=8, num_key_value_heads=2,
                           hidden_size=128, vocab_size=383)
    prompts = _prompts(seed=1)
    expected = _greedy(LLM(model=str(path), **TIGHT_ENGINE), prompts)
    assert expected == hf_greedy(path, prompts, MAX_NEW_TOKENS)
    llm = LLM(model=str(path), tensor_parallel_size=4, **TIGHT_ENGINE)
    try:
        assert llm.llm_engine.core.runner.kv_spec.num_kv_heads == 1
        assert _greedy(llm, prompts) == expected
        assert_no_leaked_blocks(llm)
    finally:
        llm.llm_engine.shutdown()

"""Greedy sluice output equals transformers' generate token for token (float32, CPU).

Exercised under prefix caching on and off, a 16-token step budget (chunked prefill
everywhere), a KV pool so small that requests must be preempted, shared prefixes, and
async scheduling (steps scheduled before the previous samples are known).
After every run, every KV block is back in the pool.
"""
from __future__ import annotations

import random

import pytest

from sluice import LLM, SamplingParams
from tests.tiny_models import hf_greedy, save_tiny_model

MAX_NEW_TOKENS = 12


def _prompts(vocab_size: int = 384, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 7, 16, 17, 31, 40, 64, 5, 23]
    prompts = [[rng.randrange(4, vocab_size) for _ in range(n)] for n in lengths]
    shared = [rng.randrange(4, vocab_size) for _ in range(48)]
    prompts += [shared + [rng.randrange(4, vocab_size) for _ in range(k)] for k in (1, 9, 16)]
    return prompts


# Mixture of experts: 2 of 6 experts per token (Mixtral, renormalized), 4 of 8 plus a shared expert
# (Qwen2-MoE, not renormalized, layer 1 dense), 3 of 8 (Qwen3-MoE, renormalized).
@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe"])
def tiny_model(request, tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    prompts = _prompts()
    return path, prompts, hf_greedy(path, prompts, MAX_NEW_TOKENS)


def assert_no_leaked_blocks(llm: LLM) -> None:
    kv_manager = llm.llm_engine.core.scheduler.kv_cache_manager
    pool = kv_manager.block_pool
    assert not llm.llm_engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks
    assert all(block.ref_cnt == 0 for block in pool.blocks)


ENGINE_CONFIGS = {
    "prefix_caching_on": dict(enable_prefix_caching=True),
    "prefix_caching_off": dict(enable_prefix_caching=False),
    "chunked_prefill_budget_16": dict(max_num_batched_tokens=16),
    "forced_preemption": dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=32),
    "preemption_without_prefix_cache": dict(num_kv_blocks=24, block_size=4, enable_prefix_caching=False),
    # Async scheduling: each step is scheduled before the previous one's samples are back.
    "async_chunked_prefill_budget_16": dict(async_scheduling=True, max_num_batched_tokens=16),
    "async_forced_preemption": dict(async_scheduling=True, num_kv_blocks=24, block_size=4, max_num_batched_tokens=32),
    "async_preemption_without_prefix_cache": dict(async_scheduling=True, num_kv_blocks=24, block_size=4,
                                                  enable_prefix_caching=False),
}


@pytest.mark.parametrize("config_name", list(ENGINE_CONFIGS))
def test_greedy_matches_transformers(tiny_model, config_name):
    path, prompts, expected = tiny_model
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, **ENGINE_CONFIGS[config_name])
    # Twice: the second round hits the prefix cache for every prompt when it is on.
    assert_greedy_rounds_match(llm, prompts, expected, config_name, rounds=2)


def assert_greedy_rounds_match(llm: LLM, prompts: list[list[int]], expected: list[list[int]],
                               config_name: str, rounds: int) -> None:
    """``rounds`` greedy runs of ``prompts`` each give ``expected`` and leak no block; the engine config
    named ``config_name`` did what it is for (preempted, or hit the prefix cache)."""
    params = SamplingParams(temperature=0.0, max_tokens=len(expected[0]), ignore_eos=True)
    for _ in range(rounds):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for prompt, output, want in zip(prompts, outputs, expected):
            assert output.prompt_token_ids == prompt
            assert output.outputs[0].token_ids == want, f"prompt of {len(prompt)} tokens diverged"
            assert output.outputs[0].finish_reason == "length"
        assert_no_leaked_blocks(llm)
    stats = llm.llm_engine.core.make_stats()
    if "preemption" in config_name:
        assert stats.num_preemptions > 0
    if config_name == "prefix_caching_on":
        assert stats.prefix_cache_hits > 0

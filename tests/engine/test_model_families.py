"""Greedy sluice output equals transformers' generate token for token (float32, CPU) for the families
and rope types added after Llama: Gemma 2, Gemma 3 (text), Phi-3 with longrope, Mistral with a sliding
window shorter than the prompts, and Llama with yarn, dynamic and linear rope scaling.

Prompts stay below the length where dynamic frequencies change and generation crosses it (what
transformers computes per generated token); longrope runs on either side of its original length
(see sluice/layers/rope_scaling.py); windows (8 tokens) are shorter than most prompts. Each model runs with prefix caching (twice, so the second
round hits), a 16-token budget (chunked prefill), forced preemption, and async scheduling with
preemption; every KV block is back in the pool after every round. A windowed model also runs a
generation 4x longer than its KV pool could hold without freeing blocks behind the window.
"""
from __future__ import annotations

import random

import pytest

from sluice import LLM, SamplingParams
from tests.engine.test_hf_equivalence import assert_greedy_rounds_match, assert_no_leaked_blocks
from tests.tiny_models import hf_greedy, save_tiny_model

MAX_NEW_TOKENS = 12

# name -> (tiny_config family, overrides)
FAMILIES = {
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3", {}),
    # longrope's factor set follows max_model_len (64): short below an original length of 64, long above 4
    "phi3_longrope_short": ("phi3", {"original_max_position_embeddings": 64}),
    "phi3_longrope_long": ("phi3", {"original_max_position_embeddings": 4}),
    "mistral_sliding_window_8": ("mistral", {"sliding_window": 8}),
    "llama_yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 16}}),
    "llama_dynamic": ("llama", {"max_position_embeddings": 32,
                                "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}),
    "llama_linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0}}),
}

ENGINE_CONFIGS = {
    "prefix_caching_on": dict(enable_prefix_caching=True),
    "chunked_prefill_budget_16": dict(max_num_batched_tokens=16, enable_prefix_caching=False),
    "forced_preemption": dict(num_kv_blocks=12, block_size=4, max_num_batched_tokens=32),
    "async_forced_preemption": dict(async_scheduling=True, num_kv_blocks=12, block_size=4,
                                    max_num_batched_tokens=32),
}


def _prompts(vocab_size: int = 384, seed: int = 0) -> list[list[int]]:
    """5 to 31 tokens: below dynamic rope's max_position_embeddings (32), above longrope's 4."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab_size) for _ in range(n)] for n in (5, 7, 16, 17, 23, 31)]
    shared = [rng.randrange(4, vocab_size) for _ in range(20)]
    return prompts + [shared + [rng.randrange(4, vocab_size) for _ in range(k)] for k in (1, 5, 9)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    arch, overrides = FAMILIES[request.param]
    path = save_tiny_model(tmp_path_factory.mktemp(request.param), arch, **overrides)
    prompts = _prompts()
    return path, prompts, hf_greedy(path, prompts, MAX_NEW_TOKENS)


@pytest.mark.parametrize("config_name", list(ENGINE_CONFIGS))
def test_greedy_matches_transformers(family_model, config_name):
    path, prompts, expected = family_model
    config = dict(ENGINE_CONFIGS[config_name])
    if family_model_is_hybrid(path) and "num_kv_blocks" in config:
        config["num_kv_blocks"] *= 3  # the same bytes: a block of the tiny Gemmas is one layer group (1 of 3 layers)
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=64, **config)
    assert_greedy_rounds_match(llm, prompts, expected, config_name,
                               rounds=2 if config_name == "prefix_caching_on" else 1)


def family_model_is_hybrid(path) -> bool:
    import json
    layer_types = json.loads((path / "config.json").read_text()).get("layer_types") or []
    return len(set(layer_types)) > 1


def test_windowed_model_generates_past_what_its_kv_pool_could_hold(tmp_path):
    """Mistral, window 8, a pool of 6 blocks of 4 (24 slots): 100 tokens of context, the same tokens as
    transformers, and never more than a window plus a chunk of blocks in use."""
    path = save_tiny_model(tmp_path, "mistral", sliding_window=8, max_position_embeddings=256)
    prompt = [5 + (7 * i) % 300 for i in range(10)]
    [expected] = hf_greedy(path, [prompt], 90)
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, num_kv_blocks=6, block_size=4,
              max_num_batched_tokens=8, enable_prefix_caching=True)
    tokens, max_live = generate_watching_blocks(llm, prompt, 90)
    assert tokens == expected
    assert max_live <= 5  # cdiv(window 8 + chunk 8, 4) + 1
    assert llm.llm_engine.core.make_stats().num_preemptions == 0
    assert_no_leaked_blocks(llm)


def generate_watching_blocks(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], int]:
    """Greedy tokens of one request, stepped by hand, and the most blocks it held after any step."""
    engine = llm.llm_engine
    engine.add_request("long", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    manager = engine.core.scheduler.kv_cache_manager
    tokens, max_live = [], 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens = output.outputs[0].token_ids
        if "long" in manager.req_to_blocks:
            max_live = max(max_live, manager.num_live_blocks("long"))
    return tokens, max_live

"""Models mixing sliding-window and global layers (Gemma 2: alternating, Gemma 3: five windowed to one global)
run with one block table per layer group: greedy output equals transformers' generate token for token (float32,
CPU) with a window (8) much shorter than prompts + outputs, with prefix caching (hits checked), 16-token chunks,
forced preemption, and async scheduling; no block leaks; a request's windowed groups hold a bounded number of
blocks however long its context, and its whole footprint stays well below keeping every layer's KV."""
from __future__ import annotations

import random

import pytest

from sluice import LLM, SamplingParams
from sluice.core.hybrid_kv_manager import HybridKVCacheManager
from tests.engine.test_hf_equivalence import assert_greedy_rounds_match, assert_no_leaked_blocks
from tests.tiny_models import hf_greedy, save_tiny_model

S, F = "sliding_attention", "full_attention"
WINDOW, BLOCK_SIZE, CHUNK = 8, 4, 16
MAX_NEW_TOKENS = 30
# Live blocks of a windowed group: the window and one chunk, plus a partly filled block at each end.
MAX_WINDOW_BLOCKS = -(-(WINDOW + CHUNK) // BLOCK_SIZE) + 1

FAMILIES = {  # name -> (tiny_config family, layer types, layers per group)
    "gemma2": ("gemma2", [S, F, S, F], 2),
    "gemma3": ("gemma3", [S, S, S, S, S, F], 1),
}

ENGINE_CONFIGS = {  # num_kv_blocks: blocks of one layer group, so sized per family (times its group count)
    "prefix_caching_on": dict(enable_prefix_caching=True),
    "chunked_prefill_budget_16": dict(max_num_batched_tokens=CHUNK, block_size=BLOCK_SIZE),
    "forced_preemption": dict(blocks_per_group=20, block_size=BLOCK_SIZE, max_num_batched_tokens=CHUNK),
    "async_forced_preemption": dict(async_scheduling=True, blocks_per_group=20, block_size=BLOCK_SIZE,
                                    max_num_batched_tokens=CHUNK),
}


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(4, 384) for _ in range(24)]
    return ([[rng.randrange(4, 384) for _ in range(n)] for n in (9, 30, 47)]
            + [shared + [rng.randrange(4, 384) for _ in range(k)] for k in (3, 11)])


def _save(tmp_path, family: str):
    arch, layer_types, _ = FAMILIES[family]
    return save_tiny_model(tmp_path, arch, num_hidden_layers=len(layer_types), layer_types=layer_types,
                           sliding_window=WINDOW)


@pytest.fixture(scope="module", params=list(FAMILIES))
def hybrid_model(request, tmp_path_factory):
    path = _save(tmp_path_factory.mktemp(request.param), request.param)
    prompts = _prompts()
    return request.param, path, prompts, hf_greedy(path, prompts, MAX_NEW_TOKENS)


@pytest.mark.parametrize("config_name", list(ENGINE_CONFIGS))
def test_greedy_matches_transformers_past_the_window(hybrid_model, config_name):
    family, path, prompts, expected = hybrid_model
    config = dict(ENGINE_CONFIGS[config_name])
    if "blocks_per_group" in config:
        _, layer_types, group_size = FAMILIES[family]
        config["num_kv_blocks"] = config.pop("blocks_per_group") * len(layer_types) // group_size
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, **config)
    assert isinstance(llm.llm_engine.core.scheduler.kv_cache_manager, HybridKVCacheManager)
    assert_greedy_rounds_match(llm, prompts, expected, config_name,
                               rounds=2 if config_name == "prefix_caching_on" else 1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_windowed_groups_stay_bounded_while_the_context_grows(tmp_path, family):
    _, layer_types, group_size = FAMILIES[family]
    path = _save(tmp_path, family)
    prompt = [5 + (7 * i) % 300 for i in range(20)]
    [expected] = hf_greedy(path, [prompt], 100)
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, block_size=BLOCK_SIZE,
              max_num_batched_tokens=CHUNK, enable_prefix_caching=True)
    engine = llm.llm_engine
    manager = engine.core.scheduler.kv_cache_manager
    windowed = [i for i, group in enumerate(manager.groups) if group.sliding_window is not None]
    engine.add_request("long", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    tokens, max_window_blocks, last_live = [], 0, []
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens = output.outputs[0].token_ids
        if "long" in manager.managers[0].req_to_blocks:
            last_live = manager.num_live_blocks("long")
            max_window_blocks = max([max_window_blocks] + [last_live[i] for i in windowed])
    assert tokens == expected
    assert max_window_blocks <= MAX_WINDOW_BLOCKS
    # Layer-blocks held at the end (119 tokens of KV) against every layer keeping every block.
    keep_everything = -(-119 // BLOCK_SIZE) * len(layer_types)
    held = sum(last_live) * group_size
    assert held < 0.65 * keep_everything if family == "gemma2" else held < 0.4 * keep_everything
    assert_no_leaked_blocks(llm)


@pytest.mark.parametrize("option", [dict(swap_space=1), dict(kv_offload_space=1)])
def test_swap_and_the_host_tier_are_refused_in_one_line(tmp_path, option):
    with pytest.raises(ValueError, match="swap_space / kv_offload_space: models mixing sliding-window"):
        LLM(model=str(_save(tmp_path, "gemma2")), dtype="float32", device="cpu", max_model_len=128, **option)

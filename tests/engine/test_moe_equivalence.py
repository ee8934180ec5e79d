"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE): sluice greedy equals transformers'
generate token for token in float32 on CPU, with prefix caching, chunked prefill and forced
preemption (sync and async scheduling); every KV block is back in the pool after each run.

The tiny models route each token to 2 of 6 (Mixtral, renormalized), 4 of 8 plus a shared expert
(Qwen2-MoE, not renormalized, layer 1 dense) and 3 of 8 (Qwen3-MoE, renormalized) experts.
"""
from __future__ import annotations

import pytest

from sluice import LLM, SamplingParams
from tests.engine.test_hf_equivalence import ENGINE_CONFIGS, MAX_NEW_TOKENS, _prompts, assert_no_leaked_blocks
from tests.tiny_models import hf_greedy, save_tiny_model

@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe"])
def tiny_moe_model(request, tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    prompts = _prompts()
    return path, prompts, hf_greedy(path, prompts, MAX_NEW_TOKENS)


@pytest.mark.parametrize("config_name", list(ENGINE_CONFIGS))
def test_moe_greedy_matches_transformers(tiny_moe_model, config_name):
    path, prompts, expected = tiny_moe_model
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, **ENGINE_CONFIGS[config_name])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    for _ in range(2):  # the second round hits the prefix cache where it is on
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for prompt, output, want in zip(prompts, outputs, expected):
            assert output.outputs[0].token_ids == want, f"prompt of {len(prompt)} tokens diverged"
        assert_no_leaked_blocks(llm)
    stats = llm.llm_engine.core.make_stats()
    if "preemption" in config_name:
        assert stats.num_preemptions > 0
    if config_name == "prefix_caching_on":
        assert stats.prefix_cache_hits > 0

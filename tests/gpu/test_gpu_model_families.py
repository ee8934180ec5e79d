"""On CUDA (float32, CUDA graphs on): Gemma 2, Gemma 3, Phi-3 (longrope), windowed Mistral and Llama with
yarn / dynamic / linear rope give transformers' greedy tokens, with chunked prefill, prefix caching
and preemption; a windowed model runs past its pool's size with its blocks bounded. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from sluice import LLM, SamplingParams
from tests.engine.test_hf_equivalence import assert_no_leaked_blocks
from tests.engine.test_model_families import FAMILIES, MAX_NEW_TOKENS, _prompts, generate_watching_blocks
from tests.tiny_models import hf_greedy, save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cuda_greedy_matches_transformers(name, tmp_path):
    arch, overrides = FAMILIES[name]
    if arch == "gemma2":
        # Gemma 2's own caps: the CPU tests' caps of 2 and 3 squeeze a tiny model's 320 logits into
        # near-ties that float32 rounding on another device can flip (soft-capping at low caps is checked
        # against the CPU reference in test_triton_window_softcap and test_models_cuda).
        overrides = {**overrides, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    path = save_tiny_model(tmp_path, arch, **overrides)
    prompts = _prompts()
    expected = hf_greedy(path, prompts, MAX_NEW_TOKENS)
    llm = LLM(model=str(path), dtype="float32", device="cuda", max_model_len=64, block_size=16,
              max_num_batched_tokens=32, num_kv_blocks=12, enable_prefix_caching=True)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    for _ in range(2):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for prompt, output, want in zip(prompts, outputs, expected):
            assert output.outputs[0].token_ids == want, f"prompt of {len(prompt)} tokens diverged"
        assert_no_leaked_blocks(llm)


def test_cuda_windowed_model_runs_past_its_pool_with_bounded_blocks(tmp_path):
    path = save_tiny_model(tmp_path, "mistral", sliding_window=8, max_position_embeddings=512)
    prompt = [5 + (7 * i) % 300 for i in range(10)]
    [expected] = hf_greedy(path, [prompt], 300)
    llm = LLM(model=str(path), dtype="float32", device="cuda", max_model_len=400, num_kv_blocks=6, block_size=4,
              max_num_batched_tokens=8, max_num_seqs=4)
    tokens, max_live = generate_watching_blocks(llm, prompt, 300)
    assert tokens == expected
    assert max_live <= 5
    assert_no_leaked_blocks(llm)

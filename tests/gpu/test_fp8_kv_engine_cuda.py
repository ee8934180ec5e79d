"""--kv-cache-dtype fp8 on CUDA: the engine with CUDA graphs gives the tokens of the CPU path over an fp8 cache
(tiny random model, float32), and calculated scales under graphs keep a trained model's first tokens (bfloat16).
Skipped without CUDA or on GPUs older than compute capability 8.9."""
from __future__ import annotations

import pytest
import torch

from sluice import LLM
from sluice.attention.kv_quant import FP8_KV_DTYPE
from sluice.layers.attention import Attention
from tests.gpu.test_gpu_engine import (BF16_TOKENS, ENGINE_ARGS, _assert_no_leaked_blocks, _cuda_llm, _generate,
                                       _params, _prompts, model_path, trained_cpu_reference,  # noqa: F401 (fixtures)
                                       trained_model_path)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                                 reason="fp8 KV needs compute capability 8.9+")]


@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["cuda_graphs", "eager"])
def test_fp8_kv_greedy_agrees_with_the_cpu_fp8_path(model_path, cuda_graphs):
    prompts = _prompts()
    params = _params(prompts, 40)
    cpu = LLM(model=model_path, dtype="float32", device="cpu", kv_cache_dtype="fp8", **ENGINE_ARGS)
    expected = _generate(cpu, prompts, params)
    llm = _cuda_llm(model_path, "float32", cuda_graphs, kv_cache_dtype="fp8")
    assert all(kv.dtype == FP8_KV_DTYPE for kv in llm.llm_engine.core.runner.kv_caches)
    for _ in range(2):  # the second round hits the prefix cache
        got = _generate(llm, prompts, params)
        # float32 K/V differ between CPU and GPU in the last bits; one may round to another float8 value
        agree = sum(have == want for have, want in zip(got, expected))
        assert agree >= len(prompts) - 2, f"only {agree} of {len(prompts)} prompts agree"
        _assert_no_leaked_blocks(llm)


def test_calculated_scales_under_cuda_graphs_keep_first_tokens(trained_model_path, trained_cpu_reference):
    prompts, expected = trained_cpu_reference
    llm = _cuda_llm(trained_model_path, "bfloat16", cuda_graphs=True, kv_cache_dtype="fp8", calculate_kv_scales=True)
    got = _generate(llm, prompts, _params(prompts, 40))
    scales = [m.kv_scales for m in llm.llm_engine.core.runner.model.modules() if isinstance(m, Attention)]
    assert all(s.device.type == "cuda" and (s != 1.0).all() for s in scales)
    agree = sum(have[:BF16_TOKENS] == want[:BF16_TOKENS] for have, want in zip(got, expected))
    assert agree >= 0.75 * len(prompts), f"only {agree} of {len(prompts)} prompts agree on {BF16_TOKENS} tokens"
    _assert_no_leaked_blocks(llm)

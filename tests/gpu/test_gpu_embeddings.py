"""Embeddings on CUDA equal transformers' pooled hidden states (float32: 1e-4; bfloat16: cosine > 0.999), with
CUDA graphs, async scheduling (the CUDA default), chunked prefill, prefix caching and forced preemption; every
KV block back in the pool. Skipped without CUDA."""
from __future__ import annotations

import random

import pytest
import torch

from sluice import LLM
from tests.pooling.embedding_models import hf_embeddings, save_embedding_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ENGINES = {"chunked_prefix_cached": dict(max_num_batched_tokens=64, enable_prefix_caching=True),
           "forced_preemption": dict(num_kv_blocks=12, block_size=16, max_num_batched_tokens=64,
                                     long_prefill_token_threshold=16)}


def _prompts(vocab_size: int = 384) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(4, vocab_size) for _ in range(n)] for n in (1, 3, 16, 17, 40, 64, 90, 130)]
    shared = [rng.randrange(4, vocab_size) for _ in range(48)]
    return prompts + [shared + [rng.randrange(4, vocab_size) for _ in range(k)] for k in (1, 9, 16)]


@pytest.fixture(scope="module", params=[("qwen3", "LAST"), ("llama", "MEAN"), ("qwen3", "CLS")],
                ids=lambda p: f"{p[0]}_{p[1]}")
def model(request, tmp_path_factory):
    arch, pooling = request.param
    path = save_embedding_model(tmp_path_factory.mktemp(f"{arch}-{pooling}"), arch, pooling)
    prompts = _prompts()
    return path, prompts, hf_embeddings(path, prompts, pooling, normalize=True)


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_embeddings_match_transformers(model, engine, dtype):
    path, prompts, expected = model
    llm = LLM(model=str(path), device="cuda", dtype=dtype, max_model_len=256, max_num_seqs=16, **ENGINES[engine])
    for _ in range(2):
        outputs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        for output, want in zip(outputs, expected):
            got = torch.tensor(output.outputs.embedding)
            if dtype == "float32":
                torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            else:
                assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.999
        pool = llm.llm_engine.core.scheduler.kv_cache_manager.block_pool
        assert pool.num_free_blocks == pool.num_blocks and all(b.ref_cnt == 0 for b in pool.blocks)
    if engine == "forced_preemption":
        assert llm.llm_engine.core.make_stats().num_preemptions > 0

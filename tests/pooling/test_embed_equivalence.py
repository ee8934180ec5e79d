"""LLM.embed equals transformers' pooled (and normalized) final hidden states within 1e-5 (float32, CPU).

Under a 16-token step budget (every long prompt prefills in chunks), a KV pool small enough to force
preemptions, prefix caching on (last-token pooling reuses shared prefixes; mean pooling must not), and
async scheduling. Both checkpoint layouts (a bare ``Qwen3Model`` saved the sentence-transformers 6 way,
a Llama ``ForCausalLM`` with the legacy files). After every run every KV block is back in the pool.
"""
from __future__ import annotations

import random

import pytest
import torch

from sluice import LLM
from sluice.pooling import PoolingParams
from tests.engine.test_hf_equivalence import assert_no_leaked_blocks
from tests.pooling.embedding_models import hf_embeddings, save_embedding_model, st_embeddings

TEXTS = ["The quick brown fox jumps over the lazy dog.", "hello",
         "Paged attention keeps the KV cache in fixed-size blocks. " * 3,
         "Continuous batching schedules every iteration under a token budget. " * 2]
# (arch, pooling, normalize, legacy layout)
MODELS = {"qwen3_last": ("qwen3", "LAST", True, False), "llama_mean": ("llama", "MEAN", True, True),
          "qwen3_cls_unnormalized": ("qwen3", "CLS", False, True)}
ENGINES = {
    "chunked_prefill_budget_16_prefix_caching": dict(max_num_batched_tokens=16, enable_prefix_caching=True),
    # 4-token chunks of many prompts at once outgrow 20 blocks: running requests preempt each other.
    "forced_preemption": dict(num_kv_blocks=20, block_size=4, max_num_batched_tokens=32,
                              long_prefill_token_threshold=4),
    "async_forced_preemption": dict(async_scheduling=True, num_kv_blocks=20, block_size=4,
                                    max_num_batched_tokens=16, long_prefill_token_threshold=4),
}


def _token_prompts(vocab_size: int = 384, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab_size) for _ in range(n)] for n in (1, 7, 16, 17, 40, 64)]
    shared = [rng.randrange(4, vocab_size) for _ in range(32)]
    return prompts + [shared + [rng.randrange(4, vocab_size) for _ in range(k)] for k in (1, 9)]


@pytest.fixture(scope="module", params=list(MODELS))
def embedding_model(request, tmp_path_factory):
    arch, pooling, normalize, legacy = MODELS[request.param]
    path = save_embedding_model(tmp_path_factory.mktemp(request.param), arch, pooling, normalize, legacy)
    prompts = _token_prompts()
    return path, pooling, prompts, hf_embeddings(path, prompts, pooling, normalize)


def _assert_close(got: list[float], want: torch.Tensor) -> None:
    got = torch.tensor(got)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# Each model under the engines that matter for its pooling (CLS is MEAN's bookkeeping with one position).
CASES = {"qwen3_last": list(ENGINES),
         "llama_mean": ["chunked_prefill_budget_16_prefix_caching", "async_forced_preemption"],
         "qwen3_cls_unnormalized": ["async_forced_preemption"]}


@pytest.mark.parametrize("embedding_model, engine", [(m, e) for m, engines in CASES.items() for e in engines],
                         indirect=["embedding_model"])
def test_embeddings_match_transformers(embedding_model, engine):
    path, pooling, prompts, expected = embedding_model
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, **ENGINES[engine])
    for _ in range(2):  # the second round hits the prefix cache (last-token pooling only)
        outputs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        for prompt, output, want in zip(prompts, outputs, expected):
            assert output.finished and output.prompt_token_ids == prompt
            _assert_close(output.outputs.embedding, want)
        assert_no_leaked_blocks(llm)
    stats = llm.llm_engine.core.make_stats()
    if "preemption" in engine:
        assert stats.num_preemptions > 0
    if pooling == "LAST" and "prefix_caching" in engine:
        assert stats.prefix_cache_hits > 0
    if pooling != "LAST":
        assert stats.prefix_cache_hits == 0 and not llm.llm_engine.config.cache.enable_prefix_caching


def test_text_embeddings_match_sentence_transformers(embedding_model):
    pytest.importorskip("sentence_transformers")
    path, _, _, _ = embedding_model
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, max_num_batched_tokens=16)
    for output, want in zip(llm.embed(TEXTS, use_tqdm=False), st_embeddings(path, TEXTS)):
        _assert_close(output.outputs.embedding, want)


def test_dimensions_and_normalize_are_per_request(tmp_path):
    path = save_embedding_model(tmp_path / "m", "qwen3", "LAST", normalize=True, is_matryoshka=True)
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=64)
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}
    raw = torch.tensor(llm.embed(prompt, PoolingParams(normalize=False), use_tqdm=False)[0].outputs.embedding)
    full, short = llm.embed([prompt, prompt], [PoolingParams(), PoolingParams(dimensions=8)], use_tqdm=False)
    _assert_close(full.outputs.embedding, torch.nn.functional.normalize(raw, dim=-1))
    _assert_close(short.outputs.embedding, torch.nn.functional.normalize(raw[:8], dim=-1))
    encoded = llm.encode(prompt, use_tqdm=False)[0]
    assert encoded.outputs.data.dtype == torch.float32 and encoded.outputs.data.shape == (96,)
    truncated = llm.embed({"prompt_token_ids": [9, 9, 5, 6, 7, 8]}, truncate_prompt_tokens=4, use_tqdm=False)[0]
    assert truncated.prompt_token_ids == [5, 6, 7, 8]
    _assert_close(truncated.outputs.embedding, torch.tensor(full.outputs.embedding))


def test_embedding_and_generation_engines_refuse_each_others_requests(tmp_path):
    from sluice import SamplingParams
    from tests.tiny_models import save_tiny_model

    embedder = LLM(model=str(save_embedding_model(tmp_path / "e", "qwen3", "LAST")), device="cpu", max_model_len=64)
    with pytest.raises(ValueError, match="embedding model .*does not generate"):
        embedder.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions: .*does not support Matryoshka"):
        embedder.embed("hello", PoolingParams(dimensions=8), use_tqdm=False)
    assert_no_leaked_blocks(embedder)
    generator = LLM(model=str(save_tiny_model(tmp_path / "g", "llama")), device="cpu", max_model_len=64)
    with pytest.raises(ValueError, match="generation model: embeddings need a pooling model"):
        generator.embed("hello", use_tqdm=False)
    assert_no_leaked_blocks(generator)

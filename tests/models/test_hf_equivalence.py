"""sluice's Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 / Phi-3 and the mixture-of-experts families
(Mixtral, Qwen2-MoE, Qwen3-MoE) give the same logits as transformers on the same weights.

Each case saves a tiny random HF model (weights widened, norms and biases randomized so a swapped
or dropped tensor shows), loads it through sluice's loader in float32 on CPU and compares logits:
one prompt in one go, the same prompt in chunks through the paged KV cache, and a packed batch.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice.attention.torch_ref import TorchRefBackend
from sluice.layers.attention import bind_kv_cache
from sluice.models.loader import build_model, iterate_safetensors, load_hf_config
from tests.models.paged_batch import StepRequest, allocate_kv_caches, build_step, scrambled_block_ids
from tests.tiny_models import tiny_config

BLOCK_SIZE = 4
NUM_BLOCKS = 48
ATOL = RTOL = 1e-4

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (family, config overrides, save_pretrained kwargs)
CASES: dict[str, tuple[str, dict, dict]] = {
    "llama": ("llama", {}, {}),
    "mistral": ("mistral", {}, {}),
    "qwen2": ("qwen2", {}, {}),
    "qwen3_explicit_head_dim": ("qwen3", {"head_dim": 24}, {}),
    "mixtral": ("mixtral", {}, {}),
    "qwen2_moe_shared_expert": ("qwen2_moe", {}, {}),
    "qwen3_moe": ("qwen3_moe", {}, {}),
    "llama_tied_embeddings": ("llama", {"tie_word_embeddings": True}, {}),
    "llama_llama3_rope": ("llama", {"rope_parameters": LLAMA3_ROPE}, {}),
    "llama_biases_and_head_dim": ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 24}, {}),
    "llama_sharded": ("llama", {}, {"max_shard_size": "100KB"}),
    "mistral_sliding_window_6": ("mistral", {"sliding_window": 6}, {}),
    "gemma2": ("gemma2", {}, {}),
    "gemma3_text": ("gemma3", {}, {}),
    # longrope: short factors (max_position_embeddings = original length), long factors (every prompt
    # is longer than the original 2 positions, so transformers uses them too)
    "phi3_longrope_short": ("phi3", {"max_position_embeddings": 32}, {}),
    "phi3_longrope_long": ("phi3", {"original_max_position_embeddings": 2}, {}),
    "llama_yarn_rope": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "original_max_position_embeddings": 8}}, {}),
    "llama_linear_rope": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                        "factor": 2.0}}, {}),
}


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.08)
            elif name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:  # biases
                param.normal_(0.0, 0.05)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory) -> tuple[torch.nn.Module, torch.nn.Module, Path]:
    """(HF model, sluice model, checkpoint folder) for one case."""
    family, overrides, save_kwargs = CASES[request.param]
    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32).eval()
    _randomize(hf_model)
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder, **save_kwargs)
    hf_config = load_hf_config(folder)
    model = build_model(hf_config, torch.float32, torch.device("cpu"), TorchRefBackend(),
                        weights=iterate_safetensors(folder), load_format="safetensors")
    bind_kv_cache(model, allocate_kv_caches(model, NUM_BLOCKS, BLOCK_SIZE))
    return hf_model, model, folder


def _prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def _hf_logits(hf_model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([token_ids])).logits[0].float()


@torch.no_grad()
def _run_step(model: torch.nn.Module, requests: list[StepRequest]) -> torch.Tensor:
    input_ids, positions, metadata = build_step(requests, BLOCK_SIZE)
    return model.compute_logits(model(input_ids, positions, metadata))


def test_single_prompt_in_one_step_matches_hf(case):
    hf_model, model, _ = case
    prompt = _prompt(11, model.config.vocab_size, seed=1)
    [block_ids] = scrambled_block_ids(1, 3, NUM_BLOCKS)
    logits = _run_step(model, [StepRequest(prompt, 0, len(prompt), block_ids)])
    assert logits.dtype == torch.float32 and logits.shape == (11, model.config.vocab_size)
    torch.testing.assert_close(logits, _hf_logits(hf_model, prompt), atol=ATOL, rtol=RTOL)


def test_chunked_prompt_through_paged_cache_matches_hf(case):
    hf_model, model, _ = case
    prompt = _prompt(14, model.config.vocab_size, seed=2)
    [block_ids] = scrambled_block_ids(1, 4, NUM_BLOCKS)
    expected = _hf_logits(hf_model, prompt)
    num_computed = 0
    for chunk in (5, 4, 3, 1, 1):  # chunk boundaries inside and across blocks, then two decode-sized steps
        logits = _run_step(model, [StepRequest(prompt, num_computed, chunk, block_ids)])
        torch.testing.assert_close(logits, expected[num_computed:num_computed + chunk], atol=ATOL, rtol=RTOL)
        num_computed += chunk
    assert num_computed == len(prompt)


def test_packed_batch_of_three_prompts_then_packed_decode_matches_hf(case):
    hf_model, model, _ = case
    vocab_size = model.config.vocab_size
    prompts = [_prompt(n, vocab_size, seed=10 + n) for n in (7, 12, 3)]
    block_ids = scrambled_block_ids(3, 4, NUM_BLOCKS)
    prefill = [StepRequest(p, 0, len(p), b) for p, b in zip(prompts, block_ids)]
    logits = _run_step(model, prefill)
    offsets = [0, 7, 19, 22]
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[offsets[i]:offsets[i + 1]], _hf_logits(hf_model, prompt),
                                   atol=ATOL, rtol=RTOL)
    # Next step: every request decodes one new token, reading its prompt's KV from the cache.
    extended = [p + [(5 * i + 3) % vocab_size] for i, p in enumerate(prompts)]
    decode = [StepRequest(p, len(p) - 1, 1, b) for p, b in zip(extended, block_ids)]
    logits = _run_step(model, decode)
    expected = torch.stack([_hf_logits(hf_model, p)[-1] for p in extended])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


def test_checkpoint_layout_of_case(case):
    """The sharded case really is sharded, and tied embeddings really share one tensor."""
    _, model, folder = case
    shards = list(folder.glob("*.safetensors"))
    if folder.name.startswith("llama_sharded"):
        assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()

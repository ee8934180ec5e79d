"""EAGLE heads in the authors' layout (fc over [embeddings, target hidden], one decoder layer without its input
norm, no final norm, the target's lm_head): the head computes what transformers computes for that layout, and
greedy output with it equals transformers' generate under chunked prefill and preemption."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sluice import LLM, SamplingParams
from sluice.attention import get_attention_backend
from sluice.layers.attention import bind_kv_cache
from sluice.spec_decode.config import SpeculativeConfig
from sluice.spec_decode.draft_model import DraftModelProposer
from sluice.spec_decode.eagle import EagleHead, read_eagle_weights
from sluice.worker.input_batch import InputBatch
from sluice.worker.kv_cache import KVCacheSpec, allocate_kv_caches
from sluice.worker.model_runner import ModelRunner
from tests.engine.test_hf_equivalence import assert_no_leaked_blocks
from tests.spec_decode.test_spec_engine import MAX_NEW_TOKENS, _prompts
from tests.tiny_models import hf_greedy, save_tiny_model, tiny_config


def save_eagle_head(path, seed: int = 0, with_embedding: bool = False, safetensors: bool = True):
    """One Llama layer of the tiny llama's width, renamed as the EAGLE authors publish it."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    config = tiny_config("llama", num_hidden_layers=1)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers.0.") and "input_layernorm" not in name:
            weights[name.removeprefix("model.")] = tensor.normal_(0.0, 0.08) if tensor.dim() > 1 else tensor
    if with_embedding:
        weights["embed_tokens.weight"] = model.state_dict()["model.embed_tokens.weight"].normal_(0.0, 0.08)
    weights["fc.weight"] = torch.randn(config.hidden_size, 2 * config.hidden_size) * 0.08
    weights["fc.bias"] = torch.randn(config.hidden_size) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    weights = {k: v.contiguous() for k, v in weights.items()}
    if safetensors:
        save_file(weights, str(path / "model.safetensors"))
    else:
        torch.save(weights, path / "pytorch_model.bin")
    return path


@pytest.fixture(scope="module")
def eagle_models(tmp_path_factory):
    target = save_tiny_model(tmp_path_factory.mktemp("target"), "llama")
    head = save_eagle_head(tmp_path_factory.mktemp("eagle"))
    head_bin = save_eagle_head(tmp_path_factory.mktemp("eagle_bin"), seed=1, with_embedding=True, safetensors=False)
    prompts = _prompts()
    return target, head, head_bin, prompts, hf_greedy(target, prompts, MAX_NEW_TOKENS)


def test_the_head_computes_the_authors_layout(eagle_models):
    from transformers import LlamaModel
    _, head_path, _, _, _ = eagle_models
    config = tiny_config("llama", num_hidden_layers=1)
    weights = read_eagle_weights(str(head_path))
    head = EagleHead(config, torch.float32, torch.device("cpu"), get_attention_backend("cpu"), True, False)
    head.load_weights(weights)
    # transformers: the same layer with an identity input norm and no final norm, fed fc([e, h]).
    reference = LlamaModel(config).eval()
    reference.load_state_dict({k: v for k, v in weights.items() if k.startswith("layers.")}, strict=False)
    reference.layers[0].input_layernorm = torch.nn.Identity()
    reference.norm = torch.nn.Identity()
    n = 7
    embeddings, target_hidden = torch.randn(n, config.hidden_size), torch.randn(n, config.hidden_size)
    fc_out = torch.nn.functional.linear(torch.cat([embeddings, target_hidden], -1), weights["fc.weight"],
                                        weights["fc.bias"])
    with torch.no_grad():
        want = reference(inputs_embeds=fc_out[None]).last_hidden_state[0]
    kv = allocate_kv_caches(KVCacheSpec(1, config.num_key_value_heads, config.hidden_size // config.num_attention_heads,
                                        16, torch.float32), 2, torch.device("cpu"))
    bind_kv_cache(head, kv)
    # One request of 7 tokens in blocks 0 and 1, through the proposers' own metadata builder.
    runner = ModelRunner.__new__(ModelRunner)
    runner.device, runner.attn_backend, runner.block_size = torch.device("cpu"), get_attention_backend("cpu"), 16
    runner.input_batch = InputBatch(1, 32, 16)
    runner.input_batch.block_table[0, :2] = [0, 1]
    proposer = DraftModelProposer(SpeculativeConfig("eagle", 2))
    proposer._num_heads, proposer._num_kv_heads = config.num_attention_heads, config.num_key_value_heads
    metadata = proposer._metadata(runner, np.array([n]), np.array([n]), np.arange(n), np.array([0]))
    with torch.no_grad():
        got = head(embeddings, target_hidden, torch.arange(n), metadata)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine", [
    dict(max_num_batched_tokens=16),
    dict(num_kv_blocks=28, block_size=4, max_num_batched_tokens=32),
])
@pytest.mark.parametrize("which", ["safetensors", "bin_with_embedding"])
def test_greedy_with_an_eagle_head_matches_transformers(eagle_models, engine, which):
    target, head, head_bin, prompts, expected = eagle_models
    spec = {"method": "eagle", "model": str(head if which == "safetensors" else head_bin), "num_speculative_tokens": 3}
    llm = LLM(model=str(target), dtype="float32", device="cpu", max_model_len=128, speculative_config=spec, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output, want in zip(prompts, outputs, expected):
        assert output.outputs[0].token_ids == want, f"prompt of {len(prompt)} tokens diverged"
    assert_no_leaked_blocks(llm)
    stats = llm.llm_engine.core.make_stats()
    assert stats.spec_decoding.num_draft_tokens > 0
    if "num_kv_blocks" in engine:
        assert stats.num_preemptions > 0


def test_a_head_of_another_width_fails_at_start_up(eagle_models, tmp_path):
    target, *_ = eagle_models
    wide = save_tiny_model(tmp_path / "wide", "qwen2", tokenizer=False)
    with pytest.raises(ValueError, match="hidden_size"):
        LLM(model=str(target), dtype="float32", device="cpu", max_model_len=64,
            speculative_config={"method": "eagle", "model": str(wide), "num_speculative_tokens": 2})

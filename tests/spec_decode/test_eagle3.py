"""EAGLE-3 heads in the authors' layout (fc over three of the target's layers, one decoder layer over
[normed embeddings, normed hidden], a final norm, an lm_head over a draft vocabulary mapped by d2t): the target's
aux states are its layers' inputs, the head's proposals are what plain torch computes from transformers' hidden
states and the saved tensors, and greedy output with it equals transformers' generate under chunked prefill,
prefix caching, preemption and n > 1; bad heads fail at start-up."""
from __future__ import annotations

import json

import pytest
import torch

from sluice import LLM, SamplingParams
from sluice.attention import get_attention_backend
from sluice.spec_decode.eagle3 import Eagle3Head
from tests.engine.test_hf_equivalence import assert_no_leaked_blocks
from tests.spec_decode.test_spec_engine import MAX_NEW_TOKENS, _prompts
from tests.tiny_models import hf_greedy, save_tiny_model, tiny_config

TARGET_LAYERS = 4
DRAFT_VOCAB = 96
AUX_LAYER_IDS = [0, 2, 3]  # layer 0's input is the embedding


def save_eagle3_head(path, seed: int = 0, aux_layer_ids=AUX_LAYER_IDS, nested: bool = False,
                     decoder_prefix: str = "midlayer.", with_embedding: bool = False, draft_vocab: int = DRAFT_VOCAB,
                     drop: tuple[str, ...] = (), fc_width: int | None = None, zero_norm: bool = False,
                     **config_overrides):
    """A random head of the tiny llama's width, named as the EAGLE-3 authors publish it. The draft vocabulary
    is a random subset of the target's (id 0 always in it), mapped by d2t."""
    from safetensors.torch import save_file
    config = tiny_config("llama", num_hidden_layers=1, **config_overrides).to_dict()
    config["architectures"] = ["LlamaForCausalLMEagle3"]
    config["draft_vocab_size"] = draft_vocab
    if aux_layer_ids is not None:
        if nested:
            config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids)}
        else:
            config["eagle_aux_hidden_state_layer_ids"] = list(aux_layer_ids)
    hidden, vocab, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    def norm():
        return torch.zeros(hidden) if zero_norm else 1.0 + randn(hidden, scale=0.1)

    layer = {"input_layernorm.weight": 1.0 + randn(hidden, scale=0.1),
             "hidden_norm.weight": 1.0 + randn(hidden, scale=0.1),
             "self_attn.q_proj.weight": randn(q_out, 2 * hidden), "self_attn.k_proj.weight": randn(kv_out, 2 * hidden),
             "self_attn.v_proj.weight": randn(kv_out, 2 * hidden), "self_attn.o_proj.weight": randn(hidden, q_out),
             "post_attention_layernorm.weight": 1.0 + randn(hidden, scale=0.1),
             "mlp.gate_proj.weight": randn(inter, hidden), "mlp.up_proj.weight": randn(inter, hidden),
             "mlp.down_proj.weight": randn(hidden, inter)}
    weights = {decoder_prefix + name: tensor for name, tensor in layer.items()}
    target_ids = torch.arange(draft_vocab)  # (a draft vocabulary wider than the target's only tests its refusal)
    if draft_vocab < vocab:
        target_ids = torch.cat([torch.zeros(1, dtype=torch.long),
                                1 + torch.randperm(vocab - 1, generator=g)[:draft_vocab - 1]]).sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[target_ids[target_ids < vocab]] = True
    weights.update({"fc.weight": randn(hidden, fc_width or len(AUX_LAYER_IDS) * 64, scale=0.1), "norm.weight": norm(),
                    "lm_head.weight": randn(draft_vocab, hidden, scale=0.3),
                    "d2t": target_ids - torch.arange(draft_vocab), "t2d": t2d})
    if with_embedding:
        weights["embed_tokens.weight"] = randn(vocab, hidden, scale=0.3)
    for name in drop:
        weights.pop(name)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def eagle3_models(tmp_path_factory):
    target = save_tiny_model(tmp_path_factory.mktemp("target"), "llama", num_hidden_layers=TARGET_LAYERS)
    heads = {
        "midlayer": save_eagle3_head(tmp_path_factory.mktemp("eagle3")),
        # layers.0.* naming, its own embedding, the layer ids inside eagle_config
        "layers0_embedding_nested": save_eagle3_head(tmp_path_factory.mktemp("eagle3_b"), seed=1, nested=True,
                                                     aux_layer_ids=[1, 2, 3], decoder_prefix="layers.0.",
                                                     with_embedding=True),
    }
    prompts = _prompts()
    return target, heads, prompts, hf_greedy(target, prompts, MAX_NEW_TOKENS)


def _spec(head, k: int = 3) -> dict:
    return {"method": "eagle3", "model": str(head), "num_speculative_tokens": k}


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _reference_head_outputs(w: dict, config, embeds: torch.Tensor, hidden_in: torch.Tensor) -> torch.Tensor:
    """The head's decoder layer in plain torch over pairs at positions 0..n-1 (causal): pre-norm outputs [n, H]."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    n, heads, kv_heads = len(embeds), config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    p = "midlayer." if "midlayer.hidden_norm.weight" in w else "layers.0."
    x = torch.cat([_rms(embeds, w[p + "input_layernorm.weight"]), _rms(hidden_in, w[p + "hidden_norm.weight"])], -1)
    q = (x @ w[p + "self_attn.q_proj.weight"].T).view(n, heads, head_dim).transpose(0, 1)
    k = (x @ w[p + "self_attn.k_proj.weight"].T).view(n, kv_heads, head_dim).transpose(0, 1)
    v = (x @ w[p + "self_attn.v_proj.weight"].T).view(n, kv_heads, head_dim).transpose(0, 1)
    cos, sin = LlamaRotaryEmbedding(config)(v, torch.arange(n)[None])
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    h = attn.transpose(0, 1).reshape(n, -1) @ w[p + "self_attn.o_proj.weight"].T + hidden_in
    mlp_in = _rms(h, w[p + "post_attention_layernorm.weight"])
    gate, up = mlp_in @ w[p + "mlp.gate_proj.weight"].T, mlp_in @ w[p + "mlp.up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T + h


def _reference_proposals(target, head, prompt: list[int], aux_layer_ids, k: int) -> list[int]:
    """transformers' hidden states (hidden_states[i]: the input of layer i) and the saved tensors, plain torch."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    w = load_file(str(head / "model.safetensors"))
    config = AutoConfig.from_pretrained(head)
    embedding = w.get("embed_tokens.weight", model.model.embed_tokens.weight)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), output_hidden_states=True)
        tokens = prompt[1:] + [int(out.logits[0, -1].argmax())]
        hidden_in = torch.cat([out.hidden_states[i][0] for i in aux_layer_ids], -1) @ w["fc.weight"].T
        draft_to_target = torch.arange(len(w["d2t"])) + w["d2t"]
        proposals = []
        for _ in range(k):  # every pass recomputes all pairs (causal: the same as the head's incremental KV)
            outs = _reference_head_outputs(w, config, embedding[torch.tensor(tokens)], hidden_in)
            logits = _rms(outs[-1], w["norm.weight"]) @ w["lm_head.weight"].T
            proposals.append(int(draft_to_target[logits.argmax()]))
            tokens.append(proposals[-1])
            hidden_in = torch.cat([hidden_in, outs[-1:]])
    return proposals


def _record_proposals(llm: LLM) -> list[dict[str, list[int]]]:
    proposer = llm.llm_engine.core.runner.proposer
    calls, propose = [], proposer.propose

    def recording(*args, **kwargs):
        calls.append(propose(*args, **kwargs))
        return calls[-1]
    proposer.propose = recording
    return calls


@pytest.mark.parametrize("which", ["midlayer", "layers0_embedding_nested"])
def test_first_proposals_and_aux_states_equal_a_plain_torch_reference(eagle3_models, which):
    from transformers import AutoModelForCausalLM
    target, heads, prompts, _ = eagle3_models
    layer_ids = AUX_LAYER_IDS if which == "midlayer" else [1, 2, 3]
    llm = LLM(model=str(target), dtype="float32", device="cpu", max_model_len=128,
              speculative_config=_spec(heads[which]))
    calls = _record_proposals(llm)
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    aux = llm.llm_engine.core.runner.proposer._aux
    for prompt in (prompts[2], prompts[3]):
        calls.clear()
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
                     use_tqdm=False)
        # One step (the whole prompt): the buffer's rows are its tokens, layer by layer as transformers has them.
        with torch.no_grad():
            states = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        want = torch.cat([states[i][0] for i in layer_ids], -1)
        torch.testing.assert_close(aux.buffer[:len(prompt)], want, rtol=1e-4, atol=1e-4)
        got = next(iter(calls[0].values()))
        assert got == _reference_proposals(target, heads[which], prompt, layer_ids, 3)
    assert_no_leaked_blocks(llm)


ENGINES = {
    "chunked_budget_16_prefix_caching": dict(max_num_batched_tokens=16),
    "forced_preemption": dict(num_kv_blocks=28, block_size=4, max_num_batched_tokens=32),
}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("which", ["midlayer", "layers0_embedding_nested"])
def test_greedy_with_an_eagle3_head_matches_transformers(eagle3_models, engine, which):
    from safetensors.torch import load_file
    target, heads, prompts, expected = eagle3_models
    llm = LLM(model=str(target), dtype="float32", device="cpu", max_model_len=128,
              speculative_config=_spec(heads[which]), **ENGINES[engine])
    calls = _record_proposals(llm)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, n=2)
    for _ in range(2):  # the second round hits the prefix cache
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for prompt, output, want in zip(prompts, outputs, expected):
            for completion in output.outputs:
                assert completion.token_ids == want, f"prompt of {len(prompt)} tokens diverged"
        assert_no_leaked_blocks(llm)
    stats = llm.llm_engine.core.make_stats()
    assert stats.spec_decoding.num_draft_tokens > 0
    assert stats.prefix_cache_hits > 0
    if engine == "forced_preemption":
        assert stats.num_preemptions > 0
    # Every proposal is a target id the draft vocabulary maps to.
    d2t = load_file(str(heads[which] / "model.safetensors"))["d2t"]
    reachable = set((torch.arange(len(d2t)) + d2t).tolist())
    proposed = {t for call in calls for tokens in call.values() for t in tokens}
    assert proposed and proposed <= reachable


def test_a_head_that_guesses_the_target_has_every_proposal_kept(tmp_path):
    # A final norm of zeros: the target's logits are all 0 (greedy takes token 0), and so are the head's (draft
    # id 0, which d2t maps to token 0): every proposal is right.
    from safetensors.torch import load_file, save_file
    target = save_tiny_model(tmp_path / "target", "llama", num_hidden_layers=TARGET_LAYERS)
    weights = load_file(str(target / "model.safetensors"))
    weights["model.norm.weight"] = torch.zeros_like(weights["model.norm.weight"])
    save_file(weights, str(target / "model.safetensors"))
    head = save_eagle3_head(tmp_path / "head", zero_norm=True)
    llm = LLM(model=str(target), dtype="float32", device="cpu", max_model_len=64, max_num_batched_tokens=16,
              speculative_config=_spec(head, k=4))
    prompts = _prompts()[:4]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    assert all(output.outputs[0].token_ids == [0] * MAX_NEW_TOKENS for output in outputs)
    spec = llm.llm_engine.core.make_stats().spec_decoding
    assert spec.num_draft_tokens > 0 and spec.num_accepted_tokens == spec.num_draft_tokens
    assert_no_leaked_blocks(llm)


def test_layer_ids_default_to_early_middle_and_late_layers(eagle3_models, tmp_path):
    from sluice.models.loader import load_hf_config
    from sluice.spec_decode.config import parse_speculative_config
    target, heads, *_ = eagle3_models
    head = save_eagle3_head(tmp_path / "head", aux_layer_ids=None)
    spec = parse_speculative_config(_spec(head), 384, "auto", load_hf_config(target))
    assert spec.aux_hidden_state_layer_ids == (2, 2, 1)  # (2, L // 2, L - 3) for 4 layers, as vLLM
    nested = parse_speculative_config(_spec(heads["layers0_embedding_nested"]), 384, "auto", load_hf_config(target))
    assert nested.aux_hidden_state_layer_ids == (1, 2, 3) and nested.num_lookahead_tokens == 3


@pytest.mark.parametrize("overrides, match", [
    (dict(hidden_size=96, intermediate_size=160, num_attention_heads=6, num_key_value_heads=3), "hidden_size"),
    (dict(target_hidden_size=96), "hidden_size"),
    (dict(aux_layer_ids=[0, 2, TARGET_LAYERS]), "out of range"),
    (dict(aux_layer_ids=None, target_layers=2), "out of range"),  # the default (2, 1, -1) of a 2-layer target
    (dict(draft_vocab=1000), "draft_vocab_size"),
])
def test_a_head_that_does_not_fit_the_target_fails_at_start_up(tmp_path, overrides, match):
    target = save_tiny_model(tmp_path / "target", "llama", tokenizer=False,
                             num_hidden_layers=overrides.pop("target_layers", TARGET_LAYERS))
    head = save_eagle3_head(tmp_path / "head", **overrides)
    with pytest.raises(ValueError, match=match):
        LLM(model=str(target), dtype="float32", device="cpu", max_model_len=64, skip_tokenizer_init=True,
            speculative_config=_spec(head))


@pytest.mark.parametrize("overrides, match", [
    (dict(fc_width=2 * 64), "fc.weight"),
    (dict(drop=("d2t",)), "d2t"),
    (dict(drop=("norm.weight",)), "missing norm.weight"),
])
def test_head_tensors_that_do_not_fit_fail_when_the_head_loads(tmp_path, overrides, match):
    from transformers import AutoConfig

    from sluice.spec_decode.eagle import read_eagle_weights
    head = save_eagle3_head(tmp_path / "head", **overrides)
    config = AutoConfig.from_pretrained(head)
    model = Eagle3Head(config, len(AUX_LAYER_IDS), 64, torch.float32, torch.device("cpu"),
                       get_attention_backend("cpu"), own_embedding=False)
    with pytest.raises(ValueError, match=match):
        model.load_weights(read_eagle_weights(str(head)), config.vocab_size)


def test_a_head_without_d2t_fails_when_the_engine_starts(tmp_path):
    target = save_tiny_model(tmp_path / "target", "llama", tokenizer=False, num_hidden_layers=TARGET_LAYERS)
    head = save_eagle3_head(tmp_path / "head", drop=("d2t",))
    with pytest.raises(ValueError, match="d2t"):
        LLM(model=str(target), dtype="float32", device="cpu", max_model_len=64, skip_tokenizer_init=True,
            speculative_config=_spec(head))

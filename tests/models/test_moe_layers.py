"""The mixture-of-experts pieces on CPU: routing as transformers' routers, the reference experts
as transformers' experts, per-expert weight loading into the stacked parameters, which layers are
sparse, and dummy weights for the MoE shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from sluice.attention.torch_ref import TorchRefBackend
from sluice.layers.moe import FusedMoE, SparseMoeBlock, experts_torch, expert_param_for, select_experts
from sluice.models.llama import LlamaMLP
from sluice.models.loader import build_model, iterate_safetensors, load_hf_config
from tests.tiny_models import save_tiny_model, tiny_config


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,norm_topk_prob", [("mixtral", True), ("qwen2_moe", False), ("qwen2_moe", True)])
def test_select_experts_matches_transformers_router(family, norm_topk_prob, dtype):
    config = tiny_config(family, norm_topk_prob=norm_topk_prob)
    router = (MixtralTopKRouter if family == "mixtral" else Qwen2MoeTopKRouter)(config)
    with torch.no_grad():
        router.weight.copy_(_randn(*router.weight.shape, seed=1, scale=0.05))  # logits of order 1
    router = router.to(dtype)
    x = _randn(37, config.hidden_size, seed=2).to(dtype)
    with torch.no_grad():
        _, want_weights, want_ids = router(x)
    # sluice's models: Mixtral keeps float32 weights, Qwen rounds them to the model dtype
    weights, ids = select_experts(F.linear(x, router.weight), config.num_experts_per_tok, norm_topk_prob,
                                  weights_dtype=None if family == "mixtral" else dtype)
    assert weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights.float(), rtol=1e-6, atol=1e-7)
    if norm_topk_prob:
        torch.testing.assert_close(weights.sum(-1), torch.ones(37), rtol=1e-2 if dtype != torch.float32 else 1e-6,
                                   atol=0)
    else:
        assert (weights.sum(-1) < 0.99).all()


def test_experts_torch_matches_transformers_experts():
    config = tiny_config("qwen3_moe")
    experts = Qwen3MoeExperts(config)  # stacked like sluice's: gate_up [E, 2I, H], down [E, H, I]
    with torch.no_grad():
        experts.gate_up_proj.copy_(_randn(*experts.gate_up_proj.shape, seed=3, scale=0.1))
        experts.down_proj.copy_(_randn(*experts.down_proj.shape, seed=4, scale=0.1))
    x = _randn(29, config.hidden_size, seed=5)
    weights, ids = select_experts(_randn(29, config.num_experts, seed=6), config.num_experts_per_tok, True)
    got = experts_torch(x, experts.gate_up_proj.data, experts.down_proj.data, weights, ids)
    with torch.no_grad():
        torch.testing.assert_close(got, experts(x, ids, weights), rtol=1e-5, atol=1e-6)


def test_each_expert_tensor_loads_into_its_slice():
    moe = FusedMoE(num_experts=3, top_k=2, hidden_size=8, intermediate_size=5, renormalize=True)
    tensors = {}
    for expert in range(3):
        for shard, shape in (("w1", (5, 8)), ("w3", (5, 8)), ("w2", (8, 5))):
            tensors[expert, shard] = _randn(*shape, seed=10 * expert + int(shard[1]))
            param = moe.w2_weight if shard == "w2" else moe.w13_weight
            param.weight_loader(param, tensors[expert, shard], (expert, shard))
    for expert in range(3):
        assert torch.equal(moe.w13_weight[expert, :5], tensors[expert, "w1"])
        assert torch.equal(moe.w13_weight[expert, 5:], tensors[expert, "w3"])
        assert torch.equal(moe.w2_weight[expert], tensors[expert, "w2"])
    assert (moe.w13_weight.num_shards, moe.w2_weight.num_shards) == (6, 3)


def test_bad_expert_shards_are_refused():
    moe = FusedMoE(num_experts=3, top_k=2, hidden_size=8, intermediate_size=5, renormalize=True)
    with pytest.raises(ValueError, match="shard_id"):
        moe.weight_loader(moe.w13_weight, torch.zeros(5, 8), (3, "w1"))
    with pytest.raises(ValueError, match="shape"):
        moe.weight_loader(moe.w13_weight, torch.zeros(6, 8), (0, "w3"))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        FusedMoE(num_experts=3, top_k=4, hidden_size=8, intermediate_size=5, renormalize=True)


def test_expert_checkpoint_names_map_to_stacked_parameters():
    assert expert_param_for("model.layers.2.mlp.experts.17.up_proj.weight", "gate_proj", "up_proj", "down_proj") == (
        "model.layers.2.mlp.experts.w13_weight", (17, "w3"))
    assert expert_param_for("model.layers.0.mlp.experts.3.w2.weight", "w1", "w3", "w2") == (
        "model.layers.0.mlp.experts.w2_weight", (3, "w2"))
    for other in ("model.layers.0.mlp.shared_expert.gate_proj.weight", "model.layers.0.mlp.gate.weight"):
        assert expert_param_for(other, "gate_proj", "up_proj", "down_proj") is None


def test_checkpoint_missing_one_expert_tensor_is_refused(tmp_path):
    folder = save_tiny_model(tmp_path / "qwen3_moe", "qwen3_moe")
    model_class_input = load_hf_config(folder)
    weights = ((n, t) for n, t in iterate_safetensors(folder) if n != "model.layers.1.mlp.experts.5.up_proj.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.w13_weight"):
        build_model(model_class_input, torch.float32, "cpu", TorchRefBackend(), weights=weights,
                    load_format="safetensors")


def test_sparse_and_dense_layers_follow_the_config():
    config = tiny_config("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=2)
    config.architectures = ["Qwen2MoeForCausalLM"]
    model = build_model(config, torch.float32, "cpu", TorchRefBackend(), load_format="dummy")
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    # layer 0: listed dense; layers 1, 3: on the stride; layer 2: off it
    assert kinds == ["LlamaMLP", "Qwen2MoeSparseMoeBlock", "LlamaMLP", "Qwen2MoeSparseMoeBlock"]
    assert model.model.layers[0].mlp.gate_up_proj.weight.shape == (2 * config.intermediate_size, config.hidden_size)
    assert isinstance(model.model.layers[1].mlp.shared_expert, LlamaMLP)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_dummy_weights_fill_the_stacked_experts(family):
    config = tiny_config(family)
    config.architectures = [{"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                             "qwen3_moe": "Qwen3MoeForCausalLM"}[family]]
    model = build_model(config, torch.float32, "cpu", TorchRefBackend(), load_format="dummy", seed=3)
    block = model.model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock)
    num_experts = block.experts.num_experts
    assert block.experts.w13_weight.shape == (num_experts, 2 * block.experts.intermediate_size, config.hidden_size)
    for param in (block.experts.w13_weight, block.experts.w2_weight):
        assert 0 < param.abs().max() <= 1e-3 and param.abs().amin(dim=(1, 2)).lt(1e-3).all()
        assert param.std(dim=(1, 2)).gt(0).all()  # every expert got its own noise

"""Layer-level specifications: rope matches HF for every supported scaling, fused norm, self-loading
merged projections, and KV cache binding."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from sluice.attention.torch_ref import TorchRefBackend
from sluice.layers import (Attention, MergedColumnParallelLinear, QKVParallelLinear, RMSNorm, RopeSettings,
                           RowParallelLinear, SiluAndMul, bind_kv_cache, get_rope)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rotary_matches_hf_at_scattered_positions(rope_parameters):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_parameters=rope_parameters)
    head_dim, positions = 16, torch.tensor([0, 1, 7, 300, 2000, 3])
    q, k = torch.randn(6, 4 * head_dim), torch.randn(6, 2 * head_dim)
    q_out, k_out = get_rope(head_dim, config)(positions, q, k)

    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(q.view(1, 6, 4, head_dim).transpose(1, 2),
                                      k.view(1, 6, 2, head_dim).transpose(1, 2), cos, sin)
    torch.testing.assert_close(q_out, q_hf.transpose(1, 2).reshape(6, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out, k_hf.transpose(1, 2).reshape(6, -1), atol=1e-5, rtol=1e-5)


def test_rope_settings_read_transformers4_and_transformers5_layouts():
    v4 = SimpleNamespace(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=8)
    v5 = SimpleNamespace(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                          "original_max_position_embeddings": 8192})
    assert RopeSettings.from_hf_config(v4) == RopeSettings(rope_theta=5e5, rope_type="linear", factor=2.0,
                                                           max_position_embeddings=8)
    settings = RopeSettings.from_hf_config(v5)
    assert (settings.rope_type, settings.rope_theta, settings.factor) == ("llama3", 5e5, 8.0)
    assert settings.original_max_position_embeddings == 8192
    assert RopeSettings.from_hf_config(SimpleNamespace()) == RopeSettings()  # no rope fields: theta 10000


def test_unsupported_rope_type_is_a_clear_error():
    config = SimpleNamespace(rope_parameters={"rope_type": "mrope", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ValueError, match="rope_type 'mrope' is not supported"):
        RopeSettings.from_hf_config(config)


def test_fused_residual_norm_adds_then_normalizes_and_returns_new_residual():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    normed, new_residual = norm(x, residual)
    torch.testing.assert_close(new_residual, x + residual)
    expected = (x + residual) * torch.rsqrt((x + residual).pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(normed, expected)
    torch.testing.assert_close(norm(x + residual), expected)


def test_silu_and_mul_gates_the_second_half_by_the_first():
    x = torch.randn(2, 6)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[:, :3]) * x[:, 3:])


def test_qkv_proj_loads_separate_q_k_v_into_one_matmul():
    qkv = QKVParallelLinear(hidden_size=8, head_dim=2, total_num_heads=4, total_num_kv_heads=2, bias=True)
    q_w, k_w, v_w = torch.randn(8, 8), torch.randn(4, 8), torch.randn(4, 8)
    q_b, k_b, v_b = torch.randn(8), torch.randn(4), torch.randn(4)
    for shard, w, b in (("v", v_w, v_b), ("q", q_w, q_b), ("k", k_w, k_b)):  # any order
        qkv.weight.weight_loader(qkv.weight, w, shard)
        qkv.bias.weight_loader(qkv.bias, b, shard)
    x = torch.randn(5, 8)
    q, k, v = qkv(x).split(list(qkv.output_sizes), dim=-1)
    torch.testing.assert_close(q, x @ q_w.T + q_b)
    torch.testing.assert_close(k, x @ k_w.T + k_b)
    torch.testing.assert_close(v, x @ v_w.T + v_b)


def test_gate_up_proj_loads_gate_then_up_halves():
    gate_up = MergedColumnParallelLinear(4, [6, 6])
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    gate_up.weight.weight_loader(gate_up.weight, up, 1)
    gate_up.weight.weight_loader(gate_up.weight, gate, 0)
    torch.testing.assert_close(gate_up.weight, torch.cat([gate, up]))


def test_weight_loaders_reject_wrong_shapes_and_shard_ids():
    qkv = QKVParallelLinear(8, 2, 4, 2)
    with pytest.raises(ValueError, match=r"shard k.*\(3, 8\).*\(4, 8\)"):
        qkv.weight.weight_loader(qkv.weight, torch.randn(3, 8), "k")
    with pytest.raises(ValueError, match="shard_id must be 'q', 'k' or 'v'"):
        qkv.weight.weight_loader(qkv.weight, torch.randn(4, 8), "o")
    with pytest.raises(ValueError, match="shard_id must be in 0..1"):
        MergedColumnParallelLinear(4, [6, 6]).weight.weight_loader(None, torch.randn(6, 4), 2)
    down = RowParallelLinear(6, 4)
    with pytest.raises(ValueError, match="RowParallelLinear"):
        down.weight.weight_loader(down.weight, torch.randn(6, 4))


def _attention_stack(num_layers: int) -> torch.nn.Module:
    return torch.nn.ModuleList(Attention(4, 8, 8 ** -0.5, 2, TorchRefBackend()) for _ in range(num_layers))


def test_bind_kv_cache_assigns_caches_in_layer_order_and_unbinds():
    stack = _attention_stack(3)
    caches = [torch.zeros(2, 4, 16, 2, 8) for _ in range(3)]
    bind_kv_cache(stack, caches)
    assert all(layer.kv_cache is cache for layer, cache in zip(stack, caches))
    bind_kv_cache(stack, [])
    assert all(layer.kv_cache.numel() == 0 for layer in stack)
    with pytest.raises(ValueError, match="kv_caches has 2 tensors but the model has 3 attention layers"):
        bind_kv_cache(stack, caches[:2])


def test_attention_without_a_bound_cache_says_how_to_bind_one():
    layer = _attention_stack(1)[0]
    with pytest.raises(RuntimeError, match="bind_kv_cache"):
        layer(torch.randn(1, 32), torch.randn(1, 16), torch.randn(1, 16), attn_metadata=None)

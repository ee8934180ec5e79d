"""Every rope type rotates q and k exactly as transformers' own rotary embedding does.

For each type, sluice's RotaryEmbedding is compared against transformers' LlamaRotaryEmbedding
(Phi3RotaryEmbedding for longrope) applied with ``apply_rotary_pos_emb``. Dynamic rope
is compared one position per call, which is how transformers computes each generated token: below,
at and past the length where its frequencies change.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from sluice.layers.rope_scaling import RopeSettings
from sluice.layers.rotary import get_rope

HEAD_DIM, NUM_HEADS = 32, 2
MAX_POSITIONS = 64

CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0, "original_max_position_embeddings": 32,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}


def _llama_config(rope: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=HEAD_DIM * NUM_HEADS, num_attention_heads=NUM_HEADS, num_key_value_heads=1,
                       max_position_embeddings=MAX_POSITIONS, rope_parameters=dict(rope))


def _phi3_config(partial: float = 1.0) -> Phi3Config:
    rotary_half = int(HEAD_DIM * partial) // 2
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
            "short_factor": [1.0 + 0.05 * i for i in range(rotary_half)],
            "long_factor": [1.0 + 0.5 * i for i in range(rotary_half)]}
    return Phi3Config(hidden_size=HEAD_DIM * NUM_HEADS, num_attention_heads=NUM_HEADS, num_key_value_heads=1,
                      max_position_embeddings=4 * MAX_POSITIONS, original_max_position_embeddings=MAX_POSITIONS,
                      rope_parameters=rope)


def _hf_rotate(hf_rope, positions: list[int], q: torch.Tensor, k: torch.Tensor, rotary_dim: int):
    """transformers' rotation, one position per call; q/k: [T, H, D] -> [T, H, D]."""
    out_q, out_k = [], []
    for t, position in enumerate(positions):
        cos, sin = hf_rope(q, torch.tensor([[position]]))
        q_t, k_t = q[t:t + 1].transpose(0, 1).unsqueeze(0), k[t:t + 1].transpose(0, 1).unsqueeze(0)
        q_rot, k_rot = apply_rotary_pos_emb(q_t[..., :rotary_dim], k_t[..., :rotary_dim], cos, sin)
        out_q.append(torch.cat((q_rot, q_t[..., rotary_dim:]), -1)[0].transpose(0, 1))
        out_k.append(torch.cat((k_rot, k_t[..., rotary_dim:]), -1)[0].transpose(0, 1))
    return torch.cat(out_q), torch.cat(out_k)


def _compare(config, hf_rope, positions: list[int]) -> None:
    rope = get_rope(HEAD_DIM, config)
    torch.manual_seed(0)
    q, k = torch.randn(len(positions), NUM_HEADS, HEAD_DIM), torch.randn(len(positions), 1, HEAD_DIM)
    ours_q, ours_k = rope.forward_torch(torch.tensor(positions), q.reshape(len(positions), -1),
                                        k.reshape(len(positions), -1))
    want_q, want_k = _hf_rotate(hf_rope, positions, q, k, rope.rotary_dim)
    torch.testing.assert_close(ours_q.view_as(q), want_q, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_k.view_as(k), want_k, atol=1e-6, rtol=1e-5)


POSITIONS = [0, 1, 5, 15, 16, 17, 40, MAX_POSITIONS - 2, MAX_POSITIONS - 1, MAX_POSITIONS, MAX_POSITIONS + 7, 150]


@pytest.mark.parametrize("name", list(CASES))
def test_rope_type_matches_transformers(name):
    config = _llama_config(CASES[name])
    _compare(config, LlamaRotaryEmbedding(config), POSITIONS)


@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("max_model_len", [MAX_POSITIONS, 2 * MAX_POSITIONS])
def test_longrope_uses_one_factor_set_chosen_by_max_model_len(partial, max_model_len):
    """Long factors iff max_model_len > original_max_position_embeddings (as vLLM); transformers uses
    the same set for sequences on that side of the original length."""
    config = _phi3_config(partial)
    config.sluice_max_model_len = max_model_len
    long = max_model_len > MAX_POSITIONS
    positions = [p for p in POSITIONS if (p >= MAX_POSITIONS) == long]
    _compare(config, Phi3RotaryEmbedding(config), positions)
    rope = get_rope(HEAD_DIM, config)
    assert rope.rope.use_long_factors == long
    assert rope.attention_scaling > 1.0 and not rope.fusable


def test_dynamic_frequencies_change_only_past_max_position_embeddings():
    rope = get_rope(HEAD_DIM, _llama_config(CASES["dynamic"]))
    q = torch.randn(1, NUM_HEADS * HEAD_DIM)
    default = get_rope(HEAD_DIM, _llama_config(CASES["default"]))
    at_limit = torch.tensor([MAX_POSITIONS - 1])
    torch.testing.assert_close(rope.forward_torch(at_limit, q, q)[0], default.forward_torch(at_limit, q, q)[0])
    past = torch.tensor([MAX_POSITIONS + 10])
    assert not torch.allclose(rope.forward_torch(past, q, q)[0], default.forward_torch(past, q, q)[0])


def test_context_length_of_scaled_ropes_follows_vllm():
    assert RopeSettings.from_hf_config(_llama_config(CASES["dynamic"])).context_length() == 3 * MAX_POSITIONS
    assert RopeSettings.from_hf_config(_llama_config(CASES["yarn"])).context_length() == 64
    assert RopeSettings.from_hf_config(_llama_config(CASES["llama3"])).context_length() == MAX_POSITIONS
    assert RopeSettings.from_hf_config(_phi3_config()).context_length() == 4 * MAX_POSITIONS


def test_su_is_longrope_and_unknown_types_are_refused():
    config = _phi3_config()
    config.rope_parameters = {**config.rope_parameters, "rope_type": "su"}
    assert RopeSettings.from_hf_config(config).rope_type == "longrope"
    with pytest.raises(ValueError, match="rope_type 'mrope' is not supported"):
        RopeSettings.from_hf_config(_llama_config({"rope_type": "mrope", "rope_theta": 1.0}))

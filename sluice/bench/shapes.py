"""The benchmark model shapes of docs/benchmarks.md (``--model L8`` / ``G9`` / ``Q30A3``), each written as a
config-only folder that the engine loads with dummy weights."""
from __future__ import annotations

import os
from typing import Any

L8_NAME = "L8"
G9_NAME = "G9"
Q30A3_NAME = "Q30A3"


def write_l8_config(folder: str) -> str:
    """docs/benchmarks.md's L8: the Llama-3.1-8B shape in bfloat16, as config.json only."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        dtype="bfloat16")
    return _write_config(config, os.path.join(folder, L8_NAME))


def write_g9_config(folder: str) -> str:
    """G9: the Gemma-2-9B shape in bfloat16 (42 layers alternating 4096-token sliding windows and global
    attention, soft-capped logits, head_dim 256, vocab 256000, tied embeddings), as config.json only."""
    from transformers import Gemma2Config

    config = Gemma2Config(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        architectures=["Gemma2ForCausalLM"], dtype="bfloat16")
    return _write_config(config, os.path.join(folder, G9_NAME))


def write_q30a3_config(folder: str) -> str:
    """The Qwen3-30B-A3B shape in bfloat16, as config.json only: 48 layers of 128 experts (8 per token,
    768 wide, renormalized), hidden 2048, 32 heads, 4 KV heads of 128; 30.5 B parameters, 3.3 B active."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        dtype="bfloat16")
    config.architectures = ["Qwen3MoeForCausalLM"]
    return _write_config(config, os.path.join(folder, Q30A3_NAME))


def _write_config(config: Any, path: str) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_string())
    return path


SHAPE_WRITERS = {L8_NAME: write_l8_config, G9_NAME: write_g9_config, Q30A3_NAME: write_q30a3_config}

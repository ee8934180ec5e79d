"""Quantized checkpoints load into quant methods on the linear layers (float32, CPU).

Each format is written by the tests (tests/quantization/checkpoints.py packs it independently). Weight-only
formats and block-wise FP8 (dequantized at load) must hold exactly the test's dequantized weights, and
generate token for token what the same model with those dense weights generates. W8A8 formats (FP8 weights
and activations) must match, per layer, a float32 reference that applies the same activation quantization
(the weights exactly, outputs within float32 rounding), and pick the dense model's first greedy token on at
least 16 of 20 prompts (activation rounding flips near ties of the random tiny model; measured 18-19 of 20).
"""
from __future__ import annotations

import random
import re

import pytest
import torch

from sluice import LLM, SamplingParams
from sluice.attention import get_attention_backend
from sluice.layers.linear import LinearBase, UnquantizedLinearMethod
from sluice.layers.quantization.fp8 import FP8_MAX
from sluice.models.loader import build_model, iterate_safetensors, load_hf_config
from tests.quantization import checkpoints as ckpt
from tests.tiny_models import save_tiny_model

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
CT_GROUP = {"targets": ["Linear"]}

FORMATS = {
    "fp8_per_tensor_static": (ckpt.fp8_per_tensor_quantizer(static_input_scale=True),
                              {"quant_method": "fp8", "activation_scheme": "static"}, None),
    "fp8_block_128": (ckpt.fp8_block_quantizer(128),
                      {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, None),
    "fp8_block_32": (ckpt.fp8_block_quantizer(32),
                     {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}, None),
    "ct_fp8_channel_dynamic": (ckpt.fp8_per_channel_quantizer(), {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head", "re:.*down_proj$"],
        "config_groups": {"group_0": {**CT_GROUP,
                                      "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                  "strategy": "channel", "dynamic": False},
                                      "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                                            "strategy": "token", "dynamic": True}}}},
        re.compile(r"down_proj$")),
    "awq": (ckpt.awq_quantizer(32), {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                     "version": "gemm"}, None),
    "gptq_sym": (ckpt.gptq_quantizer(4, 32, desc_act=False, sym=True),
                 {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}, None),
    "gptq_act_order_asym": (ckpt.gptq_quantizer(4, 32, desc_act=True, sym=False),
                            {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False},
                            None),
    "gptq_8bit": (ckpt.gptq_quantizer(8, 64, desc_act=False, sym=True),
                  {"quant_method": "gptq", "bits": 8, "group_size": 64, "desc_act": False, "sym": True}, None),
    "ct_w4a16": (ckpt.ct_w4a16_quantizer(32), {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {**CT_GROUP, "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                              "group_size": 32, "strategy": "group"}}}}, None),
}
W8A8 = {"fp8_per_tensor_static", "ct_fp8_channel_dynamic"}
ENGINE_FORMATS = ["fp8_per_tensor_static", "fp8_block_128", "ct_fp8_channel_dynamic", "awq", "gptq_act_order_asym",
                  "ct_w4a16"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def written(tiny_llama, tmp_path_factory):
    """format -> (quantized folder, dense folder, dequantized weights by HF module name), written on first use."""
    cache: dict[str, tuple] = {}

    def get(fmt: str):
        if fmt not in cache:
            quantizer, config, ignore = FORMATS[fmt]
            root = tmp_path_factory.mktemp(fmt)
            deq = ckpt.write_quantized(tiny_llama, root / "quantized", quantizer, config, ignore)
            cache[fmt] = (root / "quantized", ckpt.write_dense(tiny_llama, root / "dense", deq), deq)
        return cache[fmt]
    return get


def _load(folder, quantization=None):
    return build_model(load_hf_config(folder), torch.float32, "cpu", get_attention_backend("cpu"),
                       weights=iterate_safetensors(folder), quantization=quantization)


def _fused_reference(deq: dict[str, torch.Tensor], module_name: str) -> torch.Tensor:
    prefix, _, leaf = module_name.rpartition(".")
    return torch.cat([deq[f"{prefix}.{part}"] for part in FUSED.get(leaf, (leaf,))])


def _fp8_reference(x: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """float32 matmul of the activation-quantized input with the dequantized weight."""
    if input_scale is None:
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    else:
        scale = input_scale.reshape(1, 1)
    x_q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    return x_q @ weight.t()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_linear_layers_hold_the_checkpoints_dequantized_weights(fmt, written):
    folder, _, deq = written(fmt)
    model = _load(folder)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, LinearBase)}
    assert len(linears) == 8
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    for name, layer in linears.items():
        expected = _fused_reference(deq, name)
        if isinstance(layer.linear_method, UnquantizedLinearMethod):
            assert FORMATS[fmt][2] is not None and FORMATS[fmt][2].search(name), f"{name} left unquantized"
            assert torch.equal(layer.weight, expected), name
        elif fmt in W8A8:
            assert layer.weight.dtype == torch.float8_e4m3fn
            assert torch.equal(layer.weight.float() * layer.weight_scale[:, None], expected), name
            xs = x[:, :layer.input_size]
            input_scale = None
            if fmt == "fp8_per_tensor_static":
                parts = FUSED.get(name.rpartition(".")[2], (name.rpartition(".")[2],))
                input_scale = torch.tensor(max(ckpt.STATIC_INPUT_SCALES[p] for p in parts))
                assert torch.equal(layer.input_scale.reshape(()), input_scale)
            torch.testing.assert_close(layer(xs), _fp8_reference(xs, expected, input_scale), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(layer.weight, expected), name
    assert not any(p.numel() == 0 for p in model.parameters()), "checkpoint placeholders left behind"


def _prompts(n: int = 20) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(4, 384) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def _greedy(folder, **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(folder), skip_tokenizer_init=True, dtype="float32", device="cpu", num_kv_blocks=64,
              block_size=8, max_num_batched_tokens=48, **kwargs)
    outputs = llm.generate([{"prompt_token_ids": p} for p in _prompts()],
                           SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs], llm


def _assert_no_leaked_blocks(llm: LLM) -> None:
    pool = llm.llm_engine.core.scheduler.kv_cache_manager.block_pool
    assert not llm.llm_engine.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize("fmt", ENGINE_FORMATS)
def test_greedy_output_matches_the_dequantized_dense_model(fmt, written):
    folder, dense, _ = written(fmt)
    quantized_tokens, llm = _greedy(folder)
    _assert_no_leaked_blocks(llm)
    dense_tokens, _ = _greedy(dense)
    if fmt in W8A8:
        agree = sum(q[0] == d[0] for q, d in zip(quantized_tokens, dense_tokens))
        assert agree >= 16, f"{agree}/20 first tokens agree"
    else:
        assert quantized_tokens == dense_tokens


def test_online_fp8_quantizes_a_float32_checkpoint_per_channel(tiny_llama):
    model = _load(tiny_llama, "fp8")
    reference = _load(tiny_llama)
    for (name, layer), (_, dense) in zip(model.named_modules(), reference.named_modules()):
        if isinstance(layer, LinearBase):
            scale = dense.weight.abs().amax(dim=1) / FP8_MAX
            assert torch.equal(layer.weight_scale, scale), name
            assert torch.equal(layer.weight, (dense.weight / scale[:, None]).to(torch.float8_e4m3fn)), name
            x = torch.randn(4, layer.input_size, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(layer(x), _fp8_reference(x, layer.weight.float() * scale[:, None], None),
                                       rtol=1e-5, atol=1e-6)
    assert isinstance(model.lm_head.weight, torch.nn.Parameter) and model.lm_head.weight.dtype == torch.float32


def test_online_fp8_engine_agrees_with_the_dense_model(tiny_llama):
    quantized_tokens, llm = _greedy(tiny_llama, quantization="fp8")
    _assert_no_leaked_blocks(llm)
    dense_tokens, _ = _greedy(tiny_llama)
    assert sum(q[0] == d[0] for q, d in zip(quantized_tokens, dense_tokens)) >= 16


def test_online_rtn_rounds_each_group_of_128_inputs_to_16_levels(tiny_llama):
    """Groups of 128 input channels where the width divides, else one group per output channel (hidden 64)."""
    model = _load(tiny_llama, "rtn")
    reference = _load(tiny_llama)
    for (name, layer), (_, dense) in zip(model.named_modules(), reference.named_modules()):
        if isinstance(layer, LinearBase):
            group = 128 if layer.input_size % 128 == 0 else layer.input_size
            groups = layer.weight.reshape(layer.output_size, -1, group)
            dense_groups = dense.weight.reshape(layer.output_size, -1, group)
            step = (dense_groups.amax(-1).clamp(min=0) - dense_groups.amin(-1).clamp(max=0)) / 15
            assert ((groups - dense_groups).abs() <= step.unsqueeze(-1) * 0.5 + 1e-6).all(), name
            assert max(len(torch.unique(g)) for g in groups.reshape(-1, group)) <= 16, name
    assert model.lm_head.weight.dtype == torch.float32


def test_online_rtn_engine_agrees_with_the_dense_model(tiny_llama):
    quantized_tokens, llm = _greedy(tiny_llama, quantization="rtn")
    _assert_no_leaked_blocks(llm)
    dense_tokens, _ = _greedy(tiny_llama)
    # 4-bit weights of a tiny random model move some argmaxes; chance agreement would be 1 in 384
    assert sum(q[0] == d[0] for q, d in zip(quantized_tokens, dense_tokens)) >= 12

"""--kv-cache-dtype fp8 end to end on a tiny Llama (CPU): sizing, checkpoint scales, calculated scales, the two CPU
attention paths, and prefix caching, preemption (recompute and swap) and the host tier with the block-leak invariant.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from sluice import LLM, SamplingParams
from sluice.attention.kv_quant import FP8_KV_DTYPE, FP8_MAX
from sluice.config import EngineArgs, create_engine_config
from sluice.layers.attention import Attention
from tests.engine.test_hf_equivalence import _prompts, assert_no_leaked_blocks
from tests.tiny_models import save_tiny_model

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


def _llm(path, **kwargs) -> LLM:
    kwargs = {"dtype": "float32", "device": "cpu", "max_model_len": 128, **kwargs}
    return LLM(model=str(path), **kwargs)


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _attention_layers(llm: LLM) -> list[Attention]:
    return [m for m in llm.llm_engine.core.runner.model.modules() if isinstance(m, Attention)]


def test_fp8_kv_cache_holds_twice_the_blocks_of_bfloat16(tiny_llama):
    budget = 1 << 20
    bf16 = _llm(tiny_llama, dtype="bfloat16", kv_cache_memory=budget)
    fp8 = _llm(tiny_llama, dtype="bfloat16", kv_cache_memory=budget, kv_cache_dtype="fp8")
    bf16_info, fp8_info = bf16.llm_engine.core.info, fp8.llm_engine.core.info
    assert fp8_info.kv_bytes_per_block * 2 == bf16_info.kv_bytes_per_block
    assert fp8_info.num_kv_blocks == 2 * bf16_info.num_kv_blocks
    assert fp8.llm_engine.config.cache.num_blocks == fp8_info.num_kv_blocks
    assert all(kv.dtype == FP8_KV_DTYPE for kv in fp8.llm_engine.core.runner.kv_caches)
    assert all(kv.dtype == torch.bfloat16 for kv in bf16.llm_engine.core.runner.kv_caches)


def test_start_up_log_names_the_kv_dtype(tiny_llama, caplog):
    with caplog.at_level("INFO", logger="sluice.engine.llm_engine"):
        llm = _llm(tiny_llama, kv_cache_dtype="fp8", num_kv_blocks=64)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:"))
    assert "64 blocks" in line and "float8_e4m3fn" in line
    del llm


def test_flags_are_validated_with_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="fp8_e5m2 is not supported"):
        create_engine_config(EngineArgs(model=str(tiny_llama), kv_cache_dtype="fp8_e5m2", device="cpu"))
    with pytest.raises(ValueError, match="calculate_kv_scales needs an fp8 KV cache"):
        create_engine_config(EngineArgs(model=str(tiny_llama), calculate_kv_scales=True, device="cpu"))
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        create_engine_config(EngineArgs(model=str(tiny_llama), kv_cache_dtype="int8", device="cpu"))
    config = create_engine_config(EngineArgs(model=str(tiny_llama), kv_cache_dtype="fp8_e4m3", device="cpu"))
    assert config.cache.cache_dtype == "fp8_e4m3"


def test_cli_flags_reach_engine_args():
    import argparse
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--kv-cache-dtype", "fp8", "--calculate-kv-scales"]))
    assert args.kv_cache_dtype == "fp8" and args.calculate_kv_scales


def _with_kv_scales(src, dst, extra: dict[str, torch.Tensor]):
    """A copy of the tiny checkpoint with extra tensors in its safetensors file."""
    import shutil
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file({**tensors, **extra}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_checkpoint_kv_scales_are_loaded_and_used(tiny_llama, tmp_path):
    path = _with_kv_scales(tiny_llama, tmp_path / "scaled", {
        "model.layers.0.self_attn.k_scale": torch.tensor(1e-4),  # saturates every key of layer 0
        "model.layers.0.self_attn.v_scale": torch.tensor([0.02]),
        "model.layers.1.self_attn.k_proj.output_scale": torch.tensor(0.03),  # compressed-tensors' older names
        "model.layers.1.self_attn.v_proj.output_scale": torch.tensor(0.04),
        "model.layers.1.self_attn.q_scale": torch.tensor(0.5),  # fp8 attention's query scale: dropped
    })
    llm = _llm(path, kv_cache_dtype="fp8", num_kv_blocks=64)
    layers = _attention_layers(llm)
    assert layers[0].kv_scales.tolist() == pytest.approx([1e-4, 0.02])
    assert layers[1].kv_scales.tolist() == pytest.approx([0.03, 0.04])
    _generate(llm, _prompts()[:2], max_tokens=2)
    keys0 = llm.llm_engine.core.runner.kv_caches[0][0].float()
    assert keys0.abs().max() == FP8_MAX  # x / 1e-4 saturates: the write used the checkpoint's scale
    keys1 = llm.llm_engine.core.runner.kv_caches[1][0].float()
    assert 1.0 < keys1.abs().max() < FP8_MAX  # x / 0.03: inside the range
    # The same checkpoint with the default KV cache loads too (the scales are unused there).
    assert _generate(_llm(path, num_kv_blocks=64), _prompts()[:2], max_tokens=2)


def test_single_kv_scale_sets_both(tiny_llama, tmp_path):
    path = _with_kv_scales(tiny_llama, tmp_path / "kv_scale", {"model.layers.1.self_attn.kv_scale": torch.tensor(0.25)})
    layers = _attention_layers(_llm(path, kv_cache_dtype="fp8", num_kv_blocks=64))
    assert layers[0].kv_scales.tolist() == [1.0, 1.0]  # no scale in the checkpoint: 1.0
    assert layers[1].kv_scales.tolist() == [0.25, 0.25]


def test_missing_scales_warn_once(tiny_llama, caplog):
    with caplog.at_level("WARNING", logger="sluice.worker.model_runner"):
        _llm(tiny_llama, kv_cache_dtype="fp8", num_kv_blocks=64)
    warnings = [r.getMessage() for r in caplog.records if "K/V scales for 0 of 2 layers" in r.getMessage()]
    assert len(warnings) == 1 and "1.0" in warnings[0]


def test_calculate_kv_scales_sets_amax_over_448_from_the_first_step(tiny_llama):
    llm = _llm(tiny_llama, kv_cache_dtype="fp8", calculate_kv_scales=True, num_kv_blocks=64)
    layers = _attention_layers(llm)
    amax: dict[int, tuple[float, float]] = {}

    def record(index):
        def hook(module, args):
            _, key, value, _ = args
            amax.setdefault(index, (key.abs().max().item(), value.abs().max().item()))
        return hook

    handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(layers)]
    prompts = _prompts()[:3]
    _generate(llm, prompts, max_tokens=3)
    for handle in handles:
        handle.remove()
    for i, layer in enumerate(layers):
        k_amax, v_amax = amax[i]  # the first step's K and V (all three prompts, in one step)
        assert layer.kv_scales.tolist() == pytest.approx([k_amax / FP8_MAX, v_amax / FP8_MAX], rel=1e-6)
    before = [layer.kv_scales.clone() for layer in layers]
    _generate(llm, [[7] * 40], max_tokens=2)  # later steps keep them
    assert all(torch.equal(layer.kv_scales, b) for layer, b in zip(layers, before))


def test_fast_cpu_path_gives_the_reference_path_tokens_with_fp8_kv(tiny_llama, monkeypatch):
    prompts = _prompts()
    outputs = {}
    for backend in ("reference", "sdpa"):
        monkeypatch.setenv("SLUICE_CPU_ATTENTION", backend)
        llm = _llm(tiny_llama, kv_cache_dtype="fp8", calculate_kv_scales=True, num_kv_blocks=256)
        assert type(llm.llm_engine.core.runner.attn_backend).__name__ == \
            ("TorchRefBackend" if backend == "reference" else "CpuSdpaBackend")
        outputs[backend] = _generate(llm, prompts)
    assert outputs["sdpa"] == outputs["reference"]


@pytest.fixture(scope="module")
def fp8_expected(tiny_llama):
    """Greedy tokens with an fp8 KV cache large enough that nothing is preempted or evicted."""
    llm = _llm(tiny_llama, kv_cache_dtype="fp8", num_kv_blocks=512, enable_prefix_caching=False)
    return _generate(llm, _prompts())


def _gib(llm_blocks: int, bytes_per_block: int) -> float:
    return llm_blocks * bytes_per_block / 2**30


# Tiny Llama, fp8: 2 layers x K and V x 4 slots x 2 KV heads x head_dim 16 x 1 byte.
FP8_BYTES_PER_BLOCK = 2 * 2 * 4 * 2 * 16


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_prefix_caching_and_preemption_keep_outputs_and_free_every_block(tiny_llama, fp8_expected, preemption):
    swap = {"swap_space": _gib(256, FP8_BYTES_PER_BLOCK), "preemption_mode": "swap"} if preemption == "swap" else {}
    llm = _llm(tiny_llama, kv_cache_dtype="fp8", num_kv_blocks=24, block_size=4, max_num_batched_tokens=32, **swap)
    assert llm.llm_engine.core.info.kv_bytes_per_block == FP8_BYTES_PER_BLOCK
    for _ in range(2):  # the second round hits the prefix cache
        assert _generate(llm, _prompts()) == fp8_expected
        assert_no_leaked_blocks(llm)
    stats = llm.llm_engine.core.make_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    if preemption == "swap":
        assert stats.kv_offload.num_swapped_preemptions > 0 and stats.kv_offload.swap_in_bytes > 0
        llm.llm_engine.core.scheduler.kv_offload.check_all_free()
        assert llm.llm_engine.core.runner.kv_swapper.host_kv.element_size() == 1


def test_host_tier_returns_fp8_blocks_byte_for_byte(tiny_llama, fp8_expected):
    llm = _llm(tiny_llama, kv_cache_dtype="fp8", num_kv_blocks=40, block_size=4,
               kv_offload_space=_gib(256, FP8_BYTES_PER_BLOCK))
    prompts = _prompts()
    assert _generate(llm, prompts) == fp8_expected  # fills the pool past its size: blocks go to the host tier
    before = llm.llm_engine.core.make_stats().kv_offload.host_tier_hits
    assert _generate(llm, prompts) == fp8_expected
    assert llm.llm_engine.core.make_stats().kv_offload.host_tier_hits > before
    assert_no_leaked_blocks(llm)
    llm.llm_engine.core.scheduler.kv_offload.check_all_free()

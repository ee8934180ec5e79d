"""Loader specifications: architectures, dtype resolution, dummy weights, and clear errors for bad checkpoints."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from sluice.attention.torch_ref import TorchRefBackend
from sluice.models.llama import LlamaForCausalLM, MistralForCausalLM
from sluice.models.loader import (build_model, get_model_class, iterate_safetensors, load_hf_config,
                                  resolve_dtype, cpu_has_native_bf16)
from sluice.models.qwen3 import Qwen3ForCausalLM
from tests.models.paged_batch import StepRequest, allocate_kv_caches, build_step
from tests.tiny_models import tiny_config

CPU = torch.device("cpu")


def _dummy(config, seed: int) -> torch.nn.Module:
    return build_model(config, torch.float32, CPU, TorchRefBackend(), weights=None, load_format="dummy", seed=seed)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(folder)
    return folder


def test_registry_maps_architectures_and_lists_supported_ones_otherwise():
    config = tiny_config("llama")
    config.architectures = ["MistralForCausalLM"]
    assert get_model_class(config) is MistralForCausalLM
    config.architectures = ["GPTNeoXForCausalLM"]
    with pytest.raises(ValueError, match=r"not supported; supported: .*LlamaForCausalLM.*Qwen2ForCausalLM"):
        get_model_class(config)


def test_registry_falls_back_to_model_type_for_configs_built_in_code():
    assert get_model_class(tiny_config("qwen3")) is Qwen3ForCausalLM  # no architectures field
    config = tiny_config("llama")
    config.model_type = "gpt_neox"
    with pytest.raises(ValueError, match="model_type .gpt_neox. is not known; supported architectures: .*LlamaForCausalLM"):
        get_model_class(config)


NATIVE_BF16 = torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@pytest.mark.parametrize("checkpoint_dtype, flag, device, expected", [
    (torch.bfloat16, "auto", "cpu", NATIVE_BF16),  # bf16 where the CPU has bf16 instructions, else float32
    (torch.float16, "auto", "cpu", NATIVE_BF16),
    (torch.float32, "auto", "cpu", torch.float32),
    (torch.bfloat16, "auto", "cuda", torch.bfloat16),
    (torch.float32, "auto", "cuda", torch.float32),
    (None, "auto", "cuda", torch.float32),  # unknown
    ("float16", "auto", "cuda", torch.float16),  # a string in config.json
    (torch.bfloat16, "float16", "cpu", torch.float16),  # explicit wins
])
def test_resolve_dtype(checkpoint_dtype, flag, device, expected):
    config = tiny_config("llama")
    config.dtype = checkpoint_dtype
    assert resolve_dtype(config, flag, device) == expected


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16(str(flags))
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert not cpu_has_native_bf16(str(flags))
    assert not cpu_has_native_bf16(str(tmp_path / "missing"))


def test_resolve_dtype_rejects_unknown_names():
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, float16, bfloat16, got 'fp8'"):
        resolve_dtype(tiny_config("llama"), "fp8", "cpu")


def test_load_hf_config_reads_local_folders_only(llama_folder, tmp_path):
    assert load_hf_config(llama_folder).architectures == ["LlamaForCausalLM"]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_config(tmp_path / "not-a-model")


def test_dummy_weights_are_seeded_small_and_need_no_checkpoint():
    config = tiny_config("qwen3")  # built in memory: no files anywhere
    first, again, other = _dummy(config, 7), _dummy(config, 7), _dummy(config, 8)
    for (name, p1), p2, p3 in zip(first.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(p1, p2), name
        assert not torch.equal(p1, p3), name
        assert p1.abs().max() <= 1e-3 and p1.abs().max() > 0, name


def test_dummy_model_runs_a_forward_pass():
    model = _dummy(tiny_config("llama"), seed=0)
    from sluice.layers.attention import bind_kv_cache
    bind_kv_cache(model, allocate_kv_caches(model, num_blocks=4, block_size=4))
    input_ids, positions, metadata = build_step([StepRequest([3, 1, 4, 1, 5], 0, 5, [2, 0])], block_size=4)
    logits = model.compute_logits(model(input_ids, positions, metadata))
    assert logits.shape == (5, model.config.vocab_size) and torch.isfinite(logits).all()


def test_load_weights_returns_every_parameter_name(llama_folder):
    model = LlamaForCausalLM(load_hf_config(llama_folder), torch.float32, CPU, TorchRefBackend())
    loaded = model.load_weights(iterate_safetensors(llama_folder))
    assert loaded == {name for name, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.weight" in loaded


def _load_edited(folder, tmp_path, edit) -> None:
    tensors = dict(iterate_safetensors(folder))
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = load_hf_config(folder)
    build_model(config, torch.float32, CPU, TorchRefBackend(), weights=iterate_safetensors(tmp_path))


def test_missing_tensor_is_named(llama_folder, tmp_path):
    with pytest.raises(ValueError, match=r"missing tensors for 1 parameters: model\.layers\.1\.mlp\.gate_up_proj"):
        _load_edited(llama_folder, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def test_unexpected_tensor_is_named(llama_folder, tmp_path):
    def add_stray(tensors):
        tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_norm\.weight' matches no parameter"):
        _load_edited(llama_folder, tmp_path, add_stray)


def test_wrong_shape_is_a_clear_error(llama_folder, tmp_path):
    def truncate(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:10].clone()
    with pytest.raises(ValueError, match=r"shape \(10,\), expected \(64,\)"):
        _load_edited(llama_folder, tmp_path, truncate)


def test_rotary_inv_freq_in_old_checkpoints_is_ignored(llama_folder, tmp_path):
    def add_inv_freq(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    _load_edited(llama_folder, tmp_path, add_inv_freq)


def test_build_model_without_weights_needs_dummy_format():
    with pytest.raises(ValueError, match="needs a weights iterator"):
        build_model(tiny_config("llama"), torch.float32, CPU, TorchRefBackend(), weights=None, load_format="auto")


def test_iterate_safetensors_on_a_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        list(iterate_safetensors(tmp_path))

"""--quantization and the checkpoint's quantization_config resolve to one method, or a one-line error naming
what is supported."""
from __future__ import annotations

import types

import pytest

from sluice.config import EngineArgs, create_engine_config, DeviceConfig
from sluice.layers.quantization import resolve_quant_config
from tests.tiny_models import save_tiny_model


def _hf(quantization_config=None):
    config = types.SimpleNamespace()
    if quantization_config is not None:
        config.quantization_config = quantization_config
    return config


@pytest.mark.parametrize("flag, ckpt, message", [
    ("int3", None, "quantization must be one of fp8, awq, gptq, compressed-tensors"),
    ("awq", None, "only fp8 and rtn quantize an unquantized checkpoint at load"),
    (None, {"quant_method": "bitsandbytes"}, "checkpoint quantization 'bitsandbytes' is not supported; supported: fp8"),
    (None, {"quant_method": "rtn"}, "checkpoint quantization 'rtn' is not supported; supported: fp8, awq, gptq, "
                                    "compressed-tensors$"),
    ("fp8", {"quant_method": "awq", "bits": 4, "group_size": 128}, "--quantization fp8 conflicts with the checkpoint"),
    (None, {"quant_method": "awq", "bits": 3, "group_size": 128}, "awq supports bits 4, got 3"),
    (None, {"quant_method": "gptq", "bits": 2, "group_size": 128}, "gptq supports bits 4, 8, got 2"),
    (None, {"quant_method": "gptq", "bits": 4, "group_size": 96}, "gptq supports group_size -1, 32, 64, 128, got 96"),
    (None, {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
     "block-wise fp8 supports weight_block_size [n, k] with dynamic activations"),
])
def test_unsupported_quantization_is_a_one_line_error(flag, ckpt, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        resolve_quant_config(_hf(ckpt), flag)
    assert "\n" not in str(info.value)


def test_checkpoint_format_applies_without_the_flag_and_with_a_matching_one():
    ckpt = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}
    assert resolve_quant_config(_hf(ckpt), None).name == "gptq"
    assert resolve_quant_config(_hf(ckpt), "gptq").name == "gptq"
    assert resolve_quant_config(_hf(), None) is None
    assert resolve_quant_config(_hf(), "fp8").name == "fp8"


def test_engine_config_rejects_a_flag_that_conflicts_with_the_checkpoint(tmp_path):
    import json
    path = save_tiny_model(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--quantization gptq conflicts with the checkpoint's quantization 'awq'"):
        create_engine_config(EngineArgs(model=str(path), quantization="gptq"), DeviceConfig("cpu"))
    with pytest.raises(ValueError, match="quantization must be one of"):
        create_engine_config(EngineArgs(model=str(path), quantization="int4"), DeviceConfig("cpu"))


def test_rtn_quantizes_an_unquantized_checkpoint_at_load():
    config = resolve_quant_config(_hf(), "rtn")
    method = config.linear_method()
    assert config.name == "rtn" and (method.bits, method.group_size) == (4, 128)

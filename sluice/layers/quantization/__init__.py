"""Quantized linear layers: which method each layer gets, from the checkpoint's ``quantization_config``
or the ``--quantization`` flag.

    resolve_quant_config(hf_config, flag)  -> QuantConfig | None
        checkpoint says nothing, flag None       unquantized
        checkpoint says nothing, flag "fp8"      online FP8: the 16/32-bit weights quantized at load
        checkpoint says nothing, flag "rtn"      online 4-bit: round to nearest, asymmetric, group 128 (W4A16)
        checkpoint says "fp8" | "awq" | "gptq" | "compressed-tensors"
                                                 loaded in that format; a different flag is an error

See base.py for the method contract, fp8.py and w4a16.py for the formats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sluice.layers.quantization.base import (LinearMethod, QuantConfig, process_quantized_weights,
                                             quantization_context, unquantize_ignored_layers)
from sluice.layers.quantization.fp8 import Fp8BlockMethod, Fp8CheckpointMethod, Fp8OnlineMethod
from sluice.layers.quantization.w4a16 import AWQMethod, GPTQMethod, PackQuantizedMethod, RtnMethod

QUANTIZATION_METHODS = ("fp8", "awq", "gptq", "compressed-tensors", "rtn")
ONLINE_METHODS = {"fp8": Fp8OnlineMethod, "rtn": RtnMethod}  # quantize a 16/32-bit checkpoint at load
ONLINE_ONLY = ("rtn",)  # no checkpoint format of that name
GROUP_SIZES = (-1, 32, 64, 128)

__all__ = ["QUANTIZATION_METHODS", "QuantConfig", "resolve_quant_config", "quantization_context",
           "process_quantized_weights", "unquantize_ignored_layers"]


@dataclass(frozen=True)
class SimpleQuantConfig(QuantConfig):
    """A format whose every quantized linear layer gets the same kind of method."""

    name: str
    method_class: type
    method_kwargs: tuple[tuple[str, Any], ...] = ()
    ignore: tuple[str, ...] = ()

    def linear_method(self) -> LinearMethod:
        return self.method_class(**dict(self.method_kwargs))


def checkpoint_quantization_config(hf_config: Any) -> dict | None:
    raw = getattr(hf_config, "quantization_config", None)
    if raw is None:
        return None
    return raw if isinstance(raw, dict) else raw.to_dict()


def resolve_quant_config(hf_config: Any, flag: str | None) -> QuantConfig | None:
    """The quantization to load ``hf_config``'s checkpoint with; ValueError (one line) when unsupported."""
    if flag is not None and flag not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or None), got {flag!r}")
    ckpt = checkpoint_quantization_config(hf_config)
    if ckpt is None:
        if flag is None:
            return None
        if flag in ONLINE_METHODS:
            return SimpleQuantConfig(flag, ONLINE_METHODS[flag])
        raise ValueError(f"--quantization {flag} needs a checkpoint quantized in that format (its config.json has "
                         "no quantization_config); only fp8 and rtn quantize an unquantized checkpoint at load")
    method = str(ckpt.get("quant_method", "")).replace("_", "-")
    if method not in QUANTIZATION_METHODS or method in ONLINE_ONLY:
        raise ValueError(f"checkpoint quantization {method!r} is not supported; supported: "
                         f"{', '.join(m for m in QUANTIZATION_METHODS if m not in ONLINE_ONLY)}")
    if flag is not None and flag != method:
        raise ValueError(f"--quantization {flag} conflicts with the checkpoint's quantization {method!r}")
    return {"fp8": _fp8_config, "awq": _awq_config, "gptq": _gptq_config,
            "compressed-tensors": _compressed_tensors_config}[method](ckpt)


def _ignore_list(ckpt: dict, *keys: str) -> tuple[str, ...]:
    return tuple(name for key in keys for name in (ckpt.get(key) or ()))


def _fp8_config(ckpt: dict) -> QuantConfig:
    ignore = _ignore_list(ckpt, "ignored_layers", "modules_to_not_convert")
    scheme = ckpt.get("activation_scheme", "dynamic")
    if scheme not in ("static", "dynamic"):
        raise ValueError(f"fp8 activation_scheme must be static or dynamic, got {scheme!r}")
    block = ckpt.get("weight_block_size")
    if block is not None:
        if scheme != "dynamic" or len(block) != 2:
            raise ValueError(f"block-wise fp8 supports weight_block_size [n, k] with dynamic activations, "
                             f"got {block} with {scheme}")
        return SimpleQuantConfig("fp8", Fp8BlockMethod, (("block", tuple(block)),), ignore)
    return SimpleQuantConfig("fp8", Fp8CheckpointMethod, (("static_input_scale", scheme == "static"),), ignore)


def _check_int_bits(name: str, bits: int, group_size: int, allowed_bits: tuple[int, ...]) -> None:
    if bits not in allowed_bits:
        raise ValueError(f"{name} supports bits {', '.join(map(str, allowed_bits))}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{name} supports group_size {', '.join(map(str, GROUP_SIZES))}, got {group_size}")


def _awq_config(ckpt: dict) -> QuantConfig:
    bits, group_size = int(ckpt.get("bits", ckpt.get("w_bit", 4))), int(ckpt.get("group_size", ckpt.get("q_group_size", 128)))
    _check_int_bits("awq", bits, group_size, (4,))
    version = str(ckpt.get("version", "gemm")).lower()
    if version != "gemm" or not ckpt.get("zero_point", True):
        raise ValueError(f"awq supports version gemm with zero points, got version {version!r}, "
                         f"zero_point {ckpt.get('zero_point')}")
    return SimpleQuantConfig("awq", AWQMethod, (("bits", bits), ("group_size", group_size)),
                             _ignore_list(ckpt, "modules_to_not_convert"))


def _gptq_config(ckpt: dict) -> QuantConfig:
    bits, group_size = int(ckpt.get("bits", 4)), int(ckpt.get("group_size", 128))
    _check_int_bits("gptq", bits, group_size, (4, 8))
    fmt = ckpt.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"gptq supports checkpoint_format gptq or gptq_v2, got {fmt!r}")
    return SimpleQuantConfig("gptq", GPTQMethod, (("bits", bits), ("group_size", group_size),
                                                  ("zeros_minus_one", fmt == "gptq")),
                             _ignore_list(ckpt, "modules_to_not_convert"))


def _compressed_tensors_config(ckpt: dict) -> QuantConfig:
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate(ckpt)
    ignore = tuple(config.ignore or ())
    schemes = list(config.config_groups.values())
    if len(schemes) != 1 or "Linear" not in schemes[0].targets:
        raise ValueError("compressed-tensors checkpoints are supported with one config group targeting Linear, "
                         f"got {len(schemes)} groups targeting {[s.targets for s in schemes]}")
    weights, inputs = schemes[0].weights, schemes[0].input_activations
    fmt = str(config.format)
    strategy = str(getattr(weights.strategy, "value", weights.strategy))
    wtype = str(getattr(weights.type, "value", weights.type))
    if wtype == "float" and weights.num_bits == 8 and inputs is not None and strategy in ("tensor", "channel"):
        input_strategy = str(getattr(inputs.strategy, "value", inputs.strategy))
        static = not inputs.dynamic
        if (static and input_strategy != "tensor") or (not static and input_strategy != "token"):
            raise ValueError(f"compressed-tensors fp8 supports static per-tensor or dynamic per-token "
                             f"activations, got {input_strategy} (dynamic={inputs.dynamic})")
        return SimpleQuantConfig("compressed-tensors", Fp8CheckpointMethod, (("static_input_scale", static),), ignore)
    if fmt == "pack-quantized" and wtype == "int" and inputs is None:
        group_size = -1 if strategy == "channel" else int(weights.group_size or 0)
        if not weights.symmetric or weights.actorder is not None or strategy not in ("channel", "group"):
            raise ValueError("compressed-tensors pack-quantized supports symmetric channel or group weights "
                             f"without act-order, got symmetric={weights.symmetric} strategy={strategy} "
                             f"actorder={weights.actorder}")
        _check_int_bits("compressed-tensors pack-quantized", weights.num_bits, group_size, (4, 8))
        return SimpleQuantConfig("compressed-tensors", PackQuantizedMethod,
                                 (("bits", weights.num_bits), ("group_size", group_size)), ignore)
    raise ValueError(f"compressed-tensors scheme not supported (format {fmt}, {weights.num_bits}-bit {wtype} weights, "
                     f"inputs {inputs}); supported: float8 W8A8 (tensor/channel weights), pack-quantized W4A16/W8A16")

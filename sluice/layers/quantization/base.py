"""The contract between a linear layer and its quantization.

A ``LinearBase`` asks the active ``QuantConfig`` (set around model construction by
``quantization_context``) for its ``linear_method`` when it is built. The method owns the layer's
weight tensors:

    create_weights(layer)                  parameters the checkpoint fills (with weight loaders)
    process_weights_after_loading(layer)   checkpoint form -> compute form (quantize, unpack, fuse scales)
    apply(layer, x)                        y = x W^T + b

Pre-quantized formats (``CheckpointShardsMethod``) register one placeholder parameter per checkpoint
tensor name (``weight_scale``, ``qweight``...). Their loaders keep each shard's tensors as they come
(q, k and v of a fused qkv each bring their own scales); after loading, every shard is turned into
the method's canonical form with the output features on dim 0, and the shards are concatenated.
Per-shard scales thereby become per-output-channel scales of the fused layer, exactly.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from sluice.layers.linear import LinearBase


class LinearMethod:
    def create_weights(self, layer: "LinearBase") -> None:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        pass

    def apply(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethod):
    """A dense weight [output_size, input_size] in the model dtype and ``F.linear``."""

    def create_weights(self, layer: "LinearBase") -> None:
        layer.weight = nn.Parameter(torch.empty(layer.output_size, layer.input_size), requires_grad=False)
        layer.weight.weight_loader = layer.weight_loader
        layer.weight.num_shards = layer.num_shards

    def apply(self, layer: "LinearBase", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class QuantConfig:
    """One checkpoint's (or flag's) quantization: which method each linear layer gets."""

    ignore: tuple[str, ...] = ()  # module names (or "re:" patterns) left unquantized

    def linear_method(self) -> LinearMethod:
        raise NotImplementedError

    def is_ignored(self, module_name: str) -> bool:
        for entry in self.ignore:
            if entry.startswith("re:"):
                if re.match(entry[3:], module_name):
                    return True
            elif module_name == entry or module_name.endswith("." + entry) or entry.endswith("." + module_name):
                return True
        return False


_ACTIVE: contextvars.ContextVar[QuantConfig | None] = contextvars.ContextVar("sluice_quant_config", default=None)


@contextlib.contextmanager
def quantization_context(config: QuantConfig | None) -> Iterator[None]:
    """Linear layers built inside take their ``linear_method`` from ``config`` (None: unquantized)."""
    token = _ACTIVE.set(config)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def linear_method_for_new_layer() -> LinearMethod:
    config = _ACTIVE.get()
    return UnquantizedLinearMethod() if config is None else config.linear_method()


# Checkpoint names of a fused layer's parts (the inverse of the models' stacked_params_mapping).
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def unquantize_ignored_layers(model: nn.Module, config: QuantConfig | None) -> None:
    """Layers the checkpoint lists in its ``ignore`` list go back to dense weights (before loading)."""
    if config is None or not config.ignore:
        return
    for name, module in model.named_modules():
        if not hasattr(module, "linear_method"):
            continue
        prefix, _, leaf = name.rpartition(".")
        names = [f"{prefix}.{part}" for part in _FUSED_PARTS.get(leaf, ())] or [name]
        ignored = [config.is_ignored(n) for n in names]
        if any(ignored) and not all(ignored):
            raise ValueError(f"{name}: the checkpoint quantizes only some of its fused parts {names}")
        if all(ignored):
            module.set_linear_method(UnquantizedLinearMethod())


def process_quantized_weights(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "linear_method"):  # the linear layers
            module.linear_method.process_weights_after_loading(module)


class CheckpointShardsMethod(LinearMethod):
    """Base of pre-quantized formats: keeps each shard's checkpoint tensors, fuses them after loading.

    ``required``/``optional``: checkpoint tensor names (the part after the module name).
    ``shard_to_canonical`` turns one shard's tensors into tensors with output features on dim 0
    (``shared``: names that are the same for every shard, e.g. a per-input-channel g_idx; the
    shards' values are combined by ``combine_shared``); ``finalize`` sets the layer's compute tensors.
    """

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()

    def create_weights(self, layer: "LinearBase") -> None:
        layer.checkpoint_shards = {}
        for name in self.required + self.optional:
            placeholder = nn.Parameter(torch.empty(0), requires_grad=False)
            placeholder.weight_loader = self._keep_shard(layer, name)
            placeholder.num_shards = layer.num_shards if name in self.required else 0
            layer.register_parameter(name, placeholder)

    @staticmethod
    def _keep_shard(layer: "LinearBase", name: str):
        def weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
            layer.check_shard_id(shard_id)
            layer.checkpoint_shards.setdefault(shard_id, {})[name] = loaded_weight
        return weight_loader

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        shards = layer.checkpoint_shards
        if not shards:
            raise ValueError(f"{type(self).__name__}: no checkpoint tensors were loaded into a quantized layer "
                             "(dummy weights need an unquantized checkpoint, optionally with --quantization fp8)")
        canonical = []
        for shard_id, size in zip(layer.shard_ids, layer.shard_sizes):
            tensors = {k: v.to(layer.device)
                       for k, v in shards[shard_id].items()}
            parts = self.shard_to_canonical(layer, tensors, size)
            for key, value in parts.items():
                if key not in self.shared and value.shape[0] != size:
                    raise ValueError(f"{type(layer).__name__} shard {shard_id!r}: {key} has {value.shape[0]} "
                                     f"output features, expected {size}")
            canonical.append(parts)
        for name in self.required + self.optional:
            delattr(layer, name)
        del layer.checkpoint_shards
        fused = {key: (self.combine_shared(key, [c[key] for c in canonical]) if key in self.shared
                       else torch.cat([c[key] for c in canonical]))
                 for key in canonical[0]}
        self.finalize(layer, fused)

    def shard_to_canonical(self, layer: "LinearBase", tensors: dict[str, torch.Tensor],
                           num_rows: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def combine_shared(self, key: str, values: list[torch.Tensor]) -> torch.Tensor:
        if any(not torch.equal(values[0], v) for v in values[1:]):
            raise ValueError(f"fused shards disagree on {key}")
        return values[0]

    def finalize(self, layer: "LinearBase", tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


def set_tensor(layer: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """A compute tensor of a quantized layer, as a frozen parameter (moves with the model, counted in its size)."""
    if value is None:
        setattr(layer, name, None)
    else:
        layer.register_parameter(name, nn.Parameter(value, requires_grad=False))

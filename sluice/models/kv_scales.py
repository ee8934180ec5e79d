"""KV cache scales in checkpoints: the per-layer k_scale / v_scale an fp8 KV cache is written with.

Checkpoints carry them under several names; all mean the same per-tensor scale of one layer's keys
or values (the names vLLM reads):

    model.layers.N.self_attn.k_scale / v_scale              HF fp8, llm-compressor, compressed-tensors
    model.layers.N.self_attn.attn.k_scale / v_scale          kv_cache_scheme
    model.layers.N.self_attn.k_proj.output_scale / v_proj.output_scale     older compressed-tensors
    model.layers.N.self_attn.kv_scale                        one scale for both (older fp8 checkpoints)

``KVScaleCollector.filter`` takes them out of the weight stream (no model parameter has these names),
and ``apply`` gives layer N's Attention module its scales. Query and probability scales (``q_scale``,
``prob_scale``: fp8 attention math, which sluice does not do) are dropped. With ``--kv-cache-dtype auto``
the scales are loaded but unused.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from sluice.layers.attention import Attention

_LAYER = re.compile(r"layers\.(\d+)\.")
# name suffix -> which of [k_scale, v_scale] it sets
_KV_SCALE_SUFFIXES = {".k_scale": (0,), ".v_scale": (1,), ".k_proj.output_scale": (0,),
                      ".v_proj.output_scale": (1,), ".kv_scale": (0, 1)}
_DROPPED_SUFFIXES = (".q_scale", ".prob_scale", ".q_proj.output_scale")


class KVScaleCollector:
    def __init__(self) -> None:
        self.scales: dict[int, list[float | None]] = {}  # layer index -> [k_scale, v_scale] as found

    def filter(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors without its KV (and query) scales, which are kept here."""
        for name, tensor in weights:
            which = self._kv_scale_slots(name)
            if which is None:
                yield name, tensor
                continue
            if not which:
                continue  # a dropped scale
            layer = _LAYER.search(name)
            if layer is None:
                raise ValueError(f"checkpoint tensor {name!r} looks like a KV cache scale but names no layer")
            # Per-head scales (a tensor of num_kv_heads) keep their largest: per-tensor scales cover every head.
            value = float(tensor.float().max())
            if not value > 0.0:
                raise ValueError(f"checkpoint KV cache scale {name!r} must be positive, got {value}")
            slots = self.scales.setdefault(int(layer.group(1)), [None, None])
            for slot in which:
                slots[slot] = value

    @staticmethod
    def _kv_scale_slots(name: str) -> tuple[int, ...] | None:
        """Which of [k_scale, v_scale] a tensor sets: () for a scale that is dropped, None for any other tensor."""
        for suffix, slots in _KV_SCALE_SUFFIXES.items():
            if name.endswith(suffix):
                return slots
        return () if name.endswith(_DROPPED_SUFFIXES) else None

    def apply(self, model: nn.Module) -> dict[int, tuple[float, float]]:
        """Gives each layer found its scales (a missing half stays 1.0); returns them by layer index."""
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        applied: dict[int, tuple[float, float]] = {}
        for index, (k_scale, v_scale) in sorted(self.scales.items()):
            if index >= len(layers):
                raise ValueError(f"checkpoint has KV cache scales for layer {index}, the model has {len(layers)}")
            scales = layers[index].kv_scales
            if k_scale is not None:
                scales[0] = k_scale
            if v_scale is not None:
                scales[1] = v_scale
            applied[index] = (float(scales[0]), float(scales[1]))
        return applied

"""LoRAManager: the runner's side of multi-LoRA. It wraps the model's linear layers, keeps loaded adapters
in host memory (an LRU of ``max_cpu_loras``), moves them into the ``max_loras`` device slots between steps,
and tells every layer which token rows use which slot.

PEFT names its tensors after the separate projections; sluice fuses some of them. The model's
``stacked_params_mapping`` (the same table its weight loader uses) gives the fused layer and sub-index:

    base_model.model.model.layers.3.self_attn.k_proj.lora_A.weight  ->  model.layers.3.self_attn.qkv_proj, sub 1
    base_model.model.model.layers.3.mlp.down_proj.lora_B.weight     ->  model.layers.3.mlp.down_proj, sub 0
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from sluice.config import LoRAConfig
from sluice.layers.linear import LinearBase
from sluice.lora.layers import LoRABatch, LoRALinearMethod, LoRASlotWeights
from sluice.lora.peft_config import WEIGHTS_NAME, read_peft_config
from sluice.lora.request import LoRARequest

logger = logging.getLogger(__name__)

_LORA_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_LORA_LAYERS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(slots=True)
class LoRAAdapter:
    """An adapter in host memory: per (sluice layer name, sub-index), A [r, in] and B [out_i, r] * scaling."""
    lora_int_id: int
    rank: int
    weights: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]


class LoRAManager:
    def __init__(self, model: torch.nn.Module, config: LoRAConfig, dtype: torch.dtype,
                 device: torch.device, max_num_tokens: int | None = None, use_kernels: bool | None = None) -> None:
        """``max_num_tokens``: the most token rows of a step (sizes the kernels' buffers; needed with them).
        ``use_kernels``: the Triton kernels (default: on CUDA) rather than the torch path."""
        self.config = config
        self.dtype, self.device = dtype, device
        self.batch = LoRABatch(slot_ranks=[0] * config.max_loras)
        self.layers: dict[str, LoRASlotWeights] = {}
        for name, module in model.named_modules():
            if isinstance(module, LinearBase) and name.rsplit(".", 1)[-1] in _LORA_LAYERS:
                sizes = getattr(module, "output_sizes", None) or [module.output_size]
                weights = LoRASlotWeights(module.input_size, sizes, config.max_loras, config.max_lora_rank,
                                          dtype, device)
                module.linear_method = LoRALinearMethod(module.linear_method, weights, self.batch)
                self.layers[name] = weights
        if use_kernels if use_kernels is not None else device.type == "cuda":
            if max_num_tokens is None:
                raise ValueError("the LoRA kernels need max_num_tokens")
            from sluice.lora.triton_ops import LoRAStepIndex
            max_subs = max((len(w.output_sizes) for w in self.layers.values()), default=1)
            self.batch.step_index = LoRAStepIndex.allocate(max_num_tokens, config.max_loras, device)
            self.batch.shrunk = torch.zeros(max_subs, max_num_tokens, config.max_lora_rank, dtype=torch.float32,
                                            device=device)
        self._shard_index = _shard_indices(getattr(model, "stacked_params_mapping", []))
        self.requests: dict[int, LoRARequest] = {}  # every adapter seen: reloaded from its path when evicted
        self.cpu_cache: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self.slots: list[int | None] = [None] * config.max_loras  # adapter id per slot
        self._slot_last_used = [0] * config.max_loras
        self._step = 0

    # ---- adapters in host memory --------------------------------------------------------
    def add_adapter(self, request: LoRARequest) -> LoRAAdapter:
        """Loads (or finds) the adapter in host memory; raises ValueError for a checkpoint sluice cannot apply."""
        known = self.requests.get(request.lora_int_id)
        if known is not None and known.lora_path != request.lora_path:
            raise ValueError(f"lora_int_id {request.lora_int_id} is already adapter {known.lora_name!r} at "
                             f"{known.lora_path!r}, not {request.lora_path!r}")
        adapter = self.cpu_cache.get(request.lora_int_id)
        if adapter is None:
            adapter = self._load(request)
            self.cpu_cache[request.lora_int_id] = adapter
            while len(self.cpu_cache) > self.config.max_cpu_loras:
                self.cpu_cache.popitem(last=False)
        self.cpu_cache.move_to_end(request.lora_int_id)
        self.requests[request.lora_int_id] = request
        return adapter

    def _load(self, request: LoRARequest) -> LoRAAdapter:
        from safetensors.torch import load_file

        peft = read_peft_config(request.lora_path, self.config.max_lora_rank)
        tensors = load_file(os.path.join(request.lora_path, WEIGHTS_NAME))
        pairs: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        unsupported = []
        for key, tensor in tensors.items():
            match = _LORA_TENSOR.match(key)
            target = self._target(match.group("module")) if match else None
            if target is None:
                unsupported.append(key)
                continue
            pairs.setdefault(target, {})[match.group("ab")] = tensor
        if unsupported:
            raise ValueError(f"LoRA adapter {request.lora_path!r}: tensors sluice cannot apply (only the q/k/v/o "
                             f"and gate/up/down projections): {', '.join(unsupported[:6])}")
        weights = {}
        for (name, sub), ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"LoRA adapter {request.lora_path!r}: {name} has lora_A or lora_B but not both")
            a, b = ab["A"], ab["B"]
            layer = self.layers[name]
            expected_a = (peft.rank, layer.lora_a[sub].shape[-1])
            expected_b = (layer.output_sizes[sub], peft.rank)
            if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
                raise ValueError(f"LoRA adapter {request.lora_path!r}: {name} (sub {sub}) has A {tuple(a.shape)} "
                                 f"and B {tuple(b.shape)}, expected {expected_a} and {expected_b}")
            weights[(name, sub)] = (a.to(self.dtype), (b.float() * peft.scaling).to(self.dtype))
        return LoRAAdapter(request.lora_int_id, peft.rank, weights)

    def _target(self, module: str) -> tuple[str, int] | None:
        """(sluice layer name, sub-index) of a PEFT module path, or None when no LoRA layer matches."""
        for fused, separate, sub in self._shard_index:
            if module.endswith(separate):
                name = module[: -len(separate)] + fused
                return (name, sub) if name in self.layers else None
        return (module, 0) if module in self.layers else None

    # ---- one step -----------------------------------------------------------------------
    def prepare_step(self, token_lora_ids: np.ndarray) -> None:
        """Puts this step's adapters in slots and tells the layers which rows use which (0: base model)."""
        self._step += 1
        ids = [int(i) for i in np.unique(token_lora_ids) if i != 0]
        if len(ids) > self.config.max_loras:
            raise RuntimeError(f"a step uses {len(ids)} adapters, more than max_loras={self.config.max_loras}")
        slot_of = {lora_id: self._slot_for(lora_id, ids) for lora_id in ids}
        if self.batch.step_index is not None:
            token_slots = np.full(len(token_lora_ids), -1, dtype=np.int32)
            for lora_id, slot in slot_of.items():
                token_slots[token_lora_ids == lora_id] = slot
            self.batch.step_index.fill(token_slots)
            self.batch.active = bool(ids)
            return
        segments: list[tuple[int, slice | torch.Tensor]] = []
        if len(ids) == 1 and (token_lora_ids == ids[0]).all():
            segments.append((slot_of[ids[0]], slice(0, len(token_lora_ids))))
        else:
            for lora_id, slot in slot_of.items():
                rows = np.flatnonzero(token_lora_ids == lora_id)
                segments.append((slot, torch.from_numpy(rows).to(self.device, non_blocking=True)))
        self.batch.segments = segments

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """While CUDA graphs are captured: the layers launch the kernels (in the warm-up passes too, so that
        Triton compiles outside the capture) over an index with no adapter rows; at replay the index the
        runner fills for the step decides which rows they touch."""
        if self.batch.step_index is None:
            yield
            return
        self.batch.step_index.fill(np.zeros(0, dtype=np.int32))
        self.batch.active = True
        try:
            yield
        finally:
            self.batch.active = False

    def _slot_for(self, lora_id: int, needed: list[int]) -> int:
        if lora_id in self.slots:
            slot = self.slots.index(lora_id)
        else:
            free = [s for s, held in enumerate(self.slots) if held is None or held not in needed]
            slot = min(free, key=lambda s: (self.slots[s] is not None, self._slot_last_used[s]))
            self._load_slot(slot, lora_id)
        self._slot_last_used[slot] = self._step
        return slot

    def _load_slot(self, slot: int, lora_id: int) -> None:
        request = self.requests.get(lora_id)
        if request is None:
            raise RuntimeError(f"adapter {lora_id} was never added")
        adapter = self.add_adapter(request)
        for name, layer in self.layers.items():
            for sub in range(len(layer.output_sizes)):
                a_b = adapter.weights.get((name, sub))
                layer.set_slot(slot, sub, *(a_b if a_b is not None else (None, None)))
        self.slots[slot] = lora_id
        self.batch.slot_ranks[slot] = adapter.rank


def _shard_indices(stacked_params_mapping: list[tuple[str, str, str | int]]) -> list[tuple[str, str, int]]:
    """(fused suffix, separate suffix, sub-index) from a model's (".qkv_proj", ".q_proj", "q") table: the
    sub-index is the shard's position among its fused layer's shards."""
    seen: dict[str, int] = {}
    result = []
    for fused, separate, _ in stacked_params_mapping:
        result.append((fused, separate, seen.get(fused, 0)))
        seen[fused] = seen.get(fused, 0) + 1
    return result

"""The LoRA hook on the linear layers, and its torch compute (the CPU path).

A model built with LoRA enabled has each targetable linear layer's ``linear_method`` wrapped in a
``LoRALinearMethod``: the base method's output plus ``apply_lora(x, out, slot_weights, batch)``. A model
built without it is untouched, so LoRA off costs nothing.

Per layer, every sub-projection (q, k, v of qkv_proj; gate, up of gate_up_proj; one for o and down) keeps
its adapters in ``max_loras`` slots, ranks zero-padded to ``max_lora_rank``, the scaling folded into B:

    A [slots, r_max, in]      B [slots, out_i, r_max]      out[:, off_i : off_i + out_i] += x A[s]^T B[s]^T

Each step the runner sets the ``LoRABatch``: which token rows use which slot (tokens of the base model
use none). Rows are grouped by slot, so one step costs one shrink and one expand matmul per slot and
sub-projection that slot's adapter targets:

    tokens   t0 t1 t2 t3 t4 t5          segments  slot 0 -> rows [0, 1, 4]
    slot      0  0  -  1  0  1                    slot 1 -> rows [3, 5]        (t2: base)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class LoRABatch:
    """This step's token rows per slot; set by the runner before each forward, read by every layer."""
    # (slot, rows): rows is a slice when the step's tokens are one contiguous run, else an index tensor.
    segments: list[tuple[int, slice | torch.Tensor]] = field(default_factory=list)
    # slot -> rank of the adapter loaded there (the matmuls use only that many of the r_max rows).
    slot_ranks: list[int] = field(default_factory=list)


class LoRASlotWeights:
    """One linear layer's adapter slots: A and B per sub-projection (see the module docstring)."""

    def __init__(self, input_size: int, output_sizes: list[int], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.lora_a = [torch.zeros(max_loras, max_rank, input_size, dtype=dtype, device=device)
                       for _ in output_sizes]
        self.lora_b = [torch.zeros(max_loras, size, max_rank, dtype=dtype, device=device) for size in output_sizes]
        # Host-side: which (slot, sub-projection) holds a non-zero adapter, so untargeted ones cost nothing.
        self.active = [[False] * len(output_sizes) for _ in range(max_loras)]

    def set_slot(self, slot: int, sub: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Loads A [r, in] and B [out_i, r] (scaled) into a slot; None clears it."""
        self.lora_a[sub][slot].zero_()
        self.lora_b[sub][slot].zero_()
        self.active[slot][sub] = a is not None
        if a is not None:
            rank = a.shape[0]
            self.lora_a[sub][slot, :rank].copy_(a)
            self.lora_b[sub][slot, :, :rank].copy_(b)


def apply_lora(x: torch.Tensor, out: torch.Tensor, weights: LoRASlotWeights, batch: LoRABatch) -> torch.Tensor:
    """out += the LoRA delta of each token's adapter (grouped shrink and expand matmuls); returns out."""
    for slot, rows in batch.segments:
        active = weights.active[slot]
        if not any(active):
            continue
        rank = batch.slot_ranks[slot]
        xs = x[rows]
        for sub, offset in enumerate(weights.offsets):
            if not active[sub]:
                continue
            size = weights.output_sizes[sub]
            shrunk = xs @ weights.lora_a[sub][slot, :rank].t()  # [n, r]
            delta = shrunk @ weights.lora_b[sub][slot, :, :rank].t()  # [n, out_i]
            target = out[:, offset:offset + size]
            if isinstance(rows, slice):
                target[rows] += delta
            else:
                target.index_add_(0, rows, delta)
    return out


class LoRALinearMethod:
    """Wraps a layer's linear method: the base output, then the LoRA delta of this step's adapters."""

    def __init__(self, base_method, weights: LoRASlotWeights, batch: LoRABatch) -> None:
        self.base_method = base_method
        self.weights = weights
        self.batch = batch

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = self.base_method.apply(layer, x)
        if not self.batch.segments:
            return out
        return apply_lora(x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]), self.weights, self.batch
                          ).view(out.shape)

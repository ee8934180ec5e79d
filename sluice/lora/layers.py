"""The LoRA hook on the linear layers, and its torch compute (the CPU path).

A model built with LoRA enabled has each targetable linear layer's ``linear_method`` wrapped in a
``LoRALinearMethod``: the base method's output plus ``apply_lora(x, out, slot_weights, batch)``. A model
built without it is untouched, so LoRA off costs nothing.

Per layer, every sub-projection (q, k, v of qkv_proj; gate, up of gate_up_proj; one for o and down) keeps
its adapters in ``max_loras`` slots, ranks zero-padded to ``max_lora_rank``, the scaling folded into B:

    A [slots, r_max, in]      B [slots, out_i, r_max]      out[:, off_i : off_i + out_i] += x A[s]^T B[s]^T

The sub-projections' A's are one tensor [subs, slots, r_max, in] and their B's one [slots, out, r_max] (B's
rows the fused output columns), ``lora_a[i]`` and ``lora_b[i]`` views into them.

Each step the runner sets the ``LoRABatch``: which token rows use which slot (tokens of the base model
use none). On the CPU (``apply_lora``, also the reference) rows are grouped by slot, so one step costs one
shrink and one expand matmul per slot and sub-projection that slot's adapter targets:

    tokens   t0 t1 t2 t3 t4 t5          segments  slot 0 -> rows [0, 1, 4]
    slot      0  0  -  1  0  1                    slot 1 -> rows [3, 5]        (t2: base)

On CUDA the batch carries ``step_index`` instead (persistent device buffers, see triton_ops.py) and each
layer runs one Triton shrink and one expand launch for all its sub-projections; CUDA graphs capture them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sluice.lora.triton_ops import LoRAStepIndex


@dataclass(slots=True)
class LoRABatch:
    """This step's token rows per slot; set by the runner before each forward, read by every layer."""
    # (slot, rows): rows is a slice when the step's tokens are one contiguous run, else an index tensor.
    segments: list[tuple[int, slice | torch.Tensor]] = field(default_factory=list)
    # slot -> rank of the adapter loaded there (the matmuls use only that many of the r_max rows).
    slot_ranks: list[int] = field(default_factory=list)
    # CUDA: the rows' slots on the device (triton_ops.LoRAStepIndex) and the float32 shrink output
    # [max subs, max_num_tokens, r_max] every layer shares; None on the CPU.
    step_index: LoRAStepIndex | None = None
    shrunk: torch.Tensor | None = None
    active: bool = False  # CUDA: whether any row of this step has an adapter (else eager steps skip the kernels)


class LoRASlotWeights:
    """One linear layer's adapter slots: A and B per sub-projection (see the module docstring)."""

    def __init__(self, input_size: int, output_sizes: list[int], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]
        self.a_stacked = torch.zeros(len(output_sizes), max_loras, max_rank, input_size, dtype=dtype, device=device)
        self.b_stacked = torch.zeros(max_loras, sum(output_sizes), max_rank, dtype=dtype, device=device)
        self.lora_a = list(self.a_stacked.unbind(0))
        self.lora_b = [self.b_stacked[:, offset:offset + size] for offset, size in zip(self.offsets, output_sizes)]
        # For the kernels: column offsets of the sub-projections, [subs + 1] on the device.
        self.sub_offsets = torch.tensor(self.offsets + [sum(output_sizes)], dtype=torch.int32, device=device)
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
        batch = self.batch
        if batch.step_index is not None:
            # active also while graphs are captured (LoRAManager.capturing): replays read the step's index.
            if batch.active:
                apply_lora_kernels(x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]), self.weights, batch)
            return out
        if not batch.segments:
            return out
        return apply_lora(x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]), self.weights, batch
                          ).view(out.shape)


def apply_lora_kernels(x: torch.Tensor, out: torch.Tensor, weights: LoRASlotWeights, batch: LoRABatch) -> None:
    """out += the LoRA delta with the Triton kernels (CUDA): one shrink and one expand launch per layer."""
    from sluice.lora.triton_ops import lora_expand, lora_shrink

    lora_shrink(x, weights.a_stacked, batch.shrunk, batch.step_index)
    lora_expand(batch.shrunk, weights.b_stacked, out, weights.sub_offsets, max(weights.output_sizes),
                batch.step_index)

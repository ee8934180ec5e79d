"""The LoRA hook's torch compute: grouped shrink/expand per slot equals each token's own x A^T B^T on the
right output columns, padded ranks and untargeted sub-projections included; a step without adapters is the
base layer's output unchanged."""
from __future__ import annotations

import torch

from sluice.layers.linear import MergedColumnParallelLinear
from sluice.lora.layers import LoRABatch, LoRALinearMethod, LoRASlotWeights


def test_grouped_rows_get_their_slots_delta_on_their_sub_projection():
    torch.manual_seed(0)
    layer = MergedColumnParallelLinear(12, [5, 7])
    layer.weight.data.normal_()
    weights = LoRASlotWeights(12, [5, 7], max_loras=2, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    a0, b0 = torch.randn(2, 12), torch.randn(7, 2)  # slot 0: rank 2 on the second sub-projection only
    a1, b1 = torch.randn(4, 12), torch.randn(5, 4)  # slot 1: rank 4 on the first
    weights.set_slot(0, 1, a0, b0)
    weights.set_slot(1, 0, a1, b1)
    batch = LoRABatch(slot_ranks=[2, 4])
    layer.linear_method = LoRALinearMethod(layer.linear_method, weights, batch)
    x = torch.randn(6, 12)
    base = x @ layer.weight.t()
    assert torch.equal(layer(x), base)  # no segments: the base output
    batch.segments = [(0, torch.tensor([0, 1, 4])), (1, torch.tensor([3, 5]))]  # row 2: base model
    expected = base.clone()
    expected[[0, 1, 4], 5:] += x[[0, 1, 4]] @ a0.t() @ b0.t()
    expected[[3, 5], :5] += x[[3, 5]] @ a1.t() @ b1.t()
    torch.testing.assert_close(layer(x), expected)
    batch.segments = [(1, slice(0, 6))]  # one adapter over the whole step
    expected = base.clone()
    expected[:, :5] += x @ a1.t() @ b1.t()
    torch.testing.assert_close(layer(x), expected)

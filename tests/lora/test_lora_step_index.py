"""With the kernels on (CUDA), LoRAManager.prepare_step rewrites the per-row slot index that captured CUDA
graphs read in place: same buffers, the step's slots, adapters moving between slots included. Filling the
index needs no GPU, so this runs on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sluice.config import LoRAConfig
from sluice.layers.linear import MergedColumnParallelLinear
from sluice.lora.manager import LoRAAdapter, LoRAManager
from sluice.lora.request import LoRARequest

pytest.importorskip("triton")


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(16, [8, 8])


def _manager_with_adapters(lora_ids: list[int]) -> LoRAManager:
    model = torch.nn.Module()
    model.mlp = _Block()
    manager = LoRAManager(model, LoRAConfig(max_loras=2, max_lora_rank=4, max_cpu_loras=len(lora_ids)),
                          torch.float32, torch.device("cpu"), max_num_tokens=8, use_kernels=True)
    for lora_id in lora_ids:
        manager.requests[lora_id] = LoRARequest(f"a{lora_id}", lora_id, f"/adapters/{lora_id}")
        weights = {("mlp.gate_up_proj", 0): (torch.full((4, 16), float(lora_id)), torch.ones(8, 4))}
        manager.cpu_cache[lora_id] = LoRAAdapter(lora_id, 4, weights)
    return manager


def _buffers(manager: LoRAManager) -> list[int]:
    step = manager.batch.step_index
    return [t.data_ptr() for t in (step.index, step.token_slots, step.sorted_rows, step.slot_start,
                                   step.slot_num_rows, manager.batch.shrunk)]


def test_prepare_step_rewrites_the_slot_index_in_place_as_adapters_change_slots():
    manager = _manager_with_adapters([1, 2, 3])
    step = manager.batch.step_index
    pointers = _buffers(manager)
    manager.prepare_step(np.array([1, 1, 0, 2, 1]))
    slot_1, slot_2 = manager.slots.index(1), manager.slots.index(2)
    assert step.token_slots.tolist() == [slot_1, slot_1, -1, slot_2, slot_1, -1, -1, -1]
    assert manager.batch.active
    manager.prepare_step(np.array([3, 2]))  # adapter 3 takes adapter 1's slot (2 is needed)
    assert manager.slots[slot_1] == 3 and manager.slots[slot_2] == 2
    assert step.token_slots.tolist() == [slot_1, slot_2, -1, -1, -1, -1, -1, -1]
    assert step.slot_num_rows.tolist() == [1, 1]
    assert manager.layers["mlp.gate_up_proj"].a_stacked[0, slot_1, 0, 0].item() == 3.0  # its weights moved in
    manager.prepare_step(np.array([0, 0, 0]))  # base model only: the kernels are skipped when eager
    assert not manager.batch.active and step.token_slots.tolist() == [-1] * 8
    assert step.slot_num_rows.tolist() == [0, 0]
    assert _buffers(manager) == pointers


def test_capturing_launches_the_kernels_over_an_index_with_no_adapter_rows():
    manager = _manager_with_adapters([1])
    manager.prepare_step(np.array([1, 1]))
    with manager.capturing():
        assert manager.batch.active
        assert manager.batch.step_index.token_slots.tolist() == [-1] * 8
        assert manager.batch.step_index.slot_num_rows.tolist() == [0, 0]
    assert not manager.batch.active

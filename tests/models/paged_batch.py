"""Builds packed batches and their AttentionMetadata by hand, the way the model runner does.

Each request in a step is (its token ids, num_computed_tokens, how many to run now); its
blocks come from a shared pool in a deliberately scrambled order, so a wrong block_table or
slot_mapping shows up as wrong logits rather than passing by accident.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sluice.attention.backend import AttentionMetadata


@dataclass
class StepRequest:
    token_ids: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_ids: list[int]


def allocate_kv_caches(model: torch.nn.Module, num_blocks: int, block_size: int) -> list[torch.Tensor]:
    """Zeroed per-layer caches [2, num_blocks, block_size, num_kv_heads, head_dim] on the model's device."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_kv_heads = config.num_key_value_heads
    return [torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=model.dtype, device=model.device)
            for _ in range(config.num_hidden_layers)]


def scrambled_block_ids(num_requests: int, blocks_per_request: int, num_blocks: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    return [order[i * blocks_per_request:(i + 1) * blocks_per_request] for i in range(num_requests)]


def build_step(requests: list[StepRequest], block_size: int, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """-> (input_ids [T], positions [T], metadata) for one packed step, tensors on ``device``."""
    input_ids, positions, slots, query_start_loc, seq_lens = [], [], [], [0], []
    for req in requests:
        start, end = req.num_computed_tokens, req.num_computed_tokens + req.num_scheduled_tokens
        input_ids += req.token_ids[start:end]
        for pos in range(start, end):
            slots.append(req.block_ids[pos // block_size] * block_size + pos % block_size)
        positions += list(range(start, end))
        query_start_loc.append(query_start_loc[-1] + req.num_scheduled_tokens)
        seq_lens.append(end)
    max_blocks = max(len(r.block_ids) for r in requests)
    block_table = torch.tensor([r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in requests],
                               dtype=torch.int32, device=device)
    metadata = AttentionMetadata(
        num_actual_tokens=len(input_ids), num_reqs=len(requests),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_table=block_table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(r.num_scheduled_tokens for r in requests), max_seq_len=max(seq_lens),
        query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens)
    return (torch.tensor(input_ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device), metadata)

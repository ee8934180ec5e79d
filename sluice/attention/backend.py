"""Attention metadata and the backend protocol shared by the CPU reference and the CUDA path.

One batch mixes prefill chunks and decodes. Tokens of all requests are packed in one
flat dimension; request i owns query rows ``query_start_loc[i]:query_start_loc[i+1]``,
which are the *last* ``query_len`` positions of its ``seq_lens[i]`` context tokens.

    tokens:          [a0 a1 a2 a3 | b7 | c0 c1]      (A: prefill chunk, B: decode, C: chunk)
    query_start_loc: [0, 4, 5, 7]
    seq_lens:        [4, 8, 2]     (B attends to 8 tokens, 7 of them already cached)

KV cache of one layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = keys, 1 = values). Token position p of request i lives in block
``block_table[i, p // block_size]`` at offset ``p % block_size``; its flat slot is
``block_id * block_size + offset``, and ``slot_mapping[t]`` is that slot for packed token t.

Everything a backend decides on the host from the step's shapes (the Triton backend's kernel
configs, launches and split counts) is its *launch plan*: the model runner builds it once per step
with ``backend.plan(...)`` and sets ``metadata.plan``; every layer reads it from there. A step
captured in a CUDA graph keeps the plan it was captured with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class AttentionMetadata:
    num_actual_tokens: int
    num_reqs: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1], on the model's device
    seq_lens: torch.Tensor  # int32 [num_reqs]
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks_per_req]
    slot_mapping: torch.Tensor  # int64 [num_actual_tokens]
    max_query_len: int
    max_seq_len: int
    # Host copies for backends that loop over requests (the CPU reference path).
    query_start_loc_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # The backend's launch plan for this step (AttentionBackend.plan); None: the backend makes one per call.
    plan: Any = None
    # Layer groups (windowed and global layers mixed, worker/step_buffers.py): the metadata of groups 1.., each
    # with its own block table and slot mapping; this one is group 0's.
    kv_groups: tuple["AttentionMetadata", ...] = ()


class AttentionBackend(Protocol):
    """Writes this step's K/V into the paged cache, then attends over it."""

    def plan(self, metadata: AttentionMetadata, num_tokens: int, num_heads: int, num_kv_heads: int) -> Any:
        """The host-side decisions for a step of ``num_tokens`` query tokens (padding included), made once
        and shared by every layer through ``metadata.plan``; None when the backend has none to make."""
        ...

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
        """key/value: [num_tokens, num_kv_heads, head_dim]; writes them to their slots. A float8 cache
        stores ``x / scale`` (``kv_scales``: float32 [k_scale, v_scale], see kv_quant.py); any other cache
        the values in its dtype, and ignores ``kv_scales``."""
        ...

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float, sliding_window: int | None = None,
                logits_soft_cap: float | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        """query: [num_tokens, num_heads, head_dim] -> output of the same shape.

        Causal within each request: query row at position p sees positions <= p, and with a
        ``sliding_window`` W only positions > p - W (blocks wholly before that are never read).
        ``logits_soft_cap`` c: scores (after ``scale``) become c * tanh(scores / c).
        GQA: query head h reads KV head ``h // (num_heads // num_kv_heads)``.
        A float8 cache's K and V are read as ``float(x) * scale`` (``kv_scales`` as in ``write_kv``).
        """
        ...

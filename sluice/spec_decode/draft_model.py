"""Draft-model proposals: a smaller model with the target's vocabulary guesses the next k tokens.

The draft keeps its own paged KV cache, one tensor per draft layer, under the *target's* block ids: block b
holds the target's KV of some 16 positions in the target's cache and the draft's KV of the same positions in
the draft's. So one block table, one allocator and one prefix cache serve both; the KV budget is split
between them by bytes per block (ModelRunner.determine_num_kv_blocks), and a block costs
target + draft bytes.

    step t:   target runs the step's tokens               (its KV at their slots)
              draft  runs the same tokens, same metadata  (its KV at the same slots, its own cache)
              verification -> request now has N tokens, N - 1 computed
              draft: k one-token steps from position N - 1, argmax each: x1 .. xk  (KV at N - 1 .. N + k - 2,
                     slots the scheduler allocated as lookahead: SchedulerConfig.num_lookahead_tokens)
    step t+1: target verifies [token N - 1, x1 .. xk]; the draft runs them again, overwriting its KV there

Proposals are the draft's argmax (one-hot proposals: the speculative sampling rule stays exact for
random requests; their acceptance is what a greedy draft earns). The draft runs eagerly (no CUDA graphs).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from sluice.attention import AttentionMetadata
from sluice.sample.argmax import row_argmax
from sluice.spec_decode.config import SpeculativeConfig
from sluice.worker.kv_cache import KVCacheSpec, allocate_kv_caches

if TYPE_CHECKING:
    from sluice.worker.input_batch import StepInputs
    from sluice.worker.model_runner import ModelRunner


class DraftModelProposer:
    keeps_up_in_forward = True  # after_forward writes the draft's KV of every step's tokens

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.num_speculative_tokens = config.num_speculative_tokens
        self.model: torch.nn.Module | None = None
        self.kv_spec: KVCacheSpec | None = None
        self.kv_caches: list[torch.Tensor] = []

    def load(self, runner: "ModelRunner") -> None:
        from sluice.models.loader import build_model, iterate_safetensors
        hf = self.config.draft_hf_config
        load_format = runner.model_config.load_format
        weights = None if load_format == "dummy" else iterate_safetensors(self.config.model)
        self.model = build_model(hf, runner.dtype, runner.device, runner.attn_backend, weights=weights,
                                 load_format=load_format, seed=runner.model_config.seed).eval()
        self._init_kv_spec(hf, runner)

    def _init_kv_spec(self, hf: object, runner: "ModelRunner") -> None:
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        self.kv_spec = KVCacheSpec(hf.num_hidden_layers, num_kv_heads, head_dim, runner.block_size, runner.dtype)
        self._num_heads, self._num_kv_heads = hf.num_attention_heads, num_kv_heads

    @property
    def kv_bytes_per_block(self) -> int:
        return self.kv_spec.bytes_per_block

    def initialize_kv_cache(self, num_blocks: int, runner: "ModelRunner") -> None:
        from sluice.layers.attention import bind_kv_cache
        self.kv_caches = allocate_kv_caches(self.kv_spec, num_blocks, runner.device)
        bind_kv_cache(self.model, self.kv_caches)

    def _plan(self, runner: "ModelRunner", metadata: AttentionMetadata, num_tokens: int) -> AttentionMetadata:
        metadata = dataclasses.replace(metadata, plan=None)
        metadata.plan = runner.attn_backend.plan(metadata, num_tokens, self._num_heads, self._num_kv_heads)
        return metadata

    def after_forward(self, runner: "ModelRunner", inputs: "StepInputs", hidden: torch.Tensor) -> None:
        """Runs the step's tokens through the draft, so its KV keeps up with the target's."""
        step = runner.last_device_step
        num_tokens = len(inputs.input_ids)
        metadata = self._plan(runner, step.metadata, num_tokens)
        self.model(step.input_ids[:num_tokens], step.positions[:num_tokens], metadata)

    def propose(self, runner: "ModelRunner", req_ids: list[str], rows: np.ndarray) -> dict[str, list[int]]:
        if not req_ids or not self.config.allows_proposals(len(runner.requests)):
            return {}
        batch, device, block_size = runner.input_batch, runner.device, runner.block_size
        last = batch.num_tokens[rows] - 1  # each row's newest token: known, its KV not yet written
        # Proposal j writes KV at position last + j: only inside the blocks the scheduler allocated.
        allocated = batch.num_blocks[rows] * block_size
        num_steps = np.clip(allocated - last, 0, self.num_speculative_tokens)
        tokens = torch.from_numpy(batch.token_ids[rows, last]).to(device)
        # Filled on the device and read once at the end: no sync per draft step.
        proposals = torch.zeros((len(rows), self.num_speculative_tokens), dtype=torch.long, device=device)
        active = np.arange(len(rows))
        for j in range(int(num_steps.max(initial=0))):
            keep = num_steps[active] > j
            if not keep.all():
                index = torch.from_numpy(np.flatnonzero(keep)).to(device)
                tokens, active = tokens.index_select(0, index), active[keep]
            if not len(active):
                break
            positions = last[active] + j
            active_rows = rows[active]
            slots = batch.block_table[active_rows, positions // block_size].astype(np.int64) * block_size \
                + positions % block_size
            hidden = self._decode(runner, tokens, positions, slots, active_rows)
            tokens = row_argmax(self.model.compute_logits(hidden).to(torch.float32))
            proposals[torch.from_numpy(active).to(device), j] = tokens
        proposals = proposals.cpu().numpy()
        return {req_id: proposals[i, :num_steps[i]].tolist() for i, req_id in enumerate(req_ids) if num_steps[i]}

    def _decode(self, runner: "ModelRunner", tokens: torch.Tensor, positions: np.ndarray, slots: np.ndarray,
                rows: np.ndarray) -> torch.Tensor:
        """One token per request at ``positions``: the draft's hidden states [len(tokens), hidden]."""
        ones = np.ones(len(positions), dtype=np.int64)
        metadata = self._metadata(runner, ones, positions + 1, slots, rows)
        return self.model(tokens, torch.from_numpy(positions.astype(np.int64)).to(runner.device), metadata)

    def _metadata(self, runner: "ModelRunner", query_lens: np.ndarray, seq_lens: np.ndarray, slots: np.ndarray,
                  rows: np.ndarray) -> AttentionMetadata:
        """Attention metadata of a draft pass: request i (InputBatch row ``rows[i]``) computes its last
        ``query_lens[i]`` of ``seq_lens[i]`` positions, into ``slots``."""
        device = runner.device
        starts = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=starts[1:])
        seq_lens = seq_lens.astype(np.int32)
        metadata = AttentionMetadata(
            num_actual_tokens=int(starts[-1]), num_reqs=len(query_lens),
            query_start_loc=torch.from_numpy(starts).to(device), seq_lens=torch.from_numpy(seq_lens).to(device),
            block_table=torch.from_numpy(runner.input_batch.block_table[rows]).to(device),
            slot_mapping=torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(device),
            max_query_len=int(query_lens.max()), max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=starts.tolist(), seq_lens_cpu=seq_lens.tolist())
        return self._plan(runner, metadata, int(starts[-1]))

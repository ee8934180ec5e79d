"""Device-side step inputs: persistent buffers that each step is uploaded into.

The runner keeps per-request state on the host (``InputBatch``); each step its flat inputs
reach the device in two copies from pinned host memory, never one small copy per tensor:

    int64 region: [input_ids T | positions T | slot_mapping T | rows R | logits_indices R
                   | pending tokens R | pending sources R
                   | diff rows D | diff cols D | diff block ids D]          (copied up to D's end)
    int32 region: [query_start_loc R + 1 | seq_lens R]

    T = max tokens per step, R = max_num_seqs, D = block-table entries written this step.
    pending: with async scheduling, the flat indices of tokens whose id is a sample of the previous
    step still on the device, and that sample's index; ``upload`` copies those ids into input_ids.

The block table lives on the device by *row* (``block_table_by_row``) and is updated from the
diffs of ``InputBatch.pop_block_diffs``; each step gathers the scheduled rows, in step order,
into ``block_table`` with one ``index_select`` on the device. The buffers live as long as
the runner, so CUDA graphs captured over views of them (cuda_graphs.py) stay valid; the runner
only refills them. Host regions are double-buffered and guarded by CUDA events, so filling
step t+1 never races the still-running copy of step t, and nothing here synchronises the device.
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass

import numpy as np
import torch

from sluice.attention.backend import AttentionMetadata
from sluice.worker.input_batch import StepInputs


@dataclass(slots=True)
class DeviceStep:
    """One step's inputs on the device (views of StepBuffers), padded to ``num_padded_reqs``."""
    input_ids: torch.Tensor  # [num_padded_tokens]
    positions: torch.Tensor  # [num_padded_tokens]
    logits_indices: torch.Tensor  # [num_sampling_reqs]
    metadata: AttentionMetadata
    num_padded_reqs: int


class _HostRegions:
    """One set of (pinned, on CUDA) host staging arrays and the event of its last upload."""

    def __init__(self, size64: int, size32: int, pin: bool) -> None:
        self.i64_t = torch.zeros(size64, dtype=torch.int64, pin_memory=pin)
        self.i32_t = torch.zeros(size32, dtype=torch.int32, pin_memory=pin)
        self.i64, self.i32 = self.i64_t.numpy(), self.i32_t.numpy()
        self.event = torch.cuda.Event() if pin else None


class StepBuffers:
    def __init__(self, max_num_reqs: int, max_num_tokens: int, max_blocks_per_req: int,
                 device: torch.device, num_kv_groups: int = 1) -> None:
        """``num_kv_groups`` > 1 (windowed and global layers mixed): each row holds one block table per layer
        group side by side (``max_blocks_per_req`` columns each), and groups 1.. get their own slot mapping; the
        metadata of group g (g >= 1) is ``metadata.kv_groups[g - 1]``."""
        self.device = device
        self.num_kv_groups = num_kv_groups
        self.max_blocks_per_req = max_blocks_per_req
        max_blocks_per_req *= num_kv_groups
        self.max_num_reqs = R = max_num_reqs
        self.max_num_tokens = T = max(max_num_tokens, max_num_reqs)  # a padded decode step has R tokens
        self._diff_base = 3 * T + 4 * R
        size64 = self._diff_base + 3 * R * max_blocks_per_req
        size32 = 2 * R + 1
        pin = device.type == "cuda"
        self._hosts = [_HostRegions(size64, size32, pin) for _ in range(2 if pin else 1)]
        self._next_host = 0
        self.i64 = torch.zeros(size64, dtype=torch.int64, device=device)
        self.i32 = torch.zeros(size32, dtype=torch.int32, device=device)
        self.input_ids = self.i64[0:T]
        self.positions = self.i64[T:2 * T]
        self.slot_mapping = self.i64[2 * T:3 * T]
        self.rows = self.i64[3 * T:3 * T + R]
        self.logits_indices = self.i64[3 * T + R:3 * T + 2 * R]
        self.pending_token_indices = self.i64[3 * T + 2 * R:3 * T + 3 * R]
        self.pending_sources = self.i64[3 * T + 3 * R:3 * T + 4 * R]
        self.query_start_loc = self.i32[0:R + 1]
        self.seq_lens = self.i32[R + 1:2 * R + 1]
        self.block_table_by_row = torch.zeros((R, max_blocks_per_req), dtype=torch.int32, device=device)
        self.block_table = torch.zeros((R, max_blocks_per_req), dtype=torch.int32, device=device)
        self.group_slot_mapping = (torch.full((num_kv_groups - 1, T), -1, dtype=torch.int64, device=device)
                                   if num_kv_groups > 1 else None)

    def _host(self) -> _HostRegions:
        host = self._hosts[self._next_host]
        self._next_host = (self._next_host + 1) % len(self._hosts)
        if host.event is not None:
            host.event.synchronize()  # the copy two steps ago; long done unless the GPU is far behind
        return host

    def upload(self, inputs: StepInputs, block_diffs: tuple[np.ndarray, np.ndarray, np.ndarray],
               num_padded_reqs: int | None = None, num_padded_tokens: int | None = None,
               pending: tuple[np.ndarray, torch.Tensor] | None = None) -> DeviceStep:
        """Copies one step's inputs to the device and applies the block-table diffs.

        Padding, for a CUDA graph bucket: ``num_padded_reqs`` adds requests of query length 0
        and seq_len 0; tokens are padded with id 0, position 0 and slot -1, up to
        ``num_padded_tokens`` (steps with prefill chunks), or one per padded request (decode-only
        steps, where only ``num_padded_reqs`` is given).

        ``pending`` (async scheduling): for each of ``inputs.pending_token_indices``, the index of
        its id in the previous step's sampled ids, and those ids (still on the device).
        """
        T, R = self.max_num_tokens, self.max_num_reqs
        num_tokens, num_reqs = len(inputs.input_ids), len(inputs.rows)
        padded_reqs = num_padded_reqs or num_reqs
        if num_padded_tokens is None:
            if padded_reqs != num_reqs and inputs.max_query_len != 1:
                raise ValueError("num_padded_reqs alone pads decode-only steps (max_query_len 1); "
                                 "give num_padded_tokens for steps with prefill chunks")
            padded_tokens = num_tokens + (padded_reqs - num_reqs)
        elif num_padded_tokens < num_tokens or padded_reqs < num_reqs:
            raise ValueError(f"padding to {num_padded_tokens} tokens / {padded_reqs} requests is smaller than "
                             f"the step ({num_tokens} / {num_reqs})")
        else:
            padded_tokens = num_padded_tokens
        if padded_tokens > T or padded_reqs > R:
            raise ValueError(f"step of {padded_tokens} tokens / {padded_reqs} requests exceeds the buffers "
                             f"({T} / {R})")
        host = self._host()
        h64, h32 = host.i64, host.i32
        for offset, values, pad in ((0, inputs.input_ids, 0), (T, inputs.positions, 0),
                                    (2 * T, inputs.slot_mapping, -1)):
            h64[offset:offset + num_tokens] = values
            h64[offset + num_tokens:offset + padded_tokens] = pad
        h64[3 * T:3 * T + num_reqs] = inputs.rows
        num_logits = len(inputs.logits_indices)
        h64[3 * T + R:3 * T + R + num_logits] = inputs.logits_indices
        num_pending = len(inputs.pending_token_indices)
        if num_pending:
            if pending is None:
                raise ValueError("the step has pending tokens: give the previous step's samples")
            h64[3 * T + 2 * R:3 * T + 2 * R + num_pending] = inputs.pending_token_indices
            h64[3 * T + 3 * R:3 * T + 3 * R + num_pending] = pending[0]
        diff_rows, diff_cols, diff_ids = block_diffs
        num_diffs = len(diff_rows)
        base = self._diff_base
        h64[base:base + num_diffs] = diff_rows
        h64[base + num_diffs:base + 2 * num_diffs] = diff_cols
        h64[base + 2 * num_diffs:base + 3 * num_diffs] = diff_ids
        h32[0:num_reqs + 1] = inputs.query_start_loc
        h32[num_reqs + 1:padded_reqs + 1] = num_tokens  # padded requests: empty queries
        h32[R + 1:R + 1 + num_reqs] = inputs.seq_lens
        h32[R + 1 + num_reqs:R + 1 + padded_reqs] = 0
        end = base + 3 * num_diffs
        self.i64[:end].copy_(host.i64_t[:end], non_blocking=True)
        self.i32.copy_(host.i32_t, non_blocking=True)
        if host.event is not None:
            host.event.record()
        if num_diffs:
            d = self.i64[base:end].view(3, num_diffs)
            self.block_table_by_row[d[0], d[1]] = d[2].to(torch.int32)
        torch.index_select(self.block_table_by_row, 0, self.rows[:num_reqs], out=self.block_table[:num_reqs])
        if num_pending:  # the previous step's samples, still on the device, become input ids
            self.input_ids.index_copy_(0, self.pending_token_indices[:num_pending],
                                       pending[1].index_select(0, self.pending_sources[:num_pending]))
        if self.group_slot_mapping is not None:
            group_slots = torch.full((self.num_kv_groups - 1, padded_tokens), -1, dtype=torch.int64)
            group_slots[:, :num_tokens] = torch.from_numpy(inputs.group_slot_mappings)
            self.group_slot_mapping[:, :padded_tokens].copy_(group_slots)
        on_cpu = self.device.type == "cpu"
        metadata = AttentionMetadata(
            num_actual_tokens=num_tokens, num_reqs=num_reqs,
            query_start_loc=self.query_start_loc[:num_reqs + 1], seq_lens=self.seq_lens[:num_reqs],
            block_table=self.block_table[:num_reqs], slot_mapping=self.slot_mapping[:num_tokens],
            max_query_len=inputs.max_query_len, max_seq_len=inputs.max_seq_len,
            # Host copies only where a backend loops over requests on the host (the CPU reference).
            query_start_loc_cpu=inputs.query_start_loc.tolist() if on_cpu else None,
            seq_lens_cpu=inputs.seq_lens.tolist() if on_cpu else None)
        return DeviceStep(self.input_ids[:padded_tokens], self.positions[:padded_tokens],
                          self.logits_indices[:num_logits], self._with_kv_groups(metadata), padded_reqs)

    def graph_metadata(self, num_tokens: int, num_reqs: int, max_query_len: int,
                       max_seq_len: int) -> AttentionMetadata:
        """Metadata over the first ``num_tokens`` tokens and ``num_reqs`` rows, for capturing a graph;
        ``max_query_len`` and ``max_seq_len`` are the largest the graph will see (the attention
        backend picks its launch from them)."""
        return self._with_kv_groups(AttentionMetadata(
            num_actual_tokens=num_tokens, num_reqs=num_reqs,
            query_start_loc=self.query_start_loc[:num_reqs + 1], seq_lens=self.seq_lens[:num_reqs],
            block_table=self.block_table[:num_reqs], slot_mapping=self.slot_mapping[:num_tokens],
            max_query_len=max_query_len, max_seq_len=max_seq_len))

    def _with_kv_groups(self, metadata: AttentionMetadata) -> AttentionMetadata:
        """With layer groups: group 0's block table in ``metadata``, each other group's in ``kv_groups``."""
        if self.group_slot_mapping is None:
            return metadata
        width, num_tokens = self.max_blocks_per_req, metadata.num_actual_tokens
        table = metadata.block_table
        groups = tuple(dataclasses.replace(metadata, block_table=table[:, g * width:(g + 1) * width],
                                           slot_mapping=self.group_slot_mapping[g - 1, :num_tokens])
                       for g in range(1, self.num_kv_groups))
        return dataclasses.replace(metadata, block_table=table[:, :width], kv_groups=groups)

    def fill_dummy(self, num_tokens: int, num_reqs: int, max_seq_len: int) -> None:
        """Harmless inputs for graph warm-up and capture, no KV writes: every request decodes one
        token, and the last requests compute the rest from position 0, at most ``max_seq_len`` each
        (a longer one would read past its block table row)."""
        query_lens = [1] * num_reqs
        rest = num_tokens - num_reqs
        for i in reversed(range(num_reqs)):
            take = min(rest, max_seq_len - 1)
            query_lens[i] += take
            rest -= take
        if rest > 0 or num_reqs == 0:
            raise ValueError(f"{num_tokens} tokens do not fit {num_reqs} requests of at most {max_seq_len} tokens")
        self.input_ids[:num_tokens].zero_()
        self.positions[:num_tokens].zero_()
        self.slot_mapping[:num_tokens].fill_(-1)
        if self.group_slot_mapping is not None:
            self.group_slot_mapping[:, :num_tokens].fill_(-1)
        lens = torch.tensor(query_lens, dtype=torch.int32)
        self.query_start_loc[0] = 0
        self.query_start_loc[1:num_reqs + 1].copy_(torch.cumsum(lens, 0, dtype=torch.int32))
        self.seq_lens[:num_reqs].copy_(lens)
        self.block_table[:num_reqs].zero_()


class PendingSampledIds:
    """Sampled ids on their way to the host; ``wait`` blocks until they are there."""

    def __init__(self, host: torch.Tensor, event: "torch.cuda.Event | None") -> None:
        self._host, self._event = host, event

    def wait(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy().copy()


class SampledIdsReadback:
    """Copies each step's sampled ids into pinned host memory without waiting for them.

    Two buffers alternate: step t+1 may launch (and queue its own copy) before step t's ids are
    read, and step t+2 launches only after they are.
    """

    def __init__(self, max_num_reqs: int, device: torch.device) -> None:
        self._on_cuda = device.type == "cuda"
        self._buffers = [torch.zeros(max_num_reqs, dtype=torch.int64, pin_memory=self._on_cuda)
                         for _ in range(2 if self._on_cuda else 0)]
        self._next = 0

    def copy_async(self, sampled: torch.Tensor) -> PendingSampledIds:
        if not self._on_cuda:
            return PendingSampledIds(sampled, None)
        buffer = self._buffers[self._next][:sampled.shape[0]]
        self._next ^= 1
        buffer.copy_(sampled, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingSampledIds(buffer, event)

"""Persistent per-request state of the model runner: row-indexed host arrays, and the
device-side step buffers (``StepBuffers``) they are uploaded into each step.

A request owns one row from admission until it finishes or is preempted; the model runner's
request table (``RequestState.row``) is the one map from request id to row. Each step
only diffs arrive (new requests, appended blocks, sampled tokens); the step's flat
inputs are then gathered from the rows with vectorised numpy, never a Python loop over
tokens:

    row 0: token_ids [t0 t1 t2 t3 t4 .  .]   block_table [5 2 . .]   (block_size 4)
    row 1: token_ids [u0 u1 .  .  .  .  .]   block_table [7 . . .]

    step: row 0 computes positions 3..4, row 1 computes 0..1
    positions    = [3 4 0 1]
    input_ids    = [t3 t4 u0 u1]
    slot_mapping = [5*4+3, 2*4+0, 7*4+0, 7*4+1]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sluice.core.interface import NewRequestData


def segment_offsets(lengths: np.ndarray) -> np.ndarray:
    """For segments of ``lengths`` laid end to end, each element's index within its segment (int64):
    [2, 3] -> [0, 1, 0, 1, 2]."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)


@dataclass(slots=True)
class StepInputs:
    """Host-side inputs of one step, in scheduled order."""
    req_ids: list[str]
    rows: np.ndarray  # int64 [num_reqs]: each request's row in InputBatch
    input_ids: np.ndarray  # int64 [num_tokens]
    positions: np.ndarray  # int64 [num_tokens]
    slot_mapping: np.ndarray  # int64 [num_tokens]
    query_start_loc: np.ndarray  # int32 [num_reqs + 1]
    seq_lens: np.ndarray  # int32 [num_reqs]
    max_query_len: int
    max_seq_len: int
    # Requests whose step completes all their known tokens: they sample, at these flat indices.
    sampling_req_ids: list[str]
    logits_indices: np.ndarray  # int64 [num_sampling_reqs]
    sampling_rows: np.ndarray  # int64 [num_sampling_reqs]: their rows in InputBatch
    # Async scheduling: tokens whose id is the previous step's sample, not yet on the host
    # (their input_ids entry is a stale placeholder the runner overwrites on the device).
    pending_token_indices: np.ndarray  # int64 [num_pending]: flat token indices
    pending_rows: np.ndarray  # int64 [num_pending]: the rows those tokens belong to
    # Speculative decoding (None in a step without proposals): proposals scheduled per sampling request; the
    # logits that verify k proposals are those of its last k + 1 tokens.
    num_spec_sampling: np.ndarray | None = None  # int64 [num_sampling_reqs]
    # Layer groups (windowed and global layers mixed): the slots of groups 1.. (group 0's are slot_mapping).
    group_slot_mappings: np.ndarray | None = None  # int64 [num_kv_groups - 1, num_tokens]


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, block_size: int, num_kv_groups: int = 1) -> None:
        """``num_kv_groups`` > 1 (windowed and global layers mixed): a row holds one block table per layer group,
        side by side (group g in columns g * max_blocks ..), and block ids come as one list per group."""
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_kv_groups = num_kv_groups
        self.max_blocks = max_blocks = -(-max_model_len // block_size)
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.lora_int_ids = np.zeros(max_num_reqs, dtype=np.int64)  # each row's LoRA adapter (0: the base model)
        self.block_table = np.zeros((max_num_reqs, num_kv_groups * max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)  # group 0's
        self._num_group_blocks = np.zeros((max_num_reqs, num_kv_groups), dtype=np.int64)  # groups 1.. (column g)
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))
        # Block-table entries written since the last pop_block_diffs(): (row, first column, block ids).
        # The device copy of the block table is updated from these diffs, never rebuilt.
        self._block_diffs: list[tuple[int, int, list[int]]] = []

    def add_request(self, new: NewRequestData) -> int:
        """Gives the request a row and fills it; returns the row."""
        if not self._free_rows:
            raise RuntimeError("input batch is full: more running requests than max_num_seqs")
        row = self._free_rows.pop()
        tokens = new.prompt_token_ids + new.output_token_ids
        self.token_ids[row, :len(tokens)] = tokens
        self.num_tokens[row] = len(tokens)
        self.num_prompt_tokens[row] = len(new.prompt_token_ids)
        self.num_computed_tokens[row] = new.num_computed_tokens
        self.lora_int_ids[row] = new.lora_request.lora_int_id if new.lora_request is not None else 0
        self.num_blocks[row] = 0
        self._num_group_blocks[row] = 0
        self.append_blocks(row, new.block_ids)
        return row

    def remove_request(self, row: int) -> None:
        """Frees a finished or preempted request's row."""
        self._free_rows.append(row)

    def append_blocks(self, row: int, block_ids: list[int] | list[list[int]]) -> None:
        """Appends to a row's block table (with layer groups, ``block_ids`` has one list per group)."""
        if self.num_kv_groups > 1:
            for group, group_block_ids in enumerate(block_ids):
                self._append_blocks(row, group, group_block_ids)  # type: ignore[arg-type]
        else:
            self._append_blocks(row, 0, block_ids)  # type: ignore[arg-type]

    def _append_blocks(self, row: int, group: int, block_ids: list[int]) -> None:
        if block_ids:
            counts = self.num_blocks if group == 0 else self._num_group_blocks[:, group]
            start = int(counts[row])
            if start + len(block_ids) > self.max_blocks:
                raise ValueError(f"block_ids: row {row} would hold {start + len(block_ids)} blocks, "
                                 f"more than max_model_len allows ({self.max_blocks})")
            column = group * self.max_blocks + start
            self.block_table[row, column:column + len(block_ids)] = block_ids
            counts[row] = start + len(block_ids)
            self._block_diffs.append((row, column, block_ids))

    def pop_block_diffs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, columns, block ids) of every block-table entry written since the last call."""
        diffs, self._block_diffs = self._block_diffs, []
        if not diffs:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        lengths = np.fromiter((len(ids) for _, _, ids in diffs), dtype=np.int64, count=len(diffs))
        rows = np.repeat(np.fromiter((r for r, _, _ in diffs), dtype=np.int64, count=len(diffs)), lengths)
        starts = np.fromiter((c for _, c, _ in diffs), dtype=np.int64, count=len(diffs))
        # column of entry j of diff i: starts[i] + j
        cols = np.repeat(starts, lengths) + segment_offsets(lengths)
        block_ids = np.fromiter((b for _, _, ids in diffs for b in ids), dtype=np.int64, count=len(rows))
        return rows, cols, block_ids

    def write_spec_tokens(self, row: int, token_ids: list[int]) -> None:
        """Puts proposed tokens after a row's known tokens (they stay unknown: num_tokens does not move)."""
        start = int(self.num_tokens[row])
        self.token_ids[row, start:start + len(token_ids)] = token_ids

    def accept_tokens(self, row: int, token_ids: list[int], num_rejected: int) -> None:
        """Appends a verification's output tokens to a row; its computed tokens roll back past the rejected."""
        start = int(self.num_tokens[row])
        self.token_ids[row, start:start + len(token_ids)] = token_ids
        self.num_tokens[row] = start + len(token_ids)
        self.num_computed_tokens[row] -= num_rejected

    def append_tokens(self, rows: np.ndarray, token_ids: np.ndarray) -> None:
        """Appends one sampled token per row (rows are distinct)."""
        self.token_ids[rows, self.num_tokens[rows]] = token_ids
        self.num_tokens[rows] += 1

    def prepare(self, num_scheduled_tokens: dict[str, int], rows: np.ndarray,
                num_spec: np.ndarray | None = None) -> StepInputs:
        """The step's flat inputs; ``rows[i]`` is the row of the i-th request of ``num_scheduled_tokens``.
        ``num_spec[i]``: proposals scheduled for it (written past its known tokens by write_spec_tokens)."""
        req_ids = list(num_scheduled_tokens)
        num_sched = np.fromiter(num_scheduled_tokens.values(), dtype=np.int64, count=len(req_ids))
        start = self.num_computed_tokens[rows]
        cu = np.zeros(len(req_ids) + 1, dtype=np.int64)
        np.cumsum(num_sched, out=cu[1:])
        total = int(cu[-1])
        # positions: for token t of request i, start[i] + (t - cu[i]).
        req_of_token = np.repeat(np.arange(len(req_ids)), num_sched)
        positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1] - start, num_sched)
        token_rows = rows[req_of_token]
        input_ids = self.token_ids[token_rows, positions]
        block_ids = self.block_table[token_rows, positions // self.block_size].astype(np.int64)
        offsets = positions % self.block_size
        slot_mapping = block_ids * self.block_size + offsets
        group_slot_mappings = None
        if self.num_kv_groups > 1:
            columns = np.arange(1, self.num_kv_groups)[:, None] * self.max_blocks + positions // self.block_size
            group_slot_mappings = self.block_table[token_rows, columns].astype(np.int64) * self.block_size + offsets
        seq_lens = start + num_sched
        self.num_computed_tokens[rows] = seq_lens
        samples = seq_lens >= self.num_tokens[rows]
        # A position at or past a row's known tokens is a sample still on its way (async scheduling).
        known = self.num_tokens[token_rows] if num_spec is None else self.num_tokens[token_rows] + num_spec[req_of_token]
        pending = np.flatnonzero(positions >= known)
        return StepInputs(
            req_ids=req_ids,
            rows=rows,
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=cu.astype(np.int32),
            seq_lens=seq_lens.astype(np.int32),
            max_query_len=int(num_sched.max()) if len(req_ids) else 0,
            max_seq_len=int(seq_lens.max()) if len(req_ids) else 0,
            sampling_req_ids=[r for r, s in zip(req_ids, samples.tolist()) if s],
            logits_indices=(cu[1:] - 1)[samples],
            sampling_rows=rows[samples],
            pending_token_indices=pending,
            pending_rows=token_rows[pending],
            num_spec_sampling=num_spec[samples] if num_spec is not None else None,
            group_slot_mappings=group_slot_mappings,
        )

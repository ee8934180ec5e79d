"""The runner's device-side step state on CPU: block-table diffs, step uploads with CUDA-graph
padding, capture buckets. (The CUDA graphs themselves are exercised in tests/gpu.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sluice.core.interface import NewRequestData
from sluice.sampling_params import SamplingParams
from sluice.worker.cuda_graphs import DecodeGraphs, MixedGraphs, capture_sizes, mixed_capture_sizes
from sluice.worker.input_batch import InputBatch
from sluice.worker.step_buffers import StepBuffers

BLOCK_SIZE = 4
MAX_MODEL_LEN = 64
MAX_BLOCKS = MAX_MODEL_LEN // BLOCK_SIZE


def _new(req_id: str, prompt_len: int, block_ids: list[int], computed: int = 0) -> NewRequestData:
    return NewRequestData(req_id, list(range(10, 10 + prompt_len)), [], SamplingParams(), block_ids, computed)


def _batch_and_buffers(max_reqs: int = 8) -> tuple[InputBatch, StepBuffers]:
    return (InputBatch(max_reqs, MAX_MODEL_LEN, BLOCK_SIZE),
            StepBuffers(max_reqs, 32, MAX_BLOCKS, torch.device("cpu")))


def _prepare(batch: InputBatch, rows: dict[str, int], num_scheduled: dict[str, int]):
    """InputBatch.prepare with each request's row, as the model runner's request table gives it."""
    return batch.prepare(num_scheduled, np.array([rows[r] for r in num_scheduled], dtype=np.int64))


def test_block_diffs_rebuild_the_host_block_table_on_the_device():
    batch, buffers = _batch_and_buffers()
    row_a = batch.add_request(_new("a", 9, [7, 3, 5]))
    row_b = batch.add_request(_new("b", 5, [1]))
    batch.append_blocks(row_a, [11])
    rows, cols, ids = batch.pop_block_diffs()
    assert sorted(zip(rows.tolist(), cols.tolist(), ids.tolist())) == sorted(
        [(row_a, 0, 7), (row_a, 1, 3), (row_a, 2, 5), (row_b, 0, 1), (row_a, 3, 11)])
    assert len(batch.pop_block_diffs()[0]) == 0  # popped once

    rows_of = {"a": row_a, "b": row_b}
    inputs = _prepare(batch, rows_of, {"a": 9, "b": 2})
    step = buffers.upload(inputs, (rows, cols, ids))
    assert step.metadata.block_table[0, :4].tolist() == [7, 3, 5, 11]
    assert step.metadata.block_table[1, 0].item() == 1
    # A later diff only touches what changed.
    batch.append_blocks(row_b, [4])
    inputs = _prepare(batch, rows_of, {"b": 3})
    step = buffers.upload(inputs, batch.pop_block_diffs())
    assert step.metadata.block_table[0, :2].tolist() == [1, 4]
    assert torch.equal(buffers.block_table_by_row[row_a, :4], torch.tensor([7, 3, 5, 11], dtype=torch.int32))


def test_decode_step_padded_to_a_bucket_has_empty_queries_and_no_kv_writes():
    batch, buffers = _batch_and_buffers()
    rows_of: dict[str, int] = {}
    rows_of["a"] = batch.add_request(_new("a", 5, [2, 6], computed=4))
    rows_of["b"] = batch.add_request(_new("b", 3, [9], computed=2))
    rows_of["c"] = batch.add_request(_new("c", 7, [1, 8], computed=6))
    inputs = _prepare(batch, rows_of, {"a": 1, "b": 1, "c": 1})
    step = buffers.upload(inputs, batch.pop_block_diffs(), num_padded_reqs=4)
    assert step.num_padded_reqs == 4 and len(step.input_ids) == 4
    assert step.input_ids.tolist() == [14, 12, 16, 0]
    assert step.positions.tolist() == [4, 2, 6, 0]
    assert buffers.slot_mapping[:4].tolist() == [6 * 4 + 0, 9 * 4 + 2, 8 * 4 + 2, -1]
    qsl = buffers.query_start_loc[:5].tolist()
    assert qsl == [0, 1, 2, 3, 3]  # the padded request has query length 0
    assert buffers.seq_lens[:4].tolist() == [5, 3, 7, 0]
    assert step.metadata.num_reqs == 3 and step.metadata.max_query_len == 1
    assert step.logits_indices.tolist() == [0, 1, 2]


def test_only_decode_steps_are_padded():
    batch, buffers = _batch_and_buffers()
    rows_of: dict[str, int] = {}
    rows_of["a"] = batch.add_request(_new("a", 5, [2, 6]))
    inputs = _prepare(batch, rows_of, {"a": 5})
    with pytest.raises(ValueError, match="num_padded_reqs"):
        buffers.upload(inputs, batch.pop_block_diffs(), num_padded_reqs=2)


def test_step_with_a_prefill_chunk_padded_to_a_token_bucket():
    batch, buffers = _batch_and_buffers()
    rows_of: dict[str, int] = {}
    rows_of["a"] = batch.add_request(_new("a", 5, [2, 6], computed=4))  # decodes its last prompt token
    rows_of["b"] = batch.add_request(_new("b", 6, [3, 7]))  # prefills 6
    inputs = _prepare(batch, rows_of, {"a": 1, "b": 6})
    step = buffers.upload(inputs, batch.pop_block_diffs(), num_padded_reqs=4, num_padded_tokens=16)
    assert step.input_ids.shape[0] == 16 and step.num_padded_reqs == 4
    assert buffers.query_start_loc[:5].tolist() == [0, 1, 7, 7, 7]  # padded requests have empty queries
    assert buffers.seq_lens[:4].tolist() == [5, 6, 0, 0]
    assert buffers.slot_mapping[7:16].tolist() == [-1] * 9  # padded tokens write no KV
    assert buffers.input_ids[7:16].tolist() == [0] * 9
    no_diffs = (np.zeros(0, np.int64),) * 3
    with pytest.raises(ValueError, match="smaller than the step"):
        buffers.upload(inputs, no_diffs, num_padded_reqs=4, num_padded_tokens=4)


def test_mixed_graph_buckets_are_token_counts_holding_as_many_requests():
    _, buffers = _batch_and_buffers()  # 8 requests, 32 tokens
    assert mixed_capture_sizes(32) == [16, 32] and mixed_capture_sizes(8192)[-1] == 1024
    graphs = MixedGraphs(torch.nn.Identity(), buffers, mixed_capture_sizes(32), max_seq_len=MAX_MODEL_LEN)
    assert [graphs.bucket_for(n) for n in (2, 16, 17, 32)] == [16, 16, 32, 32]
    assert graphs.bucket_for(33) is None
    assert graphs.num_reqs_for(16) == 8  # never more than max_num_seqs
    with pytest.raises(ValueError, match="at most 32"):
        MixedGraphs(torch.nn.Identity(), buffers, [48], max_seq_len=MAX_MODEL_LEN)


def test_upload_leaves_no_stale_padding_from_a_longer_step():
    batch, buffers = _batch_and_buffers()
    rows_of: dict[str, int] = {}
    rows_of["a"] = batch.add_request(_new("a", 20, [0, 1, 2, 3, 4]))
    buffers.upload(_prepare(batch, rows_of, {"a": 20}), batch.pop_block_diffs())
    rows_of["b"] = batch.add_request(_new("b", 2, [9], computed=1))
    step = buffers.upload(_prepare(batch, rows_of, {"b": 1}), batch.pop_block_diffs(), num_padded_reqs=2)
    assert buffers.slot_mapping[:2].tolist() == [9 * 4 + 1, -1]
    assert step.metadata.query_start_loc.tolist() == [0, 1]


def test_capture_sizes_follow_vllm_buckets():
    assert capture_sizes(256) == [1, 2, 4] + list(range(8, 257, 8))
    assert capture_sizes(1024) == ([1, 2, 4] + list(range(8, 256, 8)) + list(range(256, 512, 16))
                                   + list(range(512, 1025, 32)))
    assert capture_sizes(300) == [1, 2, 4] + list(range(8, 256, 8)) + [256, 272, 288, 300]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(1) == [1]


def test_bucket_for_picks_the_smallest_graph_that_fits():
    _, buffers = _batch_and_buffers(max_reqs=8)
    graphs = DecodeGraphs(torch.nn.Identity(), buffers, capture_sizes(8), max_seq_len=MAX_MODEL_LEN)
    assert [graphs.bucket_for(n) for n in (1, 3, 5, 8)] == [1, 4, 8, 8]
    assert graphs.bucket_for(9) is None
    with pytest.raises(ValueError, match="sizes"):
        DecodeGraphs(torch.nn.Identity(), buffers, [16], max_seq_len=MAX_MODEL_LEN)


def test_pop_block_diffs_columns_continue_after_existing_blocks():
    batch = InputBatch(2, MAX_MODEL_LEN, BLOCK_SIZE)
    row = batch.add_request(_new("a", 4, [5]))
    batch.pop_block_diffs()
    batch.append_blocks(row, [6, 7])
    rows, cols, ids = batch.pop_block_diffs()
    assert rows.tolist() == [row, row] and cols.tolist() == [1, 2] and ids.tolist() == [6, 7]
    assert np.array_equal(batch.block_table[row, :3], [5, 6, 7])


def test_dummy_inputs_spread_a_bucket_over_requests_of_at_most_max_seq_len():
    """Capture inputs for a 1024-token graph with max_model_len 256: no dummy request is longer than
    256 tokens, which would read past its block table row on the GPU."""
    buffers = StepBuffers(32, 1024, 16, torch.device("cpu"))
    buffers.fill_dummy(1024, 32, max_seq_len=256)
    starts = buffers.query_start_loc[:33].tolist()
    query_lens = [b - a for a, b in zip(starts, starts[1:])]
    assert starts[0] == 0 and starts[-1] == 1024 and min(query_lens) >= 1 and max(query_lens) <= 256
    assert buffers.seq_lens[:32].tolist() == query_lens  # every request starts at position 0
    assert (buffers.slot_mapping[:1024] == -1).all()  # no KV writes
    buffers.fill_dummy(16, 16, max_seq_len=256)  # a decode bucket: one token each
    assert buffers.query_start_loc[:17].tolist() == list(range(17))
    with pytest.raises(ValueError, match="do not fit"):
        buffers.fill_dummy(1024, 2, max_seq_len=256)

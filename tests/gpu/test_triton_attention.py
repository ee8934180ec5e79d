"""The Triton paged-attention path computes what the torch reference computes.

Runs on CUDA; skipped without it. For development without a GPU, run it under the Triton
interpreter on CPU tensors (tiny shapes only, large cases are skipped):

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_triton_attention.py
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

from sluice.attention.backend import AttentionMetadata
from sluice.attention.torch_ref import TorchRefBackend

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or TRITON_INTERPRET=1 for the interpreter)")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="too large for the Triton interpreter")

# ||out - ref|| / ||ref||. fp32 runs its dots in IEEE fp32; bf16/fp16 round P to 16 bits before P @ V.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(scope="module")
def backend():
    triton_paged = pytest.importorskip("sluice.attention.triton_paged")
    return triton_paged.TritonPagedBackend()


@dataclass
class Batch:
    query: torch.Tensor
    kv_cache: torch.Tensor
    metadata: AttentionMetadata


def make_batch(query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int,
               head_dim: int, block_size: int, dtype: torch.dtype, seed: int = 0) -> Batch:
    """Random query and cache; each request's blocks are a random, non-contiguous set of block ids.

    Block-table entries past a request's last block hold an out-of-range id, so reading one
    would fault; every cache slot is random, so reading past seq_len changes the result."""
    if INTERPRET and dtype == torch.bfloat16:
        dtype = torch.float16  # the Triton 3.6 interpreter's bf16 dot is wrong; compiled code is not
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3
    block_ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    width = max(blocks_per_req) + 2
    block_table = torch.full((len(seq_lens), width), num_blocks + 10_000, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_req):
        block_table[i, :n] = block_ids[used:used + n]
        used += n
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen).to(dtype)
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    slot_mapping = torch.zeros(qsl[-1], dtype=torch.int64)  # attention does not read it
    metadata = AttentionMetadata(
        num_actual_tokens=qsl[-1], num_reqs=len(seq_lens),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=block_table, slot_mapping=slot_mapping, max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens))
    return Batch(query, kv_cache, metadata)


def to_device(batch: Batch) -> Batch:
    m = batch.metadata
    meta = AttentionMetadata(m.num_actual_tokens, m.num_reqs, m.query_start_loc.to(DEVICE), m.seq_lens.to(DEVICE),
                             m.block_table.to(DEVICE), m.slot_mapping.to(DEVICE), m.max_query_len, m.max_seq_len)
    return Batch(batch.query.to(DEVICE), batch.kv_cache.to(DEVICE), meta)


def run_and_compare(backend, batch: Batch, dev: Batch | None = None) -> None:
    """Poisons the output, runs the kernel and checks every row against the fp32 reference."""
    scale = batch.query.shape[-1] ** -0.5
    dtype = batch.query.dtype
    dev = dev or to_device(batch)
    out = torch.full_like(dev.query, float("nan"))
    result = backend.forward(dev.query, dev.kv_cache, dev.metadata, scale, out=out)
    assert result.data_ptr() == out.data_ptr()
    ref = TorchRefBackend().forward(batch.query.float(), batch.kv_cache.float(), batch.metadata, scale)
    got = result.float().cpu()
    assert not got.isnan().any(), "some output rows were never written"
    err = (got - ref).norm() / ref.norm()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"
    # Every row individually close too: a wrong row hides in a norm over thousands.
    row_err = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)
    assert row_err.max() < 20 * TOLERANCE[dtype], f"worst row error {row_err.max():.2e}"


MIXED = ([5, 1, 17, 1, 3], [9, 40, 17, 70, 3])  # chunk after a prefix, decodes, fresh prefill, ...


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_batch_matches_reference_bf16(backend, head_dim, group, block_size):
    query_lens, seq_lens = MIXED
    num_kv_heads = 2
    batch = make_batch(query_lens, seq_lens, num_kv_heads * group, num_kv_heads, head_dim, block_size,
                       torch.bfloat16, seed=group * 100 + block_size + head_dim)
    run_and_compare(backend, batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
def test_mixed_batch_matches_reference_other_dtypes(backend, dtype, group):
    query_lens, seq_lens = MIXED
    batch = make_batch(query_lens, seq_lens, 2 * group, 2, 64, 16, dtype, seed=7 + group)
    run_and_compare(backend, batch)


@pytest.mark.parametrize("head_dim,block_size", [(32, 64), (256, 16), (16, 32)])
def test_other_power_of_two_head_dims_and_block_sizes(backend, head_dim, block_size):
    query_lens, seq_lens = MIXED
    batch = make_batch(query_lens, seq_lens, 4, 2, head_dim, block_size, torch.bfloat16, seed=head_dim)
    run_and_compare(backend, batch)


def test_group_that_is_not_a_power_of_two(backend):
    """Qwen2-style 14 heads over 2 KV heads: groups of 7 rows per KV head."""
    query_lens, seq_lens = MIXED
    batch = make_batch(query_lens, seq_lens, 14, 2, 64, 16, torch.bfloat16, seed=14)
    run_and_compare(backend, batch)


def test_decode_only_batch(backend):
    seq_lens = [1, 16, 17, 33, 100, 5]
    batch = make_batch([1] * len(seq_lens), seq_lens, 8, 2, 64, 16, torch.bfloat16, seed=3)
    run_and_compare(backend, batch)


@pytest.mark.parametrize("group", [4, 8, 16])
def test_mostly_decode_batch_with_a_short_chunk(backend, group):
    """Few prefill tokens per request: the small row tile (BLOCK_Q = 16 // group tokens)."""
    query_lens, seq_lens = [1, 1, 7, 1, 1, 2], [30, 70, 40, 1, 129, 2]
    batch = make_batch(query_lens, seq_lens, 2 * group, 2, 64, 16, torch.bfloat16, seed=group)
    run_and_compare(backend, batch)


@needs_cuda
def test_mostly_decode_batch_long_contexts(backend):
    query_lens = [1] * 30 + [64]
    seq_lens = [4096 + 37 * i for i in range(30)] + [5000]
    batch = make_batch(query_lens, seq_lens, 32, 8, 128, 16, torch.bfloat16, seed=31)
    run_and_compare(backend, batch)


def test_prefill_only_from_empty_cache_is_causal(backend):
    query_lens = [40, 7, 64]
    batch = make_batch(query_lens, query_lens, 4, 1, 64, 16, torch.float32, seed=5)
    run_and_compare(backend, batch)


def test_request_with_no_query_tokens_is_skipped(backend):
    """Padded requests (query_len 0) in a CUDA-graph bucket write nothing and disturb no one."""
    batch = make_batch([3, 0, 1, 0], [10, 8, 20, 4], 4, 2, 64, 16, torch.bfloat16, seed=9)
    run_and_compare(backend, batch)


def test_query_may_be_a_strided_view_of_fused_qkv(backend):
    batch = make_batch(*MIXED, 4, 2, 64, 16, torch.bfloat16, seed=11)
    qkv = torch.randn(batch.query.shape[0], 8, 64).to(batch.query.dtype)
    qkv[:, :4] = batch.query
    batch.query = qkv[:, :4]  # stride(0) = 8 * 64, not 4 * 64
    run_and_compare(backend, batch)


def test_split_kv_decode_matches_reference(backend):
    """Few requests with long contexts take the flash-decoding path (several splits merged)."""
    seq_lens = [700, 1500] if INTERPRET else [4100, 9000, 130]
    batch = make_batch([1] * len(seq_lens), seq_lens, 8, 2, 64, 16, torch.bfloat16, seed=21)
    run_and_compare(backend, batch)


def test_split_count_follows_occupancy():
    triton_paged = pytest.importorskip("sluice.attention.triton_paged")
    choose = triton_paged.choose_num_splits
    assert choose(256, 8, 1024, 132, 64, triton_paged.DECODE_MIN_SPLIT_TILES) == 1
    assert choose(2, 8, 8192, 132, 64, triton_paged.DECODE_MIN_SPLIT_TILES) == 16
    assert choose(2, 8, 300, 132, 64, min_split_tiles=1) == 4  # splits down to one 64-token tile
    assert choose(2, 8, 300, 132, 64, min_split_tiles=4) == 1  # too short for 4-tile splits


def test_mixed_split_count_follows_context_length():
    triton_paged = pytest.importorskip("sluice.attention.triton_paged")
    choose = triton_paged.choose_mixed_splits
    assert choose(480, 4096, 64) == 1  # W1-like contexts: no split
    assert choose(480, 32768, 64) == triton_paged.MIXED_SPLITS  # a chunk of a 32K prompt among decodes
    assert choose(8192, 32768, 64) == 1  # a large prefill step fills the GPU by itself
    assert choose(40, 700, 64, min_seq_len=256) == 2  # capped by 4 KV tiles per split


@pytest.mark.parametrize("separate_short_rows", [True, False], ids=["two_launches", "one_launch"])
@pytest.mark.parametrize("group", [1, 4])
def test_mixed_batch_with_a_long_context_splits_kv(group, separate_short_rows):
    """A chunk deep into a long prompt among decodes and a fresh prefill: long rows split their
    context over several programs and are merged, short rows keep one split and are written directly."""
    triton_paged = pytest.importorskip("sluice.attention.triton_paged")
    backend = triton_paged.TritonPagedBackend(mixed_split_min_seq_len=256,
                                              separate_short_rows=separate_short_rows)
    query_lens, seq_lens = [24, 1, 9, 0, 1], [1100, 900, 9, 7, 30]
    batch = make_batch(query_lens, seq_lens, 2 * group, 2, 64, 16, torch.float16, seed=40 + group)
    plan = backend.plan(batch.metadata, batch.query.shape[0], batch.query.shape[1], 2)
    assert plan.num_splits > 1 and not plan.decode_only
    run_and_compare(backend, batch)


@pytest.mark.parametrize("group", [2, 4])
def test_mixed_batch_rows_on_both_sides_of_the_short_query_length(backend, group):
    """With chunks in the batch, requests whose query fits one small row tile (16 // group tokens)
    run in the decode-config launch and longer ones in the large-tile launch; none is missed."""
    triton_paged = pytest.importorskip("sluice.attention.triton_paged")
    short = 16 // group
    query_lens = [1, short, short + 1, 70, short - 1, 2 * short]
    seq_lens = [50, short + 20, short + 3, 90, 40, 2 * short]
    batch = make_batch(query_lens, seq_lens, 2 * group, 2, 64, 16, torch.float16, seed=50 + group)
    plan = backend.plan(batch.metadata, batch.query.shape[0], batch.query.shape[1], 2)
    assert [launch.row_class for launch in plan.launches] == [triton_paged.SHORT_ROWS, triton_paged.LONG_ROWS]
    assert plan.launches[0].short_query_len == short
    run_and_compare(backend, batch)


def test_split_mixed_batch_leaves_padding_tokens_alone():
    """Under a CUDA graph the query has padding tokens past query_start_loc[num_reqs]: neither the
    attention nor the merge kernel writes their rows."""
    triton_paged = pytest.importorskip("sluice.attention.triton_paged")
    backend = triton_paged.TritonPagedBackend(mixed_split_min_seq_len=256)
    batch = make_batch([16, 1], [800, 600], 4, 2, 64, 16, torch.float16, seed=47)
    dev = to_device(batch)
    padded = torch.cat([dev.query, torch.randn(5, 4, 64, dtype=dev.query.dtype, device=DEVICE)])
    out = torch.full_like(padded, float("nan"))
    backend.forward(padded, dev.kv_cache, dev.metadata, 64 ** -0.5, out=out)
    assert out[17:].isnan().all()
    ref = TorchRefBackend().forward(batch.query.float(), batch.kv_cache.float(), batch.metadata, 64 ** -0.5)
    assert (out[:17].float().cpu() - ref).norm() / ref.norm() < TOLERANCE[torch.float16]


@needs_cuda
def test_chunk_of_a_32k_prompt_among_decodes_llama_shape(backend):
    """W5's long-prompt mix: a 256-token chunk at 32K positions next to 64 decodes takes the
    split path with the default threshold."""
    gen = torch.Generator().manual_seed(5)
    decode_lens = torch.randint(1, 2048, (64,), generator=gen).tolist()
    query_lens, seq_lens = [1] * 64 + [256], decode_lens + [32768]
    batch = make_batch(query_lens, seq_lens, 32, 8, 128, 16, torch.bfloat16, seed=6)
    plan = backend.plan(batch.metadata, batch.query.shape[0], batch.query.shape[1], 8)
    assert plan.num_splits > 1
    run_and_compare(backend, batch)


@needs_cuda
@pytest.mark.parametrize("group,head_dim,block_size", [(4, 128, 16), (8, 128, 32), (1, 64, 16)])
def test_long_contexts_with_chunks_and_decodes(backend, group, head_dim, block_size):
    query_lens = [512, 1, 1, 300, 1, 64]
    seq_lens = [4608, 5000, 4096, 2348, 17, 64]
    batch = make_batch(query_lens, seq_lens, 2 * group, 2, head_dim, block_size, torch.bfloat16, seed=group)
    run_and_compare(backend, batch)


@needs_cuda
def test_many_decodes_llama_shape(backend):
    gen = torch.Generator().manual_seed(1)
    seq_lens = torch.randint(1, 2048, (96,), generator=gen).tolist()
    batch = make_batch([1] * 96, seq_lens, 32, 8, 128, 16, torch.bfloat16, seed=2)
    run_and_compare(backend, batch)


@pytest.mark.parametrize("src_dtype,cache_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                   (torch.float16, torch.float16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_matches_reference(backend, src_dtype, cache_dtype, block_size):
    if INTERPRET and (src_dtype, cache_dtype) == (torch.float32, torch.bfloat16):
        pytest.skip("the interpreter truncates fp32 -> bf16; compiled code rounds to nearest even like torch")
    gen = torch.Generator().manual_seed(block_size)
    num_blocks, num_kv_heads, head_dim, num_tokens = 6, 2, 64, 20
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(cache_dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(src_dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(src_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[3, 11]] = -1  # padded tokens under CUDA graphs: skipped
    expected = cache.clone()
    keep = slots >= 0
    TorchRefBackend().write_kv(key[keep], value[keep], expected, slots[keep])

    dev_cache = cache.to(DEVICE)
    backend.write_kv(key.to(DEVICE), value.to(DEVICE), dev_cache, slots.to(DEVICE))
    assert torch.equal(dev_cache.cpu(), expected)


def test_write_kv_then_forward_reads_what_was_written(backend):
    """The two kernels agree on the layout: write a decode token's K/V, then attend to it."""
    batch = make_batch([1, 1], [16, 33], 4, 2, 64, 16, torch.bfloat16, seed=4)
    m = batch.metadata
    last_slots = [int(m.block_table[i, (s - 1) // 16]) * 16 + (s - 1) % 16 for i, s in enumerate(m.seq_lens_cpu)]
    key = torch.randn(2, 2, 64).to(torch.bfloat16) * 4
    value = torch.randn(2, 2, 64).to(torch.bfloat16)
    dev = to_device(batch)
    TorchRefBackend().write_kv(key, value, batch.kv_cache, torch.tensor(last_slots))
    backend.write_kv(key.to(DEVICE), value.to(DEVICE), dev.kv_cache, torch.tensor(last_slots).to(DEVICE))
    assert torch.equal(dev.kv_cache.cpu(), batch.kv_cache)
    run_and_compare(backend, batch, dev=dev)


def test_bad_shapes_raise_value_errors_naming_the_field(backend):
    batch = to_device(make_batch([1], [4], 4, 2, 64, 16, torch.bfloat16))
    with pytest.raises(ValueError, match="num_kv_heads"):
        backend.forward(batch.query[:, :3], batch.kv_cache, batch.metadata, 0.125)
    with pytest.raises(ValueError, match="kv_cache"):
        backend.forward(batch.query, batch.kv_cache[0], batch.metadata, 0.125)
    with pytest.raises(ValueError, match="key"):
        backend.write_kv(batch.query, batch.query, batch.kv_cache, batch.metadata.slot_mapping)

"""Triton kernels of the CUDA attention path (launched by triton_paged.py, which documents the
launch plans): writing K/V into the paged cache, paged attention over a mixed batch, and the
merge of split-KV partial results.

Layout (see backend.py): kv_cache[2, num_blocks, block_size, num_kv_heads, head_dim].
One program of the attention kernel owns one KV head and a tile of BLOCK_M query rows:
the GROUP query heads that share that KV head, for BLOCK_Q = BLOCK_M // GROUP
consecutive tokens of one request, so every K/V tile is loaded once per group.

    rows of one program (GROUP = 4, BLOCK_M = 16):
      row:   0  1  2  3 | 4  5  6  7 | ... | 12 13 14 15
      token: t  t  t  t | t+1 ...    | ... | t+3
      head:  4g ... 4g+3| 4g ... 4g+3|

It walks the request's context in tiles of TILE_N positions, gathering each position's
block id from the block table, with an online softmax in fp32 (exp2 domain).

Grid without host-device sync: request i's query tiles are numbered from
``query_start_loc[i] // BLOCK_Q + i``, an upper bound that needs only host ints
(num_tokens // BLOCK_Q + num_reqs programs); each program finds its request by binary
search and exits if it falls in a gap, or if its request is not of the launch's row class.
Decode-only batches (max_query_len == 1) skip the search: program i is request i.

Per-layer options (constexpr switches, so layers without them compile and run as before):
SLIDING: a row at position p sees positions > p - sliding_window; a program walks only the KV
tiles from its first row's window start, so blocks before it are never read (the KV cache
manager may have recycled them). SOFT_CAP: scores become soft_cap * tanh(scores / soft_cap).
KV_FP8: the cache holds float8_e4m3fn (attention/kv_quant.py): the write stores x / scale, clamped to
+-448 and rounded to nearest even; attention reads K and V in the query's dtype with k_scale folded into
the softmax scale and v_scale into the output (the same product as dequantizing each element first).
The layer's [k_scale, v_scale] are read from device memory, so graphs see scales set after capture.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Counts that change from step to step are not specialized on (Triton would otherwise compile a
# variant for 1 and for multiples of 16): every step then reuses the kernels compiled at start-up
# instead of stopping the whole batch for a compile the first time a new count comes along.
PER_STEP_COUNTS = ["num_reqs", "num_splits"]


FP8_MAX = tl.constexpr(448.0)  # kv_quant.FP8_MAX


@triton.jit
def _round_to_fp8_e4m3(x):
    """x (float32, |x| <= 448) rounded to the nearest float8_e4m3fn value (ties to even), still in float32,
    so the cast that follows is exact. Casting directly rounds correctly on the GPU, but the Triton
    interpreter truncates and drops the carry into the exponent; rounding here gives both the same bits.
    Normal range: keep 3 of float32's 23 mantissa bits; below 2**-6 (subnormals): multiples of 2**-9."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    magnitude = bits ^ sign
    normal = (magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) & 0x7FF00000
    # adding 1.5 * 2**14 puts the float32 ulp at 2**-9: the addition itself rounds to nearest even
    subnormal = ((magnitude.to(tl.float32, bitcast=True) + 24576.0) - 24576.0).to(tl.uint32, bitcast=True)
    rounded = tl.where(magnitude < 0x3C800000, subnormal, normal)  # 0x3C800000: 2**-6
    return (rounded | sign).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_fp8(x, scale):
    """x / scale as float8_e4m3fn, saturated at +-448 (kv_quant.quantize_fp8)."""
    y = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -FP8_MAX), FP8_MAX)
    return _round_to_fp8_e4m3(y).to(tl.float8e4nv)


@triton.jit
def write_kv_kernel(key_ptr, value_ptr, kv_ptr, slot_ptr, kv_scale_ptr,
                     stride_key_t, stride_key_h, stride_val_t, stride_val_h,
                     stride_kv, stride_kb, stride_kt, stride_kh,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     KV_FP8: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padded token (CUDA graph bucket): nothing to write
        return
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    key = tl.load(key_ptr + token * stride_key_t + offs_h[:, None] * stride_key_h + offs_d[None, :],
                  mask=mask)
    value = tl.load(value_ptr + token * stride_val_t + offs_h[:, None] * stride_val_h + offs_d[None, :],
                    mask=mask)
    dst = (kv_ptr + (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_kt
           + offs_h[:, None] * stride_kh + offs_d[None, :])
    if KV_FP8:
        tl.store(dst, _quantize_fp8(key, tl.load(kv_scale_ptr)), mask=mask)
        tl.store(dst + stride_kv, _quantize_fp8(value, tl.load(kv_scale_ptr + 1)), mask=mask)
    else:
        tl.store(dst, key.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_kv, value.to(kv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _find_request(query_start_loc_ptr, q_tile, num_reqs, BLOCK_Q: tl.constexpr):
    """Largest request i whose first query tile ``qsl[i] // BLOCK_Q + i`` is <= q_tile."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= q_tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _find_token_request(query_start_loc_ptr, token, num_reqs):
    """Largest request i with ``qsl[i] <= token``: the one that holds the token (or, for a
    padding token past ``qsl[num_reqs]``, the last request, whose query it is not in)."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) <= token:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _in_row_class(q_len, ROW_CLASS: tl.constexpr, SHORT_QUERY_LEN: tl.constexpr):
    """Whether a request with q_len query tokens belongs to the launch's row class."""
    if ROW_CLASS == 1:
        return q_len <= SHORT_QUERY_LEN
    elif ROW_CLASS == 2:
        return q_len > SHORT_QUERY_LEN
    else:
        return q_len >= 0


@triton.jit
def _split_tiles(num_tiles, num_splits, MIN_SPLIT_TILES: tl.constexpr):
    """(tiles per split, splits used) for a context of num_tiles KV tiles; the attention and
    the merge kernel must agree on it."""
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), MIN_SPLIT_TILES)
    return tiles_per_split, tl.cdiv(num_tiles, tiles_per_split)


@triton.jit
def _kv_range(context_len, local_tile, q_len, sliding_window,
              BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, SLIDING: tl.constexpr):
    """(kv_start, kv_end, first KV tile, KV tile count) that a tile of query rows reads: causal up to
    its last row, and with a sliding window from its first row's window start. The attention and the
    merge kernel must agree on it."""
    kv_end = context_len + tl.minimum((local_tile + 1) * BLOCK_Q, q_len)
    kv_start = kv_end * 0
    if SLIDING:
        kv_start = tl.maximum(context_len + local_tile * BLOCK_Q - sliding_window + 1, 0)
    first_tile = kv_start // TILE_N
    return kv_start, kv_end, first_tile, tl.cdiv(kv_end, TILE_N) - first_tile


@triton.jit
def _soft_cap(scores, soft_cap):
    """soft_cap * tanh(scores / soft_cap), tanh from exp (saturates to +-1 without overflow trouble)."""
    return soft_cap * (1.0 - 2.0 / (tl.exp(2.0 * scores / soft_cap) + 1.0))


@triton.jit(do_not_specialize=PER_STEP_COUNTS)
def paged_attention_kernel(
        out_ptr, q_ptr, kv_ptr, block_table_ptr, seq_lens_ptr, query_start_loc_ptr,
        part_out_ptr, part_lse_ptr, kv_scale_ptr,
        scale_log2, num_reqs, num_splits, sliding_window, soft_cap,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kv, stride_kb, stride_kt, stride_kh, stride_bt,
        stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        TILE_N: tl.constexpr, DECODE_ONLY: tl.constexpr, SPLIT: tl.constexpr,
        MIN_SPLIT_TILES: tl.constexpr, ROW_CLASS: tl.constexpr, SHORT_QUERY_LEN: tl.constexpr,
        DOT_PRECISION: tl.constexpr, SLIDING: tl.constexpr, SOFT_CAP: tl.constexpr, KV_FP8: tl.constexpr):
    q_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE_ONLY:
        req = q_tile
        local_tile = 0
    else:
        req = _find_request(query_start_loc_ptr, q_tile, num_reqs, BLOCK_Q)
        local_tile = q_tile - (tl.load(query_start_loc_ptr + req) // BLOCK_Q + req)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if local_tile * BLOCK_Q >= q_len:
        return
    if not _in_row_class(q_len, ROW_CLASS, SHORT_QUERY_LEN):
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len  # query row j sits at position context_len + j

    offs_m = tl.arange(0, BLOCK_M)
    q_local = local_tile * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m // GROUP < BLOCK_Q) & (q_local < q_len)
    q_pos = context_len + q_local
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    q_token = (q_start + q_local).to(tl.int64)
    q = tl.load(q_ptr + q_token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)

    # Causal: this tile of rows sees positions < kv_end, nothing later (and, windowed, >= kv_start).
    kv_start, kv_end, first_tile, num_tiles = _kv_range(context_len, local_tile, q_len, sliding_window,
                                                        BLOCK_Q, TILE_N, SLIDING)
    tile_lo = first_tile
    tile_hi = first_tile + num_tiles
    used_splits = 1
    if SPLIT:
        tiles_per_split, used_splits = _split_tiles(num_tiles, num_splits, MIN_SPLIT_TILES)
        if split >= used_splits:
            return
        tile_lo = first_tile + split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, first_tile + num_tiles)

    if KV_FP8:  # scores are q . (k * k_scale)
        scale_log2 = scale_log2 * tl.load(kv_scale_ptr)
    offs_n = tl.arange(0, TILE_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    block_row = block_table_ptr + req.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        kv_pos = tile * TILE_N + offs_n
        kv_valid = (kv_pos < kv_end) & (kv_pos >= kv_start)
        block_id = tl.load(block_row + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
        kv_offset = block_id * stride_kb + (kv_pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        kv_mask = kv_valid[:, None] & d_valid[None, :]
        k = tl.load(kv_ptr + kv_offset[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(kv_ptr + stride_kv + kv_offset[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2
        if SOFT_CAP:  # scale_log2 is the plain scale here: cap first, then to the exp2 domain
            scores = _soft_cap(scores, soft_cap) * 1.4426950408889634
        visible = (kv_pos[None, :] <= q_pos[:, None]) & kv_valid[None, :]
        if SLIDING:
            visible = visible & (kv_pos[None, :] > q_pos[:, None] - sliding_window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if KV_FP8:  # the output is p . (v * v_scale)
        out = out * tl.load(kv_scale_ptr + 1)
    out_mask = row_valid[:, None] & d_valid[None, :]
    if used_splits > 1:
        part = (part_out_ptr + split * stride_ps + q_token[:, None] * stride_pt + head[:, None] * stride_ph
                + offs_d[None, :])
        tl.store(part, out, mask=out_mask)
        tl.store(part_lse_ptr + split * stride_ls + q_token * stride_lt + head, m_i + tl.log2(l_safe),
                 mask=row_valid)
    else:
        tl.store(out_ptr + q_token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=PER_STEP_COUNTS)
def merge_splits_kernel(out_ptr, part_out_ptr, part_lse_ptr, query_start_loc_ptr, seq_lens_ptr,
                         num_reqs, num_splits, sliding_window,
                         stride_ot, stride_oh, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, MIN_SPLIT_TILES: tl.constexpr,
                         DECODE_ONLY: tl.constexpr, ROW_CLASS: tl.constexpr, SHORT_QUERY_LEN: tl.constexpr,
                         SLIDING: tl.constexpr):
    """Combines the per-split softmax results of one query row (a token and a head): weights
    exp2(lse_s - max lse). Program 0 runs over requests (decode-only) or tokens."""
    head = tl.program_id(1)
    if DECODE_ONLY:
        req = tl.program_id(0)
        q_start = tl.load(query_start_loc_ptr + req)
        local = 0
    else:
        req = _find_token_request(query_start_loc_ptr, tl.program_id(0), num_reqs)
        q_start = tl.load(query_start_loc_ptr + req)
        local = tl.program_id(0) - q_start
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if local >= q_len:  # an empty request, or a padding token
        return
    if not _in_row_class(q_len, ROW_CLASS, SHORT_QUERY_LEN):  # another launch's row
        return
    # The same context the attention program of this row walked, and so the same split count.
    context_len = tl.load(seq_lens_ptr + req) - q_len
    _, _, _, num_tiles = _kv_range(context_len, local // BLOCK_Q, q_len, sliding_window, BLOCK_Q, TILE_N, SLIDING)
    _, used_splits = _split_tiles(num_tiles, num_splits, MIN_SPLIT_TILES)
    if used_splits == 1:  # written directly by the attention program
        return
    token = (q_start + local).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_valid = offs_s < used_splits
    lse = tl.load(part_lse_ptr + offs_s * stride_ls + token * stride_lt + head, mask=s_valid,
                  other=float("-inf"))
    lse_max = tl.max(lse, 0)
    weight = tl.where(s_valid, tl.exp2(lse - lse_max), 0.0)
    part = tl.load(part_out_ptr + offs_s[:, None] * stride_ps + token * stride_pt + head * stride_ph
                   + offs_d[None, :], mask=s_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)

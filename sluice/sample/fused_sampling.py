"""Fused sampling on CUDA: logits [N, V] in their own dtype -> one token per row, in one read.

The sampler takes this path when no row needs top-k, top-p or min-p (see ``Sampler``):

    greedy rows:  argmax_v logit_v                       (ties: the lowest token id)
    random rows:  argmax_v logit_v / T - log(E_v),  E_v ~ Exp(1)

The random rule is the exponential race (Gumbel-max) and samples exactly from softmax(logits / T).
One program owns one row and walks the vocabulary in four contiguous quarters at once, keeping a
running (best score, token) per lane and quarter; no probabilities, noise or float32 copy of the
logits ever reach memory.

Noise: a counter-based generator (Philox4x32), so draws need no state on the device and no sync.
One Philox call gives four 32-bit words, one per quarter, so token v of a vocabulary of V tokens
(Q = ceil(V / 4)) takes word v // Q of the call at counter v % Q:

    tokens:   [0, Q)      [Q, 2Q)     [2Q, 3Q)    [3Q, V)
    word:      0           1           2           3        of philox(key, (v % Q, c1, c2, 0))

The mapping depends on V only, not on the block size, so tuning BLOCK_V changes no stream. Keys:
    unseeded row i:           key = the step seed (drawn on the host), (c1, c2) = (i, 0)
    seeded row (seed, pos):   key = the request's seed,                (c1, c2) = (pos, 1)
where pos is the output position being sampled, so a seeded request's token at a position does not
depend on its batch neighbours, its row, or on a preemption in between.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from sluice.sample.metadata import SamplingMetadata

# One loop iteration reads BLOCK_V tokens (BLOCK_V // 4 per quarter). 4096 tokens in 8 warps is
# 16 tokens per thread per iteration (4 Philox calls), 64 registers on sm_90; not yet tuned.
BLOCK_V = 4096
NUM_WARPS = 8
# Philox4x32-10, the rounds of cuRAND and of torch's CUDA generator.
PHILOX_ROUNDS = 10
SEEDED_STREAM = 1 << 32  # c2 = 1: seeded rows never share a Philox stream with unseeded ones
_MASK64 = (1 << 64) - 1
LOG2E = tl.constexpr(1.4426950408889634)
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _log2(x):
    # lg2.approx (one MUFU op, error about 2^-22) is far more precise than what moves an argmax of
    # bf16 logits; the accurate log is a polynomial, and with two logs a token the sm_90 loop took
    # about 90 instructions a token instead of 37. The interpreter has no libdevice: accurate log.
    if INTERPRETED:
        return tl.log2(x)
    else:
        return libdevice.fast_log2f(x)


@triton.jit
def _log2_exponential(bits):
    """log2(E / ln 2) for E ~ Exp(1) made from 32 random bits; accurate near E = 0, where the
    race's winners are decided.

    u = (bits + 1/2) / 2^32 lies in (0, 1) with full float32 resolution near 0, and
    E / ln 2 = -log2(1 - u). Below u = 2^-7 the series (u + u^2/2 + u^3/3 + u^4/4) / ln 2 stands
    in, because 1 - u would round away u's low bits; above it, 1 - u is exact or nearly so.
    """
    u = bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    series = u * (LOG2E + u * (LOG2E / 2 + u * (LOG2E / 3 + u * (LOG2E / 4))))
    return _log2(tl.where(u < 0.0078125, series, -_log2(1.0 - u)))


@triton.jit
def _race_quarter(row_logits, token, in_range, scale, bits, best, best_token, ADD_NOISE: tl.constexpr):
    """One quarter's block: keeps each lane's best score; strict > keeps the lowest token.

    With noise the score is log2(e) * (logit / T - ln E) + log2(ln 2), whose argmax is the race's.
    """
    score = tl.load(row_logits + token, mask=in_range, other=float("-inf")).to(tl.float32)
    if ADD_NOISE:
        score = score * scale - _log2_exponential(bits)
    better = score > best
    return tl.where(better, score, best), tl.where(better, token, best_token)


@triton.jit
def _row_best_token(row_logits, vocab_size, scale, key, c1, c2,
                    ADD_NOISE: tl.constexpr, LANES: tl.constexpr, PHILOX_ROUNDS: tl.constexpr):
    """The row's winning token: argmax of the logits, or of the noisy scores with ADD_NOISE."""
    quarter = (vocab_size + 3) // 4
    lanes = tl.arange(0, LANES)
    best0 = tl.full([LANES], float("-inf"), tl.float32)
    best1, best2, best3 = best0, best0, best0
    token0, token1, token2, token3 = lanes, lanes + quarter, lanes + 2 * quarter, lanes + 3 * quarter
    zeros = tl.zeros([LANES], tl.uint32)
    bits0, bits1, bits2, bits3 = zeros, zeros, zeros, zeros
    for start in range(0, quarter, LANES):
        position = start + lanes
        in_quarter = position < quarter
        if ADD_NOISE:
            bits0, bits1, bits2, bits3 = tl.philox(key, position.to(tl.uint32), zeros + c1, zeros + c2, zeros,
                                                   PHILOX_ROUNDS)
        best0, token0 = _race_quarter(row_logits, position, in_quarter, scale, bits0,
                                      best0, token0, ADD_NOISE)
        best1, token1 = _race_quarter(row_logits, position + quarter, in_quarter, scale, bits1,
                                      best1, token1, ADD_NOISE)
        best2, token2 = _race_quarter(row_logits, position + 2 * quarter, in_quarter, scale, bits2,
                                      best2, token2, ADD_NOISE)
        last = position + 3 * quarter
        best3, token3 = _race_quarter(row_logits, last, in_quarter & (last < vocab_size), scale,
                                      bits3, best3, token3, ADD_NOISE)
    top = tl.maximum(tl.maximum(tl.max(best0, 0), tl.max(best1, 0)),
                     tl.maximum(tl.max(best2, 0), tl.max(best3, 0)))
    # Lanes that never beat -inf keep their first token id, so an all -inf row yields token 0.
    never = vocab_size + 4 * LANES
    low0 = tl.min(tl.where(best0 == top, token0, never), 0)
    low1 = tl.min(tl.where(best1 == top, token1, never), 0)
    low2 = tl.min(tl.where(best2 == top, token2, never), 0)
    low3 = tl.min(tl.where(best3 == top, token3, never), 0)
    return tl.minimum(tl.minimum(low0, low1), tl.minimum(low2, low3))


@triton.jit(do_not_specialize=["num_rows", "step_seed"])
def _fused_sample_kernel(logits_ptr, logits_row_stride, vocab_size, temperature_ptr, greedy_mask_ptr,
                         row_keys_ptr, num_rows, step_seed, sampled_ptr,
                         ALL_GREEDY: tl.constexpr, HAS_GREEDY_MASK: tl.constexpr, HAS_ROW_KEYS: tl.constexpr,
                         LANES: tl.constexpr, PHILOX_ROUNDS: tl.constexpr):
    row = tl.program_id(0)
    row_logits = logits_ptr + row.to(tl.int64) * logits_row_stride
    if HAS_GREEDY_MASK:
        is_greedy = tl.load(greedy_mask_ptr + row)
    else:
        is_greedy = ALL_GREEDY
    if is_greedy:
        token = _row_best_token(row_logits, vocab_size, 1.0, 0, 0, 0, False, LANES, PHILOX_ROUNDS)
    else:
        scale = LOG2E / tl.load(temperature_ptr + row)
        if HAS_ROW_KEYS:
            key = tl.load(row_keys_ptr + row)
            counter = tl.load(row_keys_ptr + num_rows + row)
        else:
            key = step_seed.to(tl.int64)
            counter = row.to(tl.int64)
        c1 = counter.to(tl.uint32)  # the low 32 bits
        c2 = (counter >> 32).to(tl.uint32)
        token = _row_best_token(row_logits, vocab_size, scale, key, c1, c2, True, LANES,
                                PHILOX_ROUNDS)
    tl.store(sampled_ptr + row, token.to(tl.int64))


def sample(logits: torch.Tensor, metadata: SamplingMetadata, step_seed: int,
           block_v: int = BLOCK_V) -> torch.Tensor:
    """One token per row (long [N], on the logits' device); no host-device sync.

    ``step_seed`` keys the unseeded rows' noise (any int, drawn on the host each step); seeded rows
    claim their output position from their ``RequestSamplingState``.
    """
    if logits.shape[0] and logits.stride(1) != 1:
        logits = logits.contiguous()
    row_keys = None if metadata.all_greedy else seeded_row_keys(metadata, step_seed, logits.device)
    return _launch(logits, metadata.temperature, metadata.greedy_mask, row_keys, step_seed,
                   metadata.all_greedy, block_v)


def compile_variants(logits: torch.Tensor, block_v: int = BLOCK_V) -> None:
    """Compiles, at start-up, the kernel variant of every kind of batch for logits like these
    (dtype and row length): all greedy, all random, both mixed, with and without seeded rows.
    Compiled at its first use instead, a variant stops the step that needs it for about a second."""
    one_row = logits[:1].contiguous()
    device = logits.device
    temperature = torch.ones(1, dtype=torch.float32, device=device)
    greedy_mask = torch.zeros(1, dtype=torch.bool, device=device)
    row_keys = torch.zeros(2, 1, dtype=torch.long, device=device)
    step_seed = 1 << 62  # the Sampler's step seeds have bit 62 set: always a 64-bit argument
    _launch(one_row, None, None, None, step_seed, True, block_v)
    for mask in (None, greedy_mask):
        for keys in (None, row_keys):
            _launch(one_row, temperature, mask, keys, step_seed, False, block_v)


def _launch(logits: torch.Tensor, temperature: torch.Tensor | None, greedy_mask: torch.Tensor | None,
            row_keys: torch.Tensor | None, step_seed: int, all_greedy: bool, block_v: int) -> torch.Tensor:
    num_rows, vocab_size = logits.shape
    sampled = torch.empty(num_rows, dtype=torch.long, device=logits.device)
    if num_rows == 0:
        return sampled
    # Pointers the kernel never reads (their feature is off) point at the logits.
    _fused_sample_kernel[(num_rows,)](
        logits, logits.stride(0), vocab_size,
        temperature if temperature is not None else logits,
        greedy_mask if greedy_mask is not None else logits,
        row_keys if row_keys is not None else logits,
        num_rows, _as_int64(step_seed), sampled,
        ALL_GREEDY=all_greedy, HAS_GREEDY_MASK=greedy_mask is not None,
        HAS_ROW_KEYS=row_keys is not None, LANES=block_v // 4, PHILOX_ROUNDS=PHILOX_ROUNDS,
        num_warps=NUM_WARPS)
    return sampled


def seeded_row_keys(metadata: SamplingMetadata, step_seed: int, device: torch.device) -> torch.Tensor | None:
    """long [2, N]: each row's Philox key and counter word (c2 << 32 | c1); None without seeded rows.

    Claims the output position of each seeded row, so call it once per sampling step.
    """
    seeded = metadata.seeded_rows
    if not seeded:
        return None
    num_rows = metadata.num_reqs
    keys = [_as_int64(step_seed)] * num_rows
    counters = list(range(num_rows))
    for row, state in seeded.items():  # a loop over seeded requests only
        keys[row] = _as_int64(state.params.seed)
        counters[row] = SEEDED_STREAM | state.claim_draw_position()
    # Built on the host and copied without blocking: no device sync on the step's path.
    return torch.tensor([keys, counters], dtype=torch.long).to(device, non_blocking=True)


def _as_int64(seed: int) -> int:
    """Any Python int as the signed 64-bit word with the same low 64 bits (the Philox key)."""
    seed &= _MASK64
    return seed - (1 << 64) if seed >= 1 << 63 else seed

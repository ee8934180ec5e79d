"""The fused MoE Triton kernels compute what the torch reference (``moe.experts_torch``) computes.

Runs on CUDA; skipped without it. Without a GPU, the small cases run under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_fused_moe.py

(bfloat16 and the large shapes are left to CUDA there, as in test_fused_layers.py).
"""
from __future__ import annotations

import os

import pytest
import torch

from sluice.layers.moe import FusedMoE, experts_torch, select_experts

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or TRITON_INTERPRET=1 for the interpreter)")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
fused_moe = pytest.importorskip("sluice.layers.fused_moe")

BF16 = pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(INTERPRET, reason="interpreter bf16"))
FP16 = pytest.param(torch.float16, id="fp16")
FP32 = pytest.param(torch.float32, id="fp32")
# (tokens, experts, top_k, hidden, intermediate): decode and prefill sizes, odd widths (masked tiles),
# top-k 1..8, experts 8..128; the Qwen3-30B-A3B layer shape last.
SMALL_SHAPES = [(1, 8, 2, 96, 40), (5, 4, 4, 64, 32), (16, 16, 1, 128, 48), (33, 8, 3, 72, 56)]
LARGE_SHAPES = [(1, 128, 8, 2048, 768), (7, 64, 6, 1024, 352), (32, 128, 8, 2048, 768), (64, 8, 2, 4096, 1792),
                (100, 60, 4, 1000, 200), (256, 128, 8, 2048, 768), (512, 16, 1, 512, 1408),
                (1024, 8, 2, 1024, 3584), (1024, 128, 8, 2048, 768)]
SHAPES = SMALL_SHAPES + [pytest.param(*s, marks=needs_cuda) for s in LARGE_SHAPES]


def _randn(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype).to(DEVICE)


def _problem(num_tokens: int, num_experts: int, top_k: int, hidden: int, intermediate: int, dtype: torch.dtype,
             seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Activations of order 1 and weights scaled so every projection's output is of order 1 too."""
    x = _randn(num_tokens, hidden, seed=seed, dtype=dtype)
    w13 = _randn(num_experts, 2 * intermediate, hidden, seed=seed + 1, scale=hidden ** -0.5, dtype=dtype)
    w2 = _randn(num_experts, hidden, intermediate, seed=seed + 2, scale=intermediate ** -0.5, dtype=dtype)
    topk_weights, topk_ids = select_experts(_randn(num_tokens, num_experts, seed=seed + 3), top_k, renormalize=True)
    return x, w13, w2, topk_weights, topk_ids


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """16-bit: the kernels' and cuBLAS's float32 sums differ in order, which flips roundings of the
    intermediate (gate, up, silu, product, down): a few ulps of the dtype, relative to the output scale."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = expected.float().abs().max().item()
    error = (actual.float() - expected.float()).abs()
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[actual.dtype]
    assert error.max().item() <= tol * scale, f"max error {error.max().item():.3e} (scale {scale:.3e})"
    assert error.mean().item() <= tol * scale / 8, f"mean error {error.mean().item():.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [
    (1, 8, 2, 16), (37, 16, 3, 16), (64, 8, 8, 32),
    pytest.param(1024, 128, 8, 16, marks=needs_cuda), pytest.param(1000, 60, 4, 64, marks=needs_cuda)])
def test_align_groups_every_slot_under_its_expert(num_tokens, num_experts, top_k, block_m):
    _, topk_ids = select_experts(_randn(num_tokens, num_experts, seed=7), top_k, renormalize=True)
    sorted_slots, expert_ids, num_padded = fused_moe.align_by_expert(topk_ids, num_experts, block_m)
    flat = topk_ids.flatten().cpu()
    counts = torch.bincount(flat, minlength=num_experts)
    used = int(num_padded.item())
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum())
    slots, blocks = sorted_slots.cpu(), expert_ids.cpu()
    assert sorted_slots.shape[0] == fused_moe.max_padded_rows(flat.numel(), num_experts, block_m) >= used
    real = slots[:used] < flat.numel()
    assert sorted(slots[:used][real].tolist()) == list(range(flat.numel()))  # each slot exactly once
    assert (slots[used:] == flat.numel()).all()  # sentinels past the rows in use
    row_experts = blocks[:used // block_m].repeat_interleave(block_m)
    assert torch.equal(flat[slots[:used][real].long()], row_experts[real])  # each row in its expert's block
    assert torch.equal(torch.unique_consecutive(blocks[:used // block_m]), torch.nonzero(counts).flatten())


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,intermediate", SHAPES)
def test_fused_experts_match_reference(num_tokens, num_experts, top_k, hidden, intermediate, dtype):
    x, w13, w2, topk_weights, topk_ids = _problem(num_tokens, num_experts, top_k, hidden, intermediate, dtype)
    actual = fused_moe.fused_experts(x, w13, w2, topk_weights, topk_ids)
    assert_close_to_reference(actual, experts_torch(x, w13, w2, topk_weights, topk_ids))


@pytest.mark.parametrize("config", [
    fused_moe.MoEKernelConfig(16, 64, 128), fused_moe.MoEKernelConfig(32, 128, 64, num_warps=8),
    pytest.param(fused_moe.MoEKernelConfig(64, 64, 64, num_stages=2), marks=needs_cuda),
    pytest.param(fused_moe.MoEKernelConfig(128, 128, 64, num_warps=8, num_stages=3), marks=needs_cuda)],
    ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}")
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_every_tile_config_matches_reference(config, dtype):
    shape = (48, 16, 4, 256, 96) if INTERPRET else (300, 32, 4, 1024, 352)
    x, w13, w2, topk_weights, topk_ids = _problem(*shape, dtype, seed=20)
    actual = fused_moe.fused_experts(x, w13, w2, topk_weights, topk_ids, config=config)
    assert_close_to_reference(actual, experts_torch(x, w13, w2, topk_weights, topk_ids))


def test_tokens_routed_to_one_expert_and_empty_steps():
    """Every token on the same experts (a padded warm-up step of zeros routes so) and zero tokens."""
    x, w13, w2, topk_weights, _ = _problem(40, 8, 2, 64, 32, torch.float16, seed=30)
    topk_ids = torch.tensor([[5, 2]] * 40, device=DEVICE)
    actual = fused_moe.fused_experts(x, w13, w2, topk_weights, topk_ids)
    assert_close_to_reference(actual, experts_torch(x, w13, w2, topk_weights, topk_ids))
    empty = fused_moe.fused_experts(x[:0], w13, w2, topk_weights[:0], topk_ids[:0])
    assert empty.shape == (0, 64)


@needs_cuda
def test_moe_layer_uses_the_kernels_and_replays_under_cuda_graphs():
    dtype, num_tokens, hidden = torch.bfloat16, 24, 1024
    moe = FusedMoE(num_experts=32, top_k=4, hidden_size=hidden, intermediate_size=256, renormalize=True).to(DEVICE)
    with torch.no_grad():
        moe.w13_weight.copy_(_randn(*moe.w13_weight.shape, seed=40, scale=hidden ** -0.5))
        moe.w2_weight.copy_(_randn(*moe.w2_weight.shape, seed=41, scale=256 ** -0.5))
    moe = moe.to(dtype)
    hidden_states = _randn(num_tokens, hidden, seed=42, dtype=dtype)
    logits = _randn(num_tokens, 32, seed=43, dtype=dtype)
    assert fused_moe.can_fused_experts(hidden_states, moe.w13_weight, moe.w2_weight)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        moe(hidden_states, logits)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        graph_output = moe(hidden_states, logits)

    hidden_states.copy_(_randn(num_tokens, hidden, seed=44, dtype=dtype))
    logits.copy_(_randn(num_tokens, 32, seed=45, dtype=dtype))  # new routing: other experts, other counts
    graph.replay()
    torch.cuda.synchronize()
    topk_weights, topk_ids = select_experts(logits, 4, renormalize=True)
    assert_close_to_reference(graph_output, experts_torch(hidden_states, moe.w13_weight, moe.w2_weight,
                                                          topk_weights, topk_ids))


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
@pytest.mark.parametrize("renormalize,round_weights", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [
    (1, 8, 2), (13, 60, 4), (40, 16, 1), (5, 128, 8), pytest.param(1024, 128, 8, marks=needs_cuda),
    pytest.param(300, 8, 8, marks=needs_cuda)])
def test_route_matches_select_experts(num_tokens, num_experts, top_k, renormalize, round_weights, dtype):
    logits = _randn(num_tokens, num_experts, seed=50, scale=2.0, dtype=dtype)
    weights, ids = fused_moe.route(logits, top_k, renormalize, round_weights)
    want_weights, want_ids = select_experts(logits, top_k, renormalize, dtype if round_weights else None)
    assert weights.dtype == torch.float32 and ids.shape == (num_tokens, top_k)
    # 16-bit logits tie often: tied experts may come in either order, so rows compare sorted by expert id
    ids, order = ids.long().sort(dim=-1)
    weights = weights.gather(-1, order)
    want_ids, want_order = want_ids.sort(dim=-1)
    want_weights = want_weights.gather(-1, want_order)
    assert torch.equal(ids, want_ids)
    # exp in the kernel and in torch differ by an ulp; a weight rounded to 16 bits may then round the other way
    tol = torch.finfo(dtype).eps if round_weights else 1e-6
    torch.testing.assert_close(weights, want_weights, rtol=tol, atol=1e-7)

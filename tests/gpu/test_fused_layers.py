"""The fused Triton kernels of the decoder layers compute what the layers' torch code computes.

Runs on CUDA; skipped without it. For development without a GPU, run it under the Triton
interpreter on CPU tensors:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_fused_layers.py

Three things differ under the interpreter, all about the interpreter rather than the kernels:
bfloat16 cases are skipped (its float32 -> bfloat16 cast truncates where compiled code rounds to
nearest even; float16 covers the same rounding steps), tiles hold more rows (it pays per program,
not per element), and the largest activation shape is left to CUDA.
"""
from __future__ import annotations

import os

import pytest
import torch

from sluice.layers.activation import SiluAndMul
from sluice.layers.norm import RMSNorm
from sluice.layers.rotary import RopeSettings, RotaryEmbedding

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or TRITON_INTERPRET=1 for the interpreter)")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

fused_kernels = pytest.importorskip("sluice.layers.fused_kernels")

DTYPES = [pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(INTERPRET, reason="interpreter bf16")),
          pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]
NUM_TOKENS = [1, 7, 256, 4097]
LLAMA3_ROPE = RopeSettings(rope_theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                           high_freq_factor=4.0, original_max_position_embeddings=8192)


@pytest.fixture(autouse=True)
def interpreter_tiles(monkeypatch):
    if INTERPRET:
        monkeypatch.setattr(fused_kernels, "TILE_ELEMENTS", 1 << 16)


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 2.0) -> None:
    """Equal up to ``ulps`` units in the last place of the dtype (float32: a few 1e-7). Two, because
    a one-ulp flip of an intermediate rounding (a float32 sum in another order, a libm ulp) can
    reach two ulps after the next rounded multiply."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    eps = torch.finfo(actual.dtype).eps
    tol = ulps * eps if actual.dtype != torch.float32 else 4e-6
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def random_norm(width: int, dtype: torch.dtype, seed: int) -> RMSNorm:
    norm = RMSNorm(width, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        norm.weight.copy_(1.0 + 0.2 * torch.randn(width, generator=gen))
    return norm.to(dtype)


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)


# --- RMSNorm ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [576, 1000, 4096])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rms_norm_matches_torch(num_tokens, width, dtype):
    norm = random_norm(width, dtype, seed=width)
    x = randn(num_tokens, width, dtype=dtype, seed=1, scale=3.0)
    assert_within_ulps(fused_kernels.rms_norm(x, norm.weight, norm.eps), norm.forward_torch(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [576, 1000, 4096])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_residual_rms_norm_adds_exactly_and_normalizes_the_sum(num_tokens, width, dtype):
    norm = random_norm(width, dtype, seed=width)
    x, residual = randn(num_tokens, width, dtype=dtype, seed=2), randn(num_tokens, width, dtype=dtype, seed=3)
    x_before, residual_before = x.clone(), residual.clone()
    normed, new_residual = fused_kernels.rms_norm(x, norm.weight, norm.eps, residual)
    expected_normed, expected_residual = norm.forward_torch(x, residual)
    assert torch.equal(new_residual, expected_residual)  # one rounding of the sum, as torch does
    assert_within_ulps(normed, expected_normed)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs are not written


def test_rms_norm_keeps_torch_type_promotion_for_a_float32_weight():
    norm = random_norm(1000, torch.float32, seed=5)
    x = randn(7, 1000, dtype=torch.float16, seed=6)
    residual = randn(7, 1000, dtype=torch.float32, seed=7)
    normed, new_residual = fused_kernels.rms_norm(x, norm.weight, norm.eps, residual)
    expected_normed, expected_residual = norm.forward_torch(x, residual)
    assert (normed.dtype, new_residual.dtype) == (torch.float32, torch.float32)
    assert torch.equal(new_residual, expected_residual)
    assert_within_ulps(normed, expected_normed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_per_head_norm_on_strided_qkv_views(head_dim, dtype):
    """Qwen3 normalizes each head of q and k, seen as [T, heads, head_dim] views of the qkv output."""
    num_tokens, num_heads, num_kv_heads = 37, 16, 4
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=8)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    norm = random_norm(head_dim, dtype, seed=9)
    for view in (q.reshape(num_tokens, num_heads, head_dim), k.reshape(num_tokens, num_kv_heads, head_dim)):
        assert not view.is_contiguous()
        assert fused_kernels.can_rms_norm(view, norm.weight, None) == (DEVICE == "cuda")
        assert_within_ulps(fused_kernels.rms_norm(view, norm.weight, norm.eps), norm.forward_torch(view))


# --- rotary embedding -----------------------------------------------------------------------

# name -> (num_heads, num_kv_heads, head_dim, partial_rotary_factor)
ROPE_LAYOUTS = {
    "llama8b": (32, 8, 128, 1.0),
    "smollm_gqa_64": (9, 3, 64, 1.0),
    "partial_128": (8, 2, 128, 0.5),
    "head_dim_80": (4, 4, 80, 1.0),
    "tiny_head_dim_16": (4, 2, 16, 1.0),
}


def split_qkv(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Strided q, k, v column slices of one qkv projection output, as LlamaAttention makes them."""
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=11, scale=2.0)
    return qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(ROPE_LAYOUTS))
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rotary_in_place_matches_torch(num_tokens, layout, dtype):
    num_heads, num_kv_heads, head_dim, partial = ROPE_LAYOUTS[layout]
    rope = RotaryEmbedding(head_dim, RopeSettings(**{**LLAMA3_ROPE.__dict__, "partial_rotary_factor": partial}))
    rope = rope.to(DEVICE)
    q, k, v = split_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype)
    gen = torch.Generator().manual_seed(num_tokens)
    positions = torch.randint(0, 131072, (num_tokens,), generator=gen).to(DEVICE)
    positions[0] = 131071
    expected_q, expected_k = rope.forward_torch(positions, q, k)
    v_before = v.clone()

    fused_kernels.apply_rotary_(positions, q, k, rope.inv_freq, head_dim, rope.rotary_dim)

    assert_within_ulps(q, expected_q)
    assert_within_ulps(k, expected_k)
    assert torch.equal(v, v_before)
    # No exact-equality check in half precision: at positions near 131072 the float32 cos/sin of
    # CUDA's libm and of Triton's libdevice differ in the last bit often enough (H100: 21% of bf16
    # elements at position 131071) to flip bf16 roundings; within_ulps above is the criterion.


def test_rotary_leaves_the_passthrough_dims_of_each_head_alone():
    head_dim, rotary_dim = 128, 64
    rope = RotaryEmbedding(head_dim, RopeSettings(partial_rotary_factor=0.5)).to(DEVICE)
    q, k, _ = split_qkv(5, 4, 2, head_dim, torch.float32)
    q_before, k_before = q.clone(), k.clone()
    fused_kernels.apply_rotary_(torch.arange(5, device=DEVICE) + 10, q, k, rope.inv_freq, head_dim, rotary_dim)
    for after, before in ((q, q_before), (k, k_before)):
        after, before = after.view(5, -1, head_dim), before.view(5, -1, head_dim)
        assert torch.equal(after[..., rotary_dim:], before[..., rotary_dim:])
        assert not torch.equal(after[..., :rotary_dim], before[..., :rotary_dim])


def test_rotary_at_position_zero_is_the_identity():
    rope = RotaryEmbedding(64, LLAMA3_ROPE).to(DEVICE)
    q, k, _ = split_qkv(3, 2, 1, 64, torch.float32)
    q_before, k_before = q.clone(), k.clone()
    fused_kernels.apply_rotary_(torch.zeros(3, dtype=torch.int64, device=DEVICE), q, k, rope.inv_freq, 64, 64)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


# --- silu(gate) * up ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1000, 1536, 14336])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_and_mul_matches_torch(num_tokens, width, dtype):
    if INTERPRET and num_tokens * width > 4097 * 1536:
        pytest.skip("too large for the interpreter")
    x = randn(num_tokens, 2 * width, dtype=dtype, seed=12, scale=3.0)
    out = fused_kernels.silu_and_mul(x)
    assert out.shape == (num_tokens, width)
    assert_within_ulps(out, SiluAndMul().forward_torch(x))


# --- dispatch -------------------------------------------------------------------------------

def test_layers_dispatch_cuda_tensors_to_the_kernels_and_keep_torch_elsewhere():
    assert not fused_kernels.runs_on(torch.zeros(1))
    x = torch.zeros(2, 8, device=DEVICE)
    weight = torch.ones(8, device=DEVICE)
    assert fused_kernels.can_rms_norm(x, weight, None) == (DEVICE == "cuda")
    assert fused_kernels.can_silu_and_mul(x) == (DEVICE == "cuda")


def test_shapes_the_kernels_do_not_take_fall_back(monkeypatch):
    monkeypatch.setattr(fused_kernels, "runs_on", lambda x: True)
    too_wide = torch.zeros(1, fused_kernels.MAX_NORM_WIDTH + 1)
    assert not fused_kernels.can_rms_norm(too_wide, torch.ones(too_wide.shape[-1]), None)
    assert not fused_kernels.can_rms_norm(torch.zeros(2, 8).t(), torch.ones(2), None)  # strided last dim
    assert not fused_kernels.can_rms_norm(torch.zeros(2, 8), torch.ones(8), torch.zeros(1, 8))  # broadcast
    assert not fused_kernels.can_silu_and_mul(torch.zeros(2, 7))
    q, k = torch.zeros(3, 4 * 16), torch.zeros(3, 2 * 16)
    inv_freq = torch.ones(7)
    assert not fused_kernels.can_apply_rotary(torch.zeros(3), q, k, inv_freq, 16, 14 + 1)  # odd rotary dim
    assert not fused_kernels.can_apply_rotary(torch.zeros(4), q, k, torch.ones(8), 16, 16)  # positions != T
    assert fused_kernels.can_apply_rotary(torch.zeros(3), q, k, torch.ones(8), 16, 16)


# --- a whole model ----------------------------------------------------------------------------

def build_tiny_model(family: str, dtype: torch.dtype) -> torch.nn.Module:
    """A tiny model built on DEVICE in ``dtype``, with seeded weights wide enough that every layer matters."""
    from sluice.attention import get_attention_backend
    from sluice.models.loader import build_model
    from tests.tiny_models import tiny_config

    pytest.importorskip("transformers")
    config = tiny_config(family, rope_parameters={**LLAMA3_ROPE.__dict__, "original_max_position_embeddings": 64})
    model = build_model(config, dtype, DEVICE, get_attention_backend(DEVICE), load_format="dummy")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.08 * noise)
    return model


def forward_logits(model: torch.nn.Module) -> torch.Tensor:
    from sluice.layers.attention import bind_kv_cache
    from tests.models.paged_batch import StepRequest, allocate_kv_caches, build_step, scrambled_block_ids

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in (40, 3, 17)]
    blocks = scrambled_block_ids(3, 3, 16)
    # the last request computes its last 9 tokens on top of 8 cached ones: positions start above zero
    requests = [StepRequest(prompts[0], 0, 40, blocks[0]), StepRequest(prompts[1], 0, 3, blocks[1]),
                StepRequest(prompts[2], 8, 9, blocks[2])]
    bind_kv_cache(model, allocate_kv_caches(model, num_blocks=16, block_size=16))
    input_ids, positions, metadata = build_step(requests, 16, DEVICE)
    with torch.inference_mode():
        return model.compute_logits(model(input_ids, positions, metadata)).float().cpu()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tiny_model_with_fused_layers_matches_torch_layers(family, monkeypatch):
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = build_tiny_model(family, dtype)
    monkeypatch.setattr(fused_kernels, "runs_on", lambda x: False)
    expected = forward_logits(model)

    calls: dict[str, int] = {}
    for name in ("rms_norm", "apply_rotary_", "silu_and_mul"):
        kernel = getattr(fused_kernels, name)
        monkeypatch.setattr(fused_kernels, name,
                            lambda *args, _kernel=kernel, _name=name, **kwargs:
                            calls.update({_name: calls.get(_name, 0) + 1}) or _kernel(*args, **kwargs))
    monkeypatch.setattr(fused_kernels, "runs_on", lambda x: True)
    actual = forward_logits(model)

    num_layers = model.config.num_hidden_layers
    per_head_norms = 2 if family == "qwen3" else 0
    assert calls == {"rms_norm": (2 + per_head_norms) * num_layers + 1, "apply_rotary_": num_layers,
                     "silu_and_mul": num_layers}
    error = (actual - expected).norm() / expected.norm()
    assert error < (1e-5 if dtype == torch.float32 else 2e-2), f"relative error {error:.2e}"


# --- CUDA graphs ------------------------------------------------------------------------------

@needs_cuda
def test_kernels_replay_under_cuda_graphs_on_new_inputs():
    dtype, num_tokens = torch.bfloat16, 64
    norm = random_norm(4096, dtype, seed=13)
    rope = RotaryEmbedding(128, LLAMA3_ROPE).to(DEVICE)
    hidden, residual = randn(num_tokens, 4096, dtype=dtype, seed=14), randn(num_tokens, 4096, dtype=dtype, seed=15)
    qkv = randn(num_tokens, 48 * 128, dtype=dtype, seed=16)
    gate_up = randn(num_tokens, 2 * 1536, dtype=dtype, seed=17)
    positions = torch.arange(num_tokens, device=DEVICE)

    def step() -> tuple[torch.Tensor, ...]:
        normed, new_residual = fused_kernels.rms_norm(hidden, norm.weight, norm.eps, residual)
        q, k, _ = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
        fused_kernels.apply_rotary_(positions, q, k, rope.inv_freq, 128, 128)
        return normed, new_residual, fused_kernels.silu_and_mul(gate_up)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_outputs = step()

    for buffer, seed in ((hidden, 18), (residual, 19), (qkv, 20), (gate_up, 21)):
        buffer.copy_(randn(*buffer.shape, dtype=dtype, seed=seed))
    positions.copy_(torch.randint(0, 131072, (num_tokens,), device=DEVICE))
    q, k, _ = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    expected_q, expected_k = rope.forward_torch(positions, q, k)
    expected = (*norm.forward_torch(hidden, residual), SiluAndMul().forward_torch(gate_up))
    graph.replay()
    torch.cuda.synchronize()
    for actual, wanted in zip(graph_outputs, expected):
        assert_within_ulps(actual, wanted)
    assert_within_ulps(q, expected_q)
    assert_within_ulps(k, expected_k)

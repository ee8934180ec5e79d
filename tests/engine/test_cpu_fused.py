"""The fused bfloat16 CPU kernels (layers/cpu_fused.py, csrc/cpu_fused.c) against the torch references they replace.

SiLU * mul and rope round exactly where the references round: bit-equal outputs. RMSNorm may differ in the order
of its sum of squares, so a few elements may land one bfloat16 ulp apart; the residual sum is exact. float32
(the transformers-exact oracle) never takes the kernels.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from sluice.attention import cpu_kernel
from sluice.layers import cpu_fused
from sluice.layers.activation import SiluAndMul
from sluice.layers.norm import GemmaRMSNorm, RMSNorm
from sluice.layers.rope_scaling import RopeSettings
from sluice.layers.rotary import RotaryEmbedding


@pytest.fixture(scope="module", autouse=True)
def built():
    if shutil.which(cpu_kernel.COMPILER) is None:
        pytest.skip(f"no C compiler ({cpu_kernel.COMPILER!r}) to build the fused CPU kernels")
    assert cpu_fused.kernels() is not None, "a compiler is present, so the kernels must build"


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("rows", [1, 3, 17, 300])
@pytest.mark.parametrize("width", [8, 100, 576, 4096])
@pytest.mark.parametrize("norm_cls", [RMSNorm, GemmaRMSNorm])
def test_rms_norm_matches_the_reference(rows, width, norm_cls):
    gen = torch.Generator().manual_seed(rows * width)
    norm = norm_cls(width, 1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=gen) * (0.1 if norm_cls is GemmaRMSNorm else 1.0))
    x = (torch.randn(rows, width, generator=gen) * 3).bfloat16()
    residual = torch.randn(rows, width, generator=gen).bfloat16()
    assert cpu_fused.can_rms_norm(x, norm.weight, residual)
    with torch.inference_mode():
        pairs = [(norm(x), norm.forward_torch(x))]
        (out, new_residual), (ref, ref_residual) = norm(x, residual), norm.forward_torch(x, residual)
    assert _bits_equal(new_residual, ref_residual)  # one bfloat16 add, as torch's
    pairs.append((out, ref))
    for got, want in pairs:
        _assert_norm_close(got, want)


def _assert_norm_close(got: torch.Tensor, want: torch.Tensor) -> None:
    diff = (got.float() - want.float()).abs()
    assert (diff <= want.float().abs() * 2 ** -6 + 1e-30).all()  # one ulp of the normed value, times weight
    assert (diff > 0).float().mean() < 0.01


def test_rms_norm_reads_strided_rows_and_per_head_tensors():
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, 1e-6).bfloat16()
    wide = torch.randn(5, 96, generator=gen).bfloat16()
    x = wide[:, :64]  # a column slice: row stride 96
    heads = torch.randn(5, 3, 64, generator=gen).bfloat16()  # a q/k norm's [T, heads, D]
    assert cpu_fused.can_rms_norm(x, norm.weight, None) and cpu_fused.can_rms_norm(heads, norm.weight, None)
    with torch.inference_mode():
        _assert_norm_close(norm(x), norm.forward_torch(x.contiguous()))
        out = norm(heads)
        assert out.shape == heads.shape
        _assert_norm_close(out, norm.forward_torch(heads))


def test_silu_and_mul_is_bit_equal_over_every_bfloat16_gate():
    gates = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    ups = torch.randn(gates.numel(), generator=torch.Generator().manual_seed(0)).bfloat16()
    x = torch.cat([gates, ups]).view(1, -1)
    act = SiluAndMul()
    with torch.inference_mode():
        got, want = act(x), act.forward_torch(x)
    both_nan = got.isnan() & want.isnan()
    assert torch.equal(got.view(torch.int16)[~both_nan], want.view(torch.int16)[~both_nan])
    batch = torch.randn(37, 2 * 320, generator=torch.Generator().manual_seed(1)).bfloat16() * 8
    with torch.inference_mode():
        assert _bits_equal(act(batch), act.forward_torch(batch))


@pytest.mark.parametrize("head_dim,partial,settings", [
    (64, 1.0, RopeSettings(rope_theta=10000.0)),
    (128, 1.0, RopeSettings(rope_theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (32, 0.5, RopeSettings(rope_theta=10000.0, partial_rotary_factor=0.5)),
])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_rope_rotates_q_and_k_in_place_bit_equal(head_dim, partial, settings, tokens):
    rope = RotaryEmbedding(head_dim, settings)
    assert rope.fusable and rope.rotary_dim == int(head_dim * partial)
    gen = torch.Generator().manual_seed(tokens)
    qkv = (torch.randn(tokens, 12 * head_dim, generator=gen) * 2).bfloat16()  # 8 q heads, 2 k, 2 v
    positions = torch.randint(0, 9000, (tokens,), generator=gen)
    q, k, v = qkv[:, :8 * head_dim], qkv[:, 8 * head_dim:10 * head_dim], qkv[:, 10 * head_dim:]
    want_q, want_k = rope.forward_torch(positions, q.clone(), k.clone())
    v_before = v.clone()
    with torch.inference_mode():
        got_q, got_k = rope(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place, in the qkv tensor
    assert _bits_equal(got_q, want_q) and _bits_equal(got_k, want_k)
    assert _bits_equal(v, v_before)


def test_float32_and_the_switch_keep_the_torch_references(monkeypatch):
    x32, w32 = torch.randn(2, 64), torch.randn(64)
    assert not cpu_fused.can_rms_norm(x32, w32, None)
    assert not cpu_fused.can_silu_and_mul(x32)
    assert not cpu_fused.can_apply_rotary(torch.arange(2), x32, x32, torch.ones(8), 16, 16)
    monkeypatch.setattr(cpu_fused, "_kernels", None)
    monkeypatch.setenv(cpu_fused.ENV_FUSED, "0")
    x = torch.randn(2, 64).bfloat16()
    assert not cpu_fused.can_rms_norm(x, x[0].clone(), None) and not cpu_fused.can_silu_and_mul(x)
    assert not cpu_fused.can_apply_bitmask(x, torch.zeros(2, 2, dtype=torch.int32))  # xgrammar's kernel then


def test_results_do_not_depend_on_the_thread_count():
    norm, act = RMSNorm(256, 1e-5).bfloat16(), SiluAndMul()
    rope = RotaryEmbedding(32, RopeSettings(rope_theta=10000.0))
    gen = torch.Generator().manual_seed(1)
    x, r = torch.randn(300, 256, generator=gen).bfloat16(), torch.randn(300, 256, generator=gen).bfloat16()
    gate_up, positions = torch.randn(300, 512, generator=gen).bfloat16(), torch.arange(300)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, previous)):
            torch.set_num_threads(threads)
            qk = torch.randn(300, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
            with torch.inference_mode():
                rope(positions, qk[:, :64], qk[:, 64:])
                results.append((norm(x, r)[0], act(gate_up), qk))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert _bits_equal(a, b)


def test_the_layers_hand_bf16_cpu_tensors_to_the_kernels_and_float32_to_the_references(monkeypatch):
    """The tests above would pass if a layer never called its kernel (the kernels equal the references): here the
    layers' dispatch itself is watched."""
    calls = []
    for name in ("rms_norm", "silu_and_mul", "apply_rotary_"):
        original = getattr(cpu_fused, name)
        monkeypatch.setattr(cpu_fused, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    norm, act = RMSNorm(64, 1e-5), SiluAndMul()
    rope = RotaryEmbedding(16, RopeSettings(rope_theta=10000.0))
    positions = torch.arange(3)
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            norm.to(dtype)
            x = torch.randn(3, 64).to(dtype)
            norm(x), norm(x, x.clone()), act(x)
            rope(positions, x[:, :32], x[:, 32:48])
            if dtype is torch.float32:
                assert calls == []
    assert calls == ["rms_norm", "rms_norm", "silu_and_mul", "apply_rotary_"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows,vocab_size", [(1, 320), (5, 333), (64, 49152), (40, 4003)])
def test_bitmask_matches_xgrammars_kernel_on_any_rows_and_vocabulary(dtype, num_rows, vocab_size):
    """Structured outputs' mask (any float dtype: it only keeps or replaces values): words all ones, all zeros and
    mixed; a subset of rows; a vocabulary that ends inside a word; logits past the vocabulary -inf."""
    import xgrammar as xgr
    gen = torch.Generator().manual_seed(num_rows)
    words = (vocab_size + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (num_rows + 3, words), dtype=torch.int32, generator=gen)
    bitmask[:, ::5] = -1
    bitmask[:, 2::7] = 0
    rows = list(range(0, num_rows + 3, 2))
    logits = torch.randn(num_rows + 3, vocab_size + 40, generator=gen).to(dtype)
    got, want = logits.clone(), logits.clone()
    assert cpu_fused.can_apply_bitmask(got, bitmask)
    cpu_fused.apply_bitmask_(got, bitmask, rows, vocab_size)
    xgr.apply_token_bitmask_inplace(want, bitmask, vocab_size=vocab_size, indices=rows)
    want[rows, vocab_size:] = float("-inf")  # the ids past the grammar's
    assert torch.equal(got, want)
    assert torch.isinf(got).any()
    others = [r for r in range(num_rows + 3) if r not in rows]
    assert torch.equal(got[others], logits[others])  # rows not listed are untouched
    with pytest.raises(ValueError, match="outside"):
        cpu_fused.apply_bitmask_(got, bitmask, [num_rows + 3], vocab_size)


def test_structured_outputs_apply_the_bitmask_with_the_cpu_kernel(monkeypatch):
    from sluice.structured_output.apply import apply_grammar_bitmask
    calls = []
    kernel = cpu_fused.apply_bitmask_
    monkeypatch.setattr(cpu_fused, "apply_bitmask_", lambda *args: (calls.append(args[2]), kernel(*args)))

    class OnlyEven:  # a grammar that allows the even token ids
        def fill_bitmask(self, bitmask, row):
            bitmask[row] = 0x55555555

        def rollback(self, num_tokens):
            assert num_tokens == 0

    from sluice.structured_output.manager import GrammarBitmask
    step = GrammarBitmask({"a": OnlyEven(), "c": OnlyEven()}, 64)
    logits = torch.zeros(3, 70)
    apply_grammar_bitmask(logits, ["a", "b", "c"], step)
    assert calls == [[0, 2]]
    for row in (0, 2):
        assert torch.isinf(logits[row, 1:64:2]).all() and not torch.isinf(logits[row, 0:64:2]).any()
        assert torch.isinf(logits[row, 64:]).all()  # past the grammars' ids
    assert not torch.isinf(logits[1]).any()
    # Without the kernel (no compiler, SLUICE_CPU_FUSED=0) xgrammar's CPU kernel gives the same logits.
    monkeypatch.setattr(cpu_fused, "can_apply_bitmask", lambda logits, bitmask: False)
    fallback = torch.zeros(3, 70)
    apply_grammar_bitmask(fallback, ["a", "b", "c"], step)
    assert calls == [[0, 2]] and torch.equal(fallback, logits)

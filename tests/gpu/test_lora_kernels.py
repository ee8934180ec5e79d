"""The Triton LoRA kernels (sluice/lora/triton_ops.py) add what the torch path (``layers.apply_lora``, the
CPU path) adds: every sub-projection of a fused layer in one shrink and one expand launch, rows grouped by
slot (steps of more than PER_ROW_MAX_TOKENS rows) or per row (smaller ones), rows without an adapter and
untargeted sub-projections untouched, ranks zero-padded to r_max.

Runs on CUDA; skipped without it. Without a GPU the float32 cases run under the Triton interpreter:

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_lora_kernels.py
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sluice.lora.layers import LoRABatch, LoRALinearMethod, LoRASlotWeights, apply_lora, apply_lora_kernels

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or TRITON_INTERPRET=1 for the interpreter)")]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
triton_ops = pytest.importorskip("sluice.lora.triton_ops")

BF16 = pytest.param(torch.bfloat16, id="bf16", marks=needs_cuda)
FP16 = pytest.param(torch.float16, id="fp16", marks=needs_cuda)
FP32 = pytest.param(torch.float32, id="fp32")
# (input size, sub-projection sizes): fused qkv with GQA, fused gate_up, o/down; odd widths (masked tiles).
# "wide": an input long enough that the shrink splits it (partial sums added atomically; see _split_k).
LAYERS = {"qkv": (64, [64, 16, 16]), "gate_up": (48, [80, 80]), "down": (96, [40]), "odd": (37, [29, 11, 5]),
          "wide": (2000, [40])}
LARGE_LAYERS = {"l8_qkv": (4096, [4096, 1024, 1024]), "l8_down": (14336, [4096])}


def _problem(layer: str, max_rank: int, ranks: list[int], num_tokens: int, dtype: torch.dtype, seed: int,
             untargeted: tuple[int, int] | None = None):
    """Adapters of the given ranks in slots 0.., every sub-projection targeted except ``untargeted``
    (slot, sub); each token row a random slot or -1 (no adapter)."""
    in_size, sizes = (LAYERS | LARGE_LAYERS)[layer]
    gen = torch.Generator().manual_seed(seed)
    weights = LoRASlotWeights(in_size, sizes, max_loras=len(ranks), max_rank=max_rank, dtype=dtype,
                              device=torch.device(DEVICE))
    for slot, rank in enumerate(ranks):
        for sub, size in enumerate(sizes):
            if (slot, sub) == untargeted:
                continue
            a = torch.randn(rank, in_size, generator=gen) * in_size ** -0.5
            b = torch.randn(size, rank, generator=gen) * rank ** -0.5
            weights.set_slot(slot, sub, a.to(dtype), b.to(dtype))
    x = torch.randn(num_tokens, in_size, generator=gen).to(dtype).to(DEVICE)
    out = torch.randn(num_tokens, sum(sizes), generator=gen).to(dtype).to(DEVICE)
    token_slots = torch.randint(-1, len(ranks), (num_tokens,), generator=gen).numpy().astype(np.int32)
    return weights, x, out, token_slots


def _reference(x, out, weights, token_slots, ranks):
    segments = [(slot, torch.from_numpy(np.flatnonzero(token_slots == slot)).to(x.device))
                for slot in range(len(ranks)) if (token_slots == slot).any()]
    return apply_lora(x.float().cpu(), out.float().cpu().clone(), _to_cpu_float(weights),
                      LoRABatch(segments=[(s, r.cpu()) for s, r in segments], slot_ranks=ranks))


def _to_cpu_float(weights: LoRASlotWeights) -> LoRASlotWeights:
    copy = LoRASlotWeights(weights.lora_a[0].shape[-1], weights.output_sizes, weights.a_stacked.shape[1],
                           weights.a_stacked.shape[2], torch.float32, torch.device("cpu"))
    copy.a_stacked.copy_(weights.a_stacked.float().cpu())
    copy.b_stacked.copy_(weights.b_stacked.float().cpu())
    copy.active = [list(row) for row in weights.active]
    return copy


def _kernels(x, out, weights, token_slots, max_num_tokens: int | None = None):
    max_num_tokens = max_num_tokens or len(x)
    step = triton_ops.LoRAStepIndex.allocate(max_num_tokens, weights.a_stacked.shape[1], torch.device(DEVICE))
    step.fill(token_slots)
    shrunk = torch.full((len(weights.output_sizes), max_num_tokens, weights.a_stacked.shape[2]), float("nan"),
                        dtype=torch.float32, device=DEVICE)
    result = out.clone()
    apply_lora_kernels(x, result, weights, LoRABatch(step_index=step, shrunk=shrunk, active=True))
    return result


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[actual.dtype]
    scale = max(expected.abs().max().item(), 1.0)
    error = (actual.float().cpu() - expected).abs().max().item()
    assert error <= tol * scale, f"max error {error:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("max_rank", [4, 8, 16, 64])
@pytest.mark.parametrize("num_tokens", [1, 5, 16, 17, 40])  # per-row up to 16 rows, grouped above
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_kernels_match_the_torch_path(layer, num_tokens, max_rank, dtype):
    ranks = [max_rank, max(1, max_rank // 2), max_rank]  # a smaller adapter zero-padded in slot 1
    weights, x, out, token_slots = _problem(layer, max_rank, ranks, num_tokens, dtype, seed=num_tokens + max_rank)
    _assert_close(_kernels(x, out, weights, token_slots), _reference(x, out, weights, token_slots, ranks))


@pytest.mark.parametrize("num_tokens", [3, 33])
def test_rows_without_adapter_and_untargeted_sub_projections_are_untouched(num_tokens):
    ranks = [8, 8]
    weights, x, out, _ = _problem("qkv", 8, ranks, num_tokens, torch.float32, seed=1, untargeted=(1, 2))
    token_slots = np.array([-1, 1, 0] * (num_tokens // 3 + 1), dtype=np.int32)[:num_tokens]
    result = _kernels(x, out, weights, token_slots)
    base_rows = token_slots == -1
    assert torch.equal(result[torch.from_numpy(base_rows)], out[torch.from_numpy(base_rows)])
    slot1_rows = torch.from_numpy(token_slots == 1)
    assert torch.equal(result[slot1_rows][:, 80:], out[slot1_rows][:, 80:])  # slot 1 has no v adapter
    assert not torch.equal(result[slot1_rows][:, :80], out[slot1_rows][:, :80])
    _assert_close(result, _reference(x, out, weights, token_slots, ranks))


@pytest.mark.parametrize("num_tokens", [4, 24])
def test_one_adapter_or_none_over_the_whole_step(num_tokens):
    weights, x, out, _ = _problem("gate_up", 16, [16, 16], num_tokens, torch.float32, seed=2)
    for slot in (-1, 1):
        token_slots = np.full(num_tokens, slot, dtype=np.int32)
        result = _kernels(x, out, weights, token_slots)
        if slot == -1:
            assert torch.equal(result, out)
        _assert_close(result, _reference(x, out, weights, token_slots, [16, 16]))


def test_wide_inputs_are_split_for_small_steps_and_large_ones_alike():
    """The "wide" cases above do run split: per row (5 rows) and grouped (17, 40 rows)."""
    device = torch.device(DEVICE)
    for num_tokens, block_k in ((5, 256), (17, 64), (40, 64)):
        per_row = num_tokens <= triton_ops.PER_ROW_MAX_TOKENS
        working = num_tokens if per_row else -(-num_tokens // 16) + 3
        split_k, k_per_split = triton_ops._split_k(2000, block_k, working, device)
        assert split_k > 1 and k_per_split % block_k == 0 and (split_k - 1) * k_per_split < 2000 <= split_k * k_per_split


def test_padded_rows_past_the_step_are_left_alone():
    """A graph bucket bigger than the step: rows past the filled ones read slot -1 and keep their output."""
    weights, x, out, token_slots = _problem("down", 8, [8, 8], 24, torch.float32, seed=3)
    real = token_slots[:10].copy()
    real[real < 0] = 0
    result = _kernels(x, out, weights, real, max_num_tokens=32)
    assert torch.equal(result[10:], out[10:])
    _assert_close(result[:10], _reference(x[:10], out[:10], weights, real, [8, 8]))


@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 8, 64, 256, 1024])
@pytest.mark.parametrize("layer", sorted(LARGE_LAYERS))
def test_kernels_match_the_torch_path_at_l8_shapes(layer, num_tokens):
    ranks = [16] * 8
    weights, x, out, token_slots = _problem(layer, 16, ranks, num_tokens, torch.bfloat16, seed=num_tokens)
    _assert_close(_kernels(x, out, weights, token_slots), _reference(x, out, weights, token_slots, ranks))


def test_step_index_is_refilled_in_place():
    """CUDA graphs read the index's buffers: a new step (other slots, fewer rows) rewrites the same memory."""
    step = triton_ops.LoRAStepIndex.allocate(8, 4, torch.device(DEVICE))
    pointers = [t.data_ptr() for t in (step.index, step.token_slots, step.sorted_rows, step.slot_start,
                                       step.slot_num_rows)]
    step.fill(np.array([2, -1, 0, 2, 2], dtype=np.int32))
    assert step.token_slots.tolist() == [2, -1, 0, 2, 2, -1, -1, -1]
    assert step.sorted_rows[:4].tolist() == [2, 0, 3, 4]
    assert step.slot_start.tolist() == [0, 1, 1, 4] and step.slot_num_rows.tolist() == [1, 0, 3, 0]
    step.fill(np.array([3, 1], dtype=np.int32))
    assert step.token_slots.tolist() == [3, 1, -1, -1, -1, -1, -1, -1]
    assert step.sorted_rows[:2].tolist() == [1, 0]
    assert step.slot_num_rows.tolist() == [0, 1, 0, 1]
    assert pointers == [t.data_ptr() for t in (step.index, step.token_slots, step.sorted_rows, step.slot_start,
                                               step.slot_num_rows)]


def test_lora_linear_method_runs_the_kernels_when_the_batch_has_an_index():
    from sluice.layers.linear import MergedColumnParallelLinear

    torch.manual_seed(0)
    layer = MergedColumnParallelLinear(48, [80, 80]).to(DEVICE)
    layer.weight.data.normal_()
    weights, x, _, token_slots = _problem("gate_up", 8, [8, 8], 20, torch.float32, seed=4)
    step = triton_ops.LoRAStepIndex.allocate(32, 2, torch.device(DEVICE))
    batch = LoRABatch(slot_ranks=[8, 8], step_index=step,
                      shrunk=torch.zeros(2, 32, 8, dtype=torch.float32, device=DEVICE))
    layer.linear_method = LoRALinearMethod(layer.linear_method, weights, batch)
    base = x @ layer.weight.t()
    assert torch.equal(layer(x), base)  # inactive: the base output, no launch
    step.fill(token_slots)
    batch.active = True
    _assert_close(layer(x), _reference(x, base, weights, token_slots, [8, 8]))


def test_engine_with_the_kernels_matches_peft_generate(tmp_path, monkeypatch):
    """The whole path: LoRAManager fills the index, every wrapped layer runs the kernels (on CUDA inside the
    CUDA graphs; on the CPU interpreted, forced on); a batch mixing two adapters and the base model gives each
    row PEFT's own greedy tokens. The prompt step (> 16 rows) groups rows by slot, the decode steps (9 rows)
    go per row."""
    import functools

    from sluice import LLM, LoRARequest, SamplingParams
    from sluice.lora.manager import LoRAManager
    from tests.lora.peft_adapters import save_peft_adapter
    from tests.tiny_models import hf_greedy, save_tiny_model

    if DEVICE == "cpu":
        monkeypatch.setattr(LoRAManager, "__init__", functools.partialmethod(LoRAManager.__init__, use_kernels=True))
    base = save_tiny_model(tmp_path / "base", "llama")
    prompts = [[5, 17, 300, 42], [7] * 19 + [8, 9], [100, 200]]
    all_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    expected = {
        "all_r8": save_peft_adapter(base, tmp_path / "all_r8", 8, all_targets, seed=1, prompts=prompts,
                                    max_new_tokens=6),
        "attn_r4": save_peft_adapter(base, tmp_path / "attn_r4", 4, ["q_proj", "v_proj"], seed=2, prompts=prompts,
                                     max_new_tokens=6),
        None: hf_greedy(base, prompts, 6)}
    assert expected["all_r8"] != expected[None] and expected["attn_r4"] != expected[None]  # adapters matter
    requests = {"all_r8": LoRARequest("all_r8", 1, str(tmp_path / "all_r8")),
                "attn_r4": LoRARequest("attn_r4", 2, str(tmp_path / "attn_r4")), None: None}
    llm = LLM(model=str(base), dtype="float32", device=DEVICE, max_model_len=64, enable_lora=True, max_loras=2,
              max_lora_rank=8)
    runner = llm.llm_engine.core.runner
    assert runner.lora_manager.batch.step_index is not None
    assert DEVICE == "cpu" or runner.decode_graphs is not None  # CUDA: the graphs hold the LoRA kernels
    names = [name for name in expected for _ in prompts]
    outputs = llm.generate([{"prompt_token_ids": p} for _ in expected for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False,
                           lora_request=[requests[name] for name in names])
    got = [o.outputs[0].token_ids for o in outputs]
    assert got == [expected[name][i % len(prompts)] for i, name in enumerate(names)]
    assert DEVICE == "cpu" or runner.decode_graphs.num_replays > 0


@needs_cuda
def test_a_captured_graph_follows_the_index_and_the_slots():
    """A CUDA graph captured over an empty index applies whatever the index and the slots hold at replay:
    new rows, other slots, an adapter replaced in its slot."""
    weights, x, out, token_slots = _problem("qkv", 16, [16, 8, 16], 40, torch.bfloat16, seed=5)
    step = triton_ops.LoRAStepIndex.allocate(64, 3, torch.device(DEVICE))
    batch = LoRABatch(step_index=step, shrunk=torch.zeros(3, 64, 16, dtype=torch.float32, device=DEVICE),
                      active=True)
    result = torch.empty_like(out)

    def forward() -> None:
        result.copy_(out)
        apply_lora_kernels(x, result, weights, batch)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    for seed, slots in ((6, token_slots), (7, token_slots[::-1].copy())):
        step.fill(slots)
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(result, _reference(x, out, weights, slots, [16, 8, 16]))
        gen = torch.Generator().manual_seed(seed)  # a new adapter in slot 1, as LoRAManager loads one
        for sub, size in enumerate(weights.output_sizes):
            weights.set_slot(1, sub, (torch.randn(8, 64, generator=gen) / 8).to(torch.bfloat16),
                             (torch.randn(size, 8, generator=gen) / 3).to(torch.bfloat16))

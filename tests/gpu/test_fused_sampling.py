"""The fused sampling kernel: greedy rows take the argmax, random rows follow softmax(logits / T),
seeded rows repeat by (seed, output position), and the Sampler uses it only for eligible batches.

Runs on CUDA; skipped without it. For development without a GPU, run it under the Triton
interpreter on CPU tensors (small shapes and sample counts there, it runs one program at a time):

    TRITON_INTERPRET=1 python -m pytest -q tests/gpu/test_fused_sampling.py
"""
from __future__ import annotations

import os

import pytest
import torch

from sluice.sample.metadata import RequestSamplingState, SamplingMetadata
from sluice.sample.sampler import Sampler
from sluice.sampling_params import SamplingParams

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or TRITON_INTERPRET=1 for the interpreter)")]
fused_sampling = pytest.importorskip("sluice.sample.fused_sampling")

GREEDY = SamplingParams(temperature=0.0)
SMALL_BLOCK = 64  # 16 lanes per quarter: several loop iterations even for a small vocabulary
# Chi-square 0.999 quantile with 5 degrees of freedom (6 tokens): a fixed-seed test that fails only
# on a wrong law, not by chance.
CHI2_999_DF5 = 20.52


def state(params: SamplingParams, output: tuple[int, ...] = ()) -> RequestSamplingState:
    return RequestSamplingState.create(params, [1, 2, 3], list(output), device=DEVICE)


def fused(logits: torch.Tensor, states: list[RequestSamplingState], step_seed: int = 1 << 62,
          block_v: int = SMALL_BLOCK) -> torch.Tensor:
    metadata = SamplingMetadata.build(states, logits.shape[-1], DEVICE)
    return fused_sampling.sample(logits.to(DEVICE), metadata, step_seed, block_v=block_v).cpu()


def lowest_argmax(logits: torch.Tensor) -> list[int]:
    logits = logits.float()
    return [int((row == row.max()).nonzero()[0]) for row in logits]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_take_the_argmax_with_the_lowest_token_id_on_ties(dtype):
    vocab_size = 1001  # quarters of 251, 251, 251, 248 tokens; not a multiple of any block
    logits = torch.randn(6, vocab_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[0, [5, 5 + 16]] = 9.0  # same lane, consecutive iterations
    logits[1, [600, 251]] = 9.0  # different quarters
    logits[2, [999, 1000]] = 9.0  # the last quarter's tail
    logits[3] = float("-inf")  # nothing allowed: token 0, as torch.argmax gives
    logits[4] = 0.5  # all tied
    expected = lowest_argmax(logits)
    assert expected[:5] == [5, 251, 999, 0, 0]
    assert fused(logits, [state(GREEDY)] * 6).tolist() == expected
    assert fused(logits, [state(GREEDY)] * 6, block_v=4096).tolist() == expected


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_random_rows_follow_softmax_of_logits_over_temperature(temperature):
    num_rows = 1200 if INTERPRET else 50_000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(num_rows, 1)
    tokens = fused(logits, [state(SamplingParams(temperature=temperature))] * num_rows, step_seed=(1 << 62) + 7)
    counts = torch.bincount(tokens, minlength=6).double()
    expected = (logits[0].double() / temperature).softmax(-1) * num_rows
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < CHI2_999_DF5


def test_bf16_and_float32_logits_sample_the_same_token_for_the_same_noise():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    states = [state(SamplingParams(temperature=0.8))] * 4
    assert torch.equal(fused(logits, states), fused(logits.float(), states))


def test_unseeded_rows_draw_fresh_noise_per_row_and_per_step_seed():
    flat = torch.zeros(8, 1000)  # the token is the noise's argmax alone
    states = [state(SamplingParams())] * 8
    first = fused(flat, states, step_seed=(1 << 62) + 1)
    assert len(set(first.tolist())) > 4
    assert not torch.equal(first, fused(flat, states, step_seed=(1 << 62) + 2))
    assert torch.equal(first, fused(flat, states, step_seed=(1 << 62) + 1))


def test_seeded_row_repeats_whatever_its_neighbours_row_and_step_seed():
    flat = torch.zeros(5, 1000)
    alone = fused(flat[:1], [state(SamplingParams(seed=42), output=(7, 7, 7))], step_seed=(1 << 62) + 1)
    neighbours = [state(GREEDY), state(SamplingParams(temperature=0.5)), state(SamplingParams(seed=43)),
                  state(SamplingParams(seed=42), output=(7, 7, 7)), state(SamplingParams())]
    in_batch = fused(flat, neighbours, step_seed=(1 << 62) + 2)
    assert int(in_batch[3]) == int(alone[0])
    larger_block = fused(flat[:1], [state(SamplingParams(seed=42), output=(7, 7, 7))], block_v=4096)
    assert int(larger_block[0]) == int(alone[0])  # the block size is not part of the stream


def test_seeded_row_draws_differently_at_each_output_position():
    flat = torch.zeros(1, 1000)
    tokens = [int(fused(flat, [state(SamplingParams(seed=42), output=(0,) * position)])[0])
              for position in range(8)]
    assert len(set(tokens)) > 4


def run_steps(sampler: Sampler, states: list[RequestSamplingState], steps: list[torch.Tensor],
              collect_late: bool = False) -> list[list[int]]:
    """Samples each step and appends the tokens; ``collect_late`` appends each step's tokens only
    after the next step sampled, as the pipelined runner does."""
    pending: list[int] | None = None
    for logits in steps:
        metadata = SamplingMetadata.build(states, logits.shape[-1], DEVICE)
        tokens = sampler.sample(logits.to(DEVICE), metadata).sampled_token_ids.tolist()
        if pending is not None:
            for s, token in zip(states, pending):
                s.output_token_ids.append(token)
        pending = tokens
        if not collect_late:
            for s, token in zip(states, pending):
                s.output_token_ids.append(token)
            pending = None
    for s, token in zip(states, pending or []):
        s.output_token_ids.append(token)
    return [s.output_token_ids for s in states]


def test_seeded_stream_survives_preemption_and_pipelined_steps():
    steps = [torch.randn(1, 200, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    params = SamplingParams(seed=9)
    sampler = Sampler(use_fused_kernel=True)
    [uninterrupted] = run_steps(sampler, [state(params)], steps)
    [resumed] = run_steps(sampler, [state(params, output=tuple(uninterrupted[:3]))], steps[3:])
    [pipelined] = run_steps(sampler, [state(params)], steps, collect_late=True)
    assert resumed == uninterrupted
    assert pipelined == uninterrupted


@pytest.fixture
def path_counts(monkeypatch) -> dict[str, int]:
    """How many batches took each path."""
    counts = {"fused": 0, "torch": 0}
    fused_sample, torch_sample = fused_sampling.sample, Sampler._sample

    def count_fused(*args, **kwargs):
        counts["fused"] += 1
        return fused_sample(*args, **kwargs)

    def count_torch(*args, **kwargs):
        counts["torch"] += 1
        return torch_sample(*args, **kwargs)

    monkeypatch.setattr(fused_sampling, "sample", count_fused)
    monkeypatch.setattr(Sampler, "_sample", count_torch)
    return counts


@pytest.mark.parametrize("truncation", [dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1)])
def test_sampler_keeps_the_torch_path_when_a_row_truncates(path_counts, truncation):
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    states = [state(GREEDY), state(SamplingParams(**truncation)), state(SamplingParams(seed=1))]
    Sampler(use_fused_kernel=True).sample(logits.to(DEVICE), SamplingMetadata.build(states, 64, DEVICE))
    assert path_counts == {"fused": 0, "torch": 1}


def test_sampler_default_uses_the_fused_kernel_on_cuda_only(path_counts):
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    states = [state(GREEDY), state(SamplingParams())]
    Sampler().sample(logits.to(DEVICE), SamplingMetadata.build(states, 64, DEVICE))
    on_cuda = DEVICE == "cuda"
    assert path_counts == {"fused": int(on_cuda), "torch": int(not on_cuda)}
    Sampler(use_fused_kernel=False).sample(logits.to(DEVICE), SamplingMetadata.build(states, 64, DEVICE))
    assert path_counts["torch"] == int(not on_cuda) + 1


def test_mixed_batch_through_the_fused_sampler(path_counts):
    vocab_size = 300
    logits = torch.randn(6, vocab_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    states = [state(GREEDY), state(SamplingParams(temperature=0.9, logprobs=2)), state(SamplingParams(seed=5)),
              state(SamplingParams(temperature=0.0, logprobs=1)), state(SamplingParams(logit_bias={17: 100.0})),
              state(SamplingParams(presence_penalty=1.5), output=(3, 3))]
    metadata = SamplingMetadata.build(states, vocab_size, DEVICE)
    out = Sampler(use_fused_kernel=True).sample(logits.to(DEVICE), metadata)
    tokens = out.sampled_token_ids.cpu().tolist()
    assert path_counts == {"fused": 1, "torch": 0}
    assert tokens[0] == lowest_argmax(logits[:1])[0] and tokens[3] == lowest_argmax(logits[3:4])[0]
    assert tokens[4] == 17  # the bias was applied before sampling
    assert all(0 <= t < vocab_size for t in tokens)
    # Logprobs still come from the raw logits, for the token actually sampled.
    raw = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs_rows == [1, 3]
    for i, row in enumerate(out.logprobs_rows):
        assert out.logprobs.token_ids[i][0] == tokens[row]
        assert out.logprobs.logprobs[i][0] == pytest.approx(float(raw[row, tokens[row]]), abs=1e-5)

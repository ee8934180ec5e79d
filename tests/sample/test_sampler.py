"""The sampler: greedy, temperature, top-k / top-p / min-p support, seeds, and the exponential race."""
import pytest
import torch

from sluice.sample.metadata import RequestSamplingState, SamplingMetadata
from sluice.sample.sampler import Sampler, apply_min_p, apply_top_k_top_p
from sluice.sampling_params import SamplingParams

from .conftest import VOCAB_SIZE, build, make_state

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sample(logits, states, device="cpu"):
    metadata = SamplingMetadata.build(states, logits.shape[-1], device)
    return Sampler().sample(logits.to(device), metadata)


def support(row: torch.Tensor) -> list[int]:
    return torch.isfinite(row).nonzero().flatten().tolist()


def reference_top_k(probs: list[float], k: int) -> set[int]:
    return set(sorted(range(len(probs)), key=lambda t: -probs[t])[:k])


def reference_top_p(probs: list[float], p: float) -> set[int]:
    kept, mass_before = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if mass_before < p:
            kept.add(token)
        mass_before += probs[token]
    return kept


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_take_the_argmax(device, rng):
    logits = torch.randn(5, VOCAB_SIZE, generator=rng)
    states = [make_state(SamplingParams(temperature=0.0)) for _ in range(5)]
    assert torch.equal(sample(logits, states, device).sampled_token_ids.cpu(), logits.argmax(-1))


def test_top_k_keeps_exactly_the_k_largest(rng):
    logits = torch.randn(4, VOCAB_SIZE, generator=rng)
    top_k = torch.tensor([1, 5, VOCAB_SIZE, 17])  # VOCAB_SIZE means off
    out = apply_top_k_top_p(logits, top_k, max_top_k=17, top_p=None)
    for row in range(4):
        assert set(support(out[row])) == reference_top_k(logits[row].tolist(), int(top_k[row]))
        assert torch.equal(out[row, support(out[row])], logits[row, support(out[row])])


def test_top_p_keeps_the_smallest_nucleus_reaching_p(rng):
    logits = torch.randn(4, VOCAB_SIZE, generator=rng) * 2
    top_p = torch.tensor([0.05, 0.5, 0.9, 1.0])
    out = apply_top_k_top_p(logits, None, 0, top_p)
    for row in range(4):
        probs = logits[row].softmax(-1).tolist()
        assert set(support(out[row])) == reference_top_p(probs, float(top_p[row]))
    assert len(support(out[0])) >= 1 and len(support(out[3])) == VOCAB_SIZE


def test_top_k_then_top_p_renormalizes_within_the_top_k(rng):
    logits = torch.randn(3, VOCAB_SIZE, generator=rng) * 2
    top_k, top_p = torch.tensor([8, VOCAB_SIZE, 3]), torch.tensor([0.6, 0.7, 1.0])
    out = apply_top_k_top_p(logits, top_k, 8, top_p)
    for row in range(3):
        kept_k = sorted(reference_top_k(logits[row].tolist(), int(top_k[row])))
        renormalized = logits[row, kept_k].softmax(-1).tolist()
        expected = {kept_k[i] for i in reference_top_p(renormalized, float(top_p[row]))}
        assert set(support(out[row])) == expected


def test_min_p_keeps_tokens_at_least_min_p_times_the_most_likely(rng):
    probs = torch.randn(3, VOCAB_SIZE, generator=rng).mul(2).softmax(-1)
    min_p = torch.tensor([0.0, 0.1, 0.5])
    out = apply_min_p(probs, min_p)
    for row in range(3):
        peak = probs[row].max().item()
        expected = {t for t, p in enumerate(probs[row].tolist()) if p >= float(min_p[row]) * peak}
        assert set(out[row].nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_tokens_stay_inside_the_truncated_support(device, rng):
    logits = torch.randn(1, VOCAB_SIZE, generator=rng).mul(2).repeat(4000, 1)
    params = SamplingParams(temperature=1.5, top_k=12, top_p=0.8, min_p=0.05)
    tokens = set(sample(logits, [make_state(params) for _ in range(4000)], device).sampled_token_ids.tolist())
    metadata = build([make_state(params)])
    truncated = apply_top_k_top_p(logits[:1] / 1.5, metadata.top_k, 12, metadata.top_p)
    expected = set(apply_min_p(truncated.softmax(-1), metadata.min_p)[0].nonzero().flatten().tolist())
    assert tokens == expected  # nothing outside, and with 4000 draws every kept token shows up


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_frequencies_follow_softmax_of_logits_over_temperature(device):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    tokens = sample(logits, [make_state(SamplingParams(temperature=0.7))] * 20000, device).sampled_token_ids
    frequencies = torch.bincount(tokens.cpu(), minlength=6).float() / 20000
    torch.testing.assert_close(frequencies, (logits[0] / 0.7).softmax(-1), atol=0.015, rtol=0)


def run_steps(states_per_step, logits_per_step, target_row, device="cpu"):
    """Samples several steps, appending each sampled token to its request; returns the target's tokens."""
    for logits in logits_per_step:
        tokens = sample(logits, states_per_step, device).sampled_token_ids.tolist()
        for state, token in zip(states_per_step, tokens):
            state.output_token_ids.append(token)
    return states_per_step[target_row].output_token_ids


def neighbour(i: int, device: str) -> RequestSamplingState:
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9),
             SamplingParams(seed=100 + i, top_k=7), SamplingParams(top_p=0.5, presence_penalty=0.5)]
    return make_state(kinds[i % 4], device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_gives_the_same_tokens_alone_or_among_32_others(device, rng):
    steps = [torch.randn(33, VOCAB_SIZE, generator=rng) for _ in range(8)]
    params = SamplingParams(temperature=1.0, seed=42, top_p=0.95)
    alone = run_steps([make_state(params, device=device)], [s[17:18] for s in steps], 0, device)
    batch = ([neighbour(i, device) for i in range(17)] + [make_state(params, device=device)]
             + [neighbour(i, device) for i in range(17, 32)])
    in_batch = run_steps(batch, steps, 17, device)
    assert alone == in_batch


def test_different_seeds_give_different_tokens():
    flat = [torch.zeros(1, VOCAB_SIZE)] * 10
    first = run_steps([make_state(SamplingParams(seed=1))], flat, 0)
    again = run_steps([make_state(SamplingParams(seed=1))], flat, 0)
    other = run_steps([make_state(SamplingParams(seed=2))], flat, 0)
    assert first == again
    assert first != other


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_rebuilt_after_preemption_continues_its_stream(device, rng):
    steps = [torch.randn(1, VOCAB_SIZE, generator=rng) for _ in range(6)]
    params = SamplingParams(seed=7)
    uninterrupted = run_steps([make_state(params, device=device)], steps, 0, device)
    # The runner rebuilds a resumed request's state from its output so far.
    resumed = make_state(params, output=uninterrupted[:3], device=device)
    assert run_steps([resumed], steps[3:], 0, device) == uninterrupted


def test_mixed_greedy_and_random_batch_keeps_greedy_rows_exact(rng):
    logits = torch.randn(6, VOCAB_SIZE, generator=rng)
    states = [make_state(SamplingParams(temperature=0.0 if i % 2 else 1.0)) for i in range(6)]
    metadata = build(states)
    assert not metadata.all_greedy and not metadata.all_random
    tokens = Sampler().sample(logits, metadata).sampled_token_ids
    assert tokens[1::2].tolist() == logits[1::2].argmax(-1).tolist()


def test_bf16_logits_sample_as_their_float32_copy(rng):
    """Greedy rows take the argmax in bf16; random rows, bias and logprobs compute in float32: every id and
    logprob equals what the same logits widened to float32 give."""
    logits = torch.randn(6, VOCAB_SIZE, generator=rng).bfloat16()
    logits[0, 7] = logits[0, 3] = logits[0].max() + 1  # a tie: the lowest id wins in both dtypes

    def states():
        return [make_state(SamplingParams(temperature=0.0)),
                make_state(SamplingParams(temperature=0.0, logprobs=3)),
                make_state(SamplingParams(temperature=0.0, logit_bias={5: 100.0})),
                make_state(SamplingParams(temperature=0.8, top_k=20, seed=1)),
                make_state(SamplingParams(temperature=1.2, seed=2, logprobs=2)),
                make_state(SamplingParams(temperature=0.0))]
    narrow, wide = sample(logits, states()), sample(logits.float(), states())
    assert torch.equal(narrow.sampled_token_ids, wide.sampled_token_ids)
    assert narrow.sampled_token_ids[0] == 3 and narrow.sampled_token_ids[2] == 5
    assert narrow.logprobs == wide.logprobs
    greedy_only = [make_state(SamplingParams(temperature=0.0)) for _ in range(6)]
    assert torch.equal(sample(logits, greedy_only).sampled_token_ids, logits.float().argmax(-1))

"""Bias, masks and penalties equal a plain Python reference on random logits and histories."""
import random

import pytest
import torch

from sluice.sample.sampler import Sampler
from sluice.sampling_params import SamplingParams

from sluice.sample.metadata import SamplingMetadata

from .conftest import VOCAB_SIZE, build, make_state

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_history(py_rng: random.Random, length: int) -> list[int]:
    # A small range of ids so that repeats (counts > 1) are common.
    return [py_rng.randrange(0, 20) for _ in range(length)]


def reference_penalties(logits: list[float], prompt: list[int], output: list[int],
                        presence: float, frequency: float, repetition: float) -> list[float]:
    out = list(logits)
    for token in set(prompt) | set(output):
        out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
    for token in set(output):
        out[token] -= frequency * output.count(token)
        out[token] -= presence
    return out


@pytest.mark.parametrize("presence, frequency, repetition", [
    (0.7, 0.0, 1.0), (0.0, -1.3, 1.0), (0.0, 0.0, 1.8), (0.0, 0.0, 0.6), (-0.5, 1.1, 1.4),
])
@pytest.mark.parametrize("device", DEVICES)
def test_penalties_match_reference(presence, frequency, repetition, device, rng):
    py_rng = random.Random(7)
    histories = [(random_history(py_rng, 9), random_history(py_rng, n)) for n in (0, 1, 5, 17)]
    states = [make_state(SamplingParams(presence_penalty=presence, frequency_penalty=frequency,
                                        repetition_penalty=repetition), prompt, output)
              for prompt, output in histories]
    # An unpenalized row in the middle must be left untouched.
    states.insert(2, make_state(SamplingParams(), *histories[3]))
    logits = torch.randn(len(states), VOCAB_SIZE, generator=rng)
    metadata = SamplingMetadata.build(states, VOCAB_SIZE, device)
    processed = Sampler.process_logits(logits.to(device), metadata).cpu()
    for row, state in enumerate(states):
        params = state.params
        expected = reference_penalties(logits[row].tolist(), state.prompt_token_ids, state.output_token_ids,
                                       params.presence_penalty, params.frequency_penalty,
                                       params.repetition_penalty)
        torch.testing.assert_close(processed[row], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_repetition_penalty_matches_transformers_processor(rng):
    from transformers import RepetitionPenaltyLogitsProcessor

    prompt, output = [3, 5, 5, 9], [9, 11, 2]
    logits = torch.randn(1, VOCAB_SIZE, generator=rng)
    processed = Sampler.process_logits(logits, build([make_state(SamplingParams(repetition_penalty=1.3),
                                                                  prompt, output)]))
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(processed, hf)


def test_processing_leaves_the_callers_logits_alone(rng):
    logits = torch.randn(1, VOCAB_SIZE, generator=rng)
    before = logits.clone()
    Sampler.process_logits(logits, build([make_state(SamplingParams(presence_penalty=1.0, logit_bias={1: 5}),
                                                     output=[1, 2])]))
    assert torch.equal(logits, before)


def test_logit_bias_adds_to_the_named_tokens_only(rng):
    biases = {0: 3.5, 17: -100.0, 63: 0.25}
    states = [make_state(SamplingParams(logit_bias=biases)), make_state(SamplingParams())]
    logits = torch.randn(2, VOCAB_SIZE, generator=rng)
    processed = Sampler.process_logits(logits, build(states))
    expected = logits[0].clone()
    for token, bias in biases.items():
        expected[token] += bias
    torch.testing.assert_close(processed[0], expected)
    assert torch.equal(processed[1], logits[1])


def test_allowed_token_ids_mask_everything_else(rng):
    states = [make_state(SamplingParams()), make_state(SamplingParams(allowed_token_ids=[4, 40, 2]))]
    logits = torch.randn(2, VOCAB_SIZE, generator=rng)
    processed = Sampler.process_logits(logits, build(states))
    finite = torch.isfinite(processed[1]).nonzero().flatten().tolist()
    assert finite == [2, 4, 40]
    assert torch.equal(processed[1, finite], logits[1, finite])
    assert torch.equal(processed[0], logits[0])


def test_min_tokens_masks_eos_and_stop_ids_until_reached(rng):
    params = SamplingParams(min_tokens=3, stop_token_ids=[9, 12])
    params.update_from_tokenizer(eos_token_id=5, extra_stop_ids=[30])
    below = make_state(params, output=[1, 1], eos_token_id=5)
    reached = make_state(params, output=[1, 1, 1], eos_token_id=5)
    ignoring_eos = make_state(SamplingParams(min_tokens=3, ignore_eos=True), output=[], eos_token_id=5)
    logits = torch.randn(3, VOCAB_SIZE, generator=rng)
    processed = Sampler.process_logits(logits, build([below, reached, ignoring_eos]))
    assert torch.isinf(processed[0]).nonzero().flatten().tolist() == [5, 9, 12, 30]
    assert torch.equal(processed[1], logits[1])
    assert torch.equal(processed[2], logits[2])  # with ignore_eos, eos is no stop token to mask


def test_bad_words_ban_single_tokens_always_and_last_tokens_after_their_prefix(rng):
    params = SamplingParams(bad_words=["x"])
    params._bad_words_token_ids = [[7], [20, 21, 22], [30, 31]]
    states = [make_state(params, output=[1, 20, 21]),  # prefix of [20, 21, 22] just generated
              make_state(params, output=[20, 21, 5]),  # prefix interrupted
              make_state(params, output=[30]),  # prefix of [30, 31]
              make_state(params, output=[])]
    logits = torch.randn(4, VOCAB_SIZE, generator=rng)
    processed = Sampler.process_logits(logits, build(states))
    banned = [torch.isinf(row).nonzero().flatten().tolist() for row in processed]
    assert banned == [[7, 22], [7], [7, 31], [7]]


def test_greedy_respects_processed_logits():
    logits = torch.zeros(1, VOCAB_SIZE)
    logits[0, 10] = 5.0
    logits[0, 11] = 4.0
    state = make_state(SamplingParams(temperature=0.0, logit_bias={10: -2.0}))
    assert Sampler().sample(logits, build([state])).sampled_token_ids.tolist() == [11]


def test_batches_without_features_build_no_tensors():
    metadata = build([make_state(SamplingParams(temperature=0.0)), make_state(SamplingParams(seed=1))])
    assert metadata.no_penalties and metadata.no_top_k and metadata.no_top_p and metadata.no_min_p
    assert metadata.logit_bias is None and metadata.allowed_token_mask is None
    assert metadata.banned_tokens is None and metadata.logprobs_rows == []


def test_penalty_counts_are_built_for_penalized_rows_only():
    states = [make_state(SamplingParams()), make_state(SamplingParams(frequency_penalty=1.0), output=[4, 4, 6])]
    penalties = build(states).penalties
    assert penalties.rows.tolist() == [1]
    assert penalties.output_counts.shape == (1, VOCAB_SIZE)
    assert penalties.output_counts[0, 4] == 2 and penalties.output_counts[0, 6] == 1
    assert penalties.prompt_mask is None  # only repetition_penalty needs the prompt


def test_tokens_still_in_flight_count_as_output():
    """Async scheduling: a row's last sample may still be on its way to the host. Penalties and
    min_tokens count it from its id on the device, as if it were in the output already."""
    from sluice.sample.metadata import PendingOutputs
    penalized = SamplingParams(frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.5)
    min_tokens = SamplingParams(min_tokens=3, stop_token_ids=[9])
    in_flight = [make_state(penalized, output=[4, 6]), make_state(SamplingParams()),
                 make_state(min_tokens, output=[1, 1]), make_state(penalized, output=[4])]
    landed = [make_state(penalized, output=[4, 6, 6]), make_state(SamplingParams()),
              make_state(min_tokens, output=[1, 1, 2]), make_state(penalized, output=[4])]
    pending = PendingOutputs(rows=[0, 2], token_ids=torch.tensor([6, 2]))  # row 3 has nothing in flight
    metadata = SamplingMetadata.build(in_flight, VOCAB_SIZE, "cpu", pending)
    expected = build(landed)
    assert torch.equal(metadata.penalties.output_counts, expected.penalties.output_counts)
    assert metadata.banned_tokens is None and expected.banned_tokens is None  # min_tokens reached
    assert build(in_flight).banned_tokens is not None  # without the token in flight it is not


@pytest.mark.parametrize("device", DEVICES)
def test_all_processing_together_matches_the_cpu_result(device, rng):
    params = SamplingParams(logit_bias={3: 2.0}, allowed_token_ids=list(range(0, 60, 2)), min_tokens=4,
                            stop_token_ids=[8], repetition_penalty=1.2, frequency_penalty=0.3)
    params._bad_words_token_ids = [[10], [5, 12]]
    states = [make_state(params, output=[5, 6, 5]), make_state(SamplingParams(presence_penalty=1.0), output=[2])]
    logits = torch.randn(2, VOCAB_SIZE, generator=rng)
    on_cpu = Sampler.process_logits(logits, build(states))
    on_device = Sampler.process_logits(logits.to(device), SamplingMetadata.build(states, VOCAB_SIZE, device))
    torch.testing.assert_close(on_device.cpu(), on_cpu)
    assert not torch.isfinite(on_cpu[0, [1, 8, 10, 12]]).any()  # disallowed, min_tokens stop, bad words

"""Logprobs of the model's raw distribution: sampled token first, its rank, then the top-k."""
import pytest
import torch

from sluice.core.interface import LogprobsLists
from sluice.sample.logprobs import compute_prompt_logprobs, to_logprob_dicts
from sluice.sample.sampler import Sampler
from sluice.sampling_params import SamplingParams

from .conftest import VOCAB_SIZE, build, make_state


def reference_rank(logprobs: torch.Tensor, token: int) -> int:
    return int((logprobs > logprobs[token]).sum()) + 1


def test_logprobs_are_log_softmax_of_raw_logits_with_ranks_and_top_k(rng):
    logits = torch.randn(4, VOCAB_SIZE, generator=rng) * 3
    states = [make_state(SamplingParams(logprobs=3, temperature=0.5, logit_bias={0: 50.0})),
              make_state(SamplingParams()),  # asks for nothing
              make_state(SamplingParams(logprobs=0, presence_penalty=2.0), output=[1, 2]),
              make_state(SamplingParams(logprobs=5, temperature=0.0))]
    out = Sampler().sample(logits, build(states))
    assert out.logprobs_rows == [0, 2, 3]
    sampled = out.sampled_token_ids.tolist()
    assert sampled[0] == 0  # the bias steered sampling, but logprobs stay those of the raw logits
    for i, row in enumerate(out.logprobs_rows):
        expected = torch.log_softmax(logits[row], -1)
        token_ids, logprobs = out.logprobs.token_ids[i], out.logprobs.logprobs[i]
        k = states[row].params.logprobs
        assert len(token_ids) == k + 1 and token_ids[0] == sampled[row]
        assert token_ids[1:] == expected.topk(k).indices.tolist()
        torch.testing.assert_close(torch.tensor(logprobs), expected[token_ids], atol=1e-5, rtol=0)
        assert out.logprobs.ranks[i] == reference_rank(expected, sampled[row])
    assert out.logprobs.ranks[2] == 1  # greedy takes the most likely token


def test_logprobs_split_per_request_in_batch_order(rng):
    states = [make_state(SamplingParams()), make_state(SamplingParams(logprobs=1))]
    out = Sampler().sample(torch.randn(2, VOCAB_SIZE, generator=rng), build(states))
    per_request = out.logprobs_by_request(["a", "b"])
    assert list(per_request) == ["b"]
    assert per_request["b"].token_ids[0][0] == out.sampled_token_ids[1].item()
    assert Sampler().sample(torch.randn(1, VOCAB_SIZE), build(states[:1])).logprobs is None


def test_prompt_logprobs_score_each_next_prompt_token(rng):
    logits = torch.randn(5, VOCAB_SIZE, generator=rng)
    targets = torch.tensor([3, 9, 9, 0, 63])
    lists = compute_prompt_logprobs(logits, targets, num_logprobs=2)
    expected = torch.log_softmax(logits, -1)
    for i in range(5):
        assert lists.token_ids[i][0] == targets[i].item()
        assert lists.token_ids[i][1:] == expected[i].topk(2).indices.tolist()
        assert lists.logprobs[i][0] == pytest.approx(expected[i, targets[i]].item(), abs=1e-5)
        assert lists.ranks[i] == reference_rank(expected[i], targets[i].item())


class _CharTokenizer:
    def decode(self, token_ids, **kwargs):
        return "".join(chr(ord("a") + t) for t in token_ids)


def test_logprob_dicts_carry_rank_and_decoded_token():
    lists = LogprobsLists(token_ids=[[4, 1, 4]], logprobs=[[-1.5, -0.5, -1.5]], ranks=[2])
    [position] = to_logprob_dicts(lists, _CharTokenizer())
    assert list(position) == [4, 1]
    assert position[4].logprob == -1.5 and position[4].rank == 2 and position[4].decoded_token == "e"
    assert position[1].rank == 1 and position[1].decoded_token == "b"
    [no_tokenizer] = to_logprob_dicts(lists, None)
    assert no_tokenizer[1].decoded_token is None

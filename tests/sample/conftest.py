"""Helpers shared by the sampling tests."""
import pytest
import torch

from sluice.sample.metadata import RequestSamplingState, SamplingMetadata
from sluice.sampling_params import SamplingParams

VOCAB_SIZE = 64


def make_state(params: SamplingParams, prompt=(1, 2, 3), output=(), eos_token_id=None,
               device="cpu") -> RequestSamplingState:
    return RequestSamplingState.create(params, list(prompt), list(output), eos_token_id=eos_token_id,
                                       device=device)


def build(states, vocab_size=VOCAB_SIZE) -> SamplingMetadata:
    return SamplingMetadata.build(states, vocab_size, "cpu")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)

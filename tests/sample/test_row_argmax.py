"""row_argmax (the chunked CPU argmax the sampler uses) equals torch.argmax, ties included."""
from __future__ import annotations

import pytest
import torch

from sluice.sample.argmax import row_argmax


@pytest.mark.parametrize("vocab", [32000, 151936, 1000, 37, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_argmax_equals_argmax(vocab, dtype):
    scores = torch.randn(9, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    assert torch.equal(row_argmax(scores), scores.argmax(dim=-1))


def test_ties_go_to_the_lowest_token_id():
    scores = torch.zeros(3, 32000)
    scores[0, [5, 31999]] = 1.0
    scores[1, [20000, 12800]] = 2.0
    assert row_argmax(scores).tolist() == [5, 12800, 0]

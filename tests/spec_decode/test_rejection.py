"""The verification rule: greedy keeps exactly the target's argmax run; sampling gives every output token the
target's distribution (chi-square over many seeded draws, with a threshold a biased rule fails)."""
import pytest
import torch

from sluice.spec_decode.rejection import PLACEHOLDER, rejection_sample

VOCAB = 5
P = torch.tensor([[0.10, 0.40, 0.20, 0.25, 0.05],   # p_1
                  [0.30, 0.05, 0.05, 0.30, 0.30],   # p_2
                  [0.20, 0.20, 0.20, 0.20, 0.20]])  # p_3 (after both proposals)
Q = torch.tensor([[0.50, 0.10, 0.10, 0.10, 0.20],
                  [0.05, 0.05, 0.60, 0.20, 0.10]])
CHI2_LIMIT = 25.0  # 4 degrees of freedom: p < 1e-4 under the right distribution


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=VOCAB).double()
    expected = probs.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


def one_hot_probs(tokens: list[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), 8).float()


def test_greedy_keeps_the_argmax_run_then_adds_the_targets_token():
    # argmax of the target at each position: 3, 5, 1, 6
    target = one_hot_probs([3, 5, 1, 6])[None].repeat(4, 1, 1)
    drafts = torch.tensor([[3, 5, 1], [3, 4, 1], [2, 5, 1], [3, 5, 0]])
    num_draft = torch.tensor([3, 3, 3, 2])
    out, n = rejection_sample(target, drafts, num_draft, greedy=torch.ones(4, dtype=torch.bool))
    assert n.tolist() == [4, 2, 1, 3]
    assert out.tolist() == [[3, 5, 1, 6], [3, 5, PLACEHOLDER, PLACEHOLDER], [3] + [PLACEHOLDER] * 3,
                            [3, 5, 1, PLACEHOLDER]]


def test_rows_without_proposals_sample_one_token():
    target = one_hot_probs([4, 2])[None].repeat(2, 1, 1)
    out, n = rejection_sample(target, torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, 1]),
                              greedy=torch.ones(2, dtype=torch.bool))
    assert n.tolist() == [1, 1] and out[:, 0].tolist() == [4, 4]


def _draw(num_rows: int, draft_probs: torch.Tensor | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    if draft_probs is None:  # prompt lookup: fixed proposals, q one-hot
        drafts = torch.tensor([[1, 3]]).repeat(num_rows, 1)
        q = None
    else:
        drafts = torch.stack([torch.multinomial(draft_probs[i], num_rows, replacement=True) for i in range(2)], 1)
        q = draft_probs[None].repeat(num_rows, 1, 1)
    return rejection_sample(P[None].repeat(num_rows, 1, 1), drafts, torch.full((num_rows,), 2),
                            torch.zeros(num_rows, dtype=torch.bool), q)


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_every_output_token_follows_the_target_distribution(draft):
    out, n = _draw(200_000, Q if draft == "model" else None, seed=1)
    assert chi_square(out[:, 0], P[0]) < CHI2_LIMIT
    second = out[n >= 2, 1]
    assert len(second) > 10_000 and chi_square(second, P[1]) < CHI2_LIMIT
    third = out[n == 3, 2]
    assert len(third) > 1_000 and chi_square(third, P[2]) < CHI2_LIMIT


def test_the_threshold_catches_a_biased_acceptance_rule():
    """Accepting every proposal (as a rule that ignored p/q would) gives the draft's distribution, not p's."""
    torch.manual_seed(2)
    drafts = torch.multinomial(Q[0], 200_000, replacement=True)
    assert chi_square(drafts, P[0]) > 10 * CHI2_LIMIT
    # Accepting with probability p instead of p / q (a rule off by the draft's probability) is caught too.
    u = torch.rand(200_000)
    kept = drafts[u < P[0][drafts]]
    assert chi_square(kept, P[0]) > CHI2_LIMIT


def test_seeded_rows_repeat_whatever_their_neighbours():
    def run(batch: int, seed_row: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1234)
        drafts = torch.tensor([[0, 2]]).repeat(batch, 1)
        out, _ = rejection_sample(P[None].repeat(batch, 1, 1), drafts, torch.full((batch,), 2),
                                  torch.zeros(batch, dtype=torch.bool), Q[None].repeat(batch, 1, 1),
                                  generators={seed_row: generator})
        return out[seed_row]

    torch.manual_seed(0)
    first = run(3, 0)
    torch.manual_seed(99)
    assert torch.equal(run(7, 4), first)

"""Verification of proposed tokens: which to keep, and the token that follows them.

A request proposed k tokens x_1..x_k (from a draft distribution q, or from prompt lookup, where q is one-hot
at each x_i). The target model ran them in one forward and gave k + 1 distributions p_1..p_{k+1} (p_i: at the
position of x_i; p_{k+1}: after x_k). Outputs are 1 .. k + 1 tokens:

  greedy  keep x_i while x_i == argmax p_i; then one more token, argmax p_j at the first mismatch j (or p_{k+1})
  random  keep x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection j, one token drawn from
          the residual max(0, p_j - q_j), normalized; when all are kept, one token drawn from p_{k+1}

The random rule gives every output token the target's distribution exactly (the standard speculative sampling
rule; Leviathan et al. 2023, Chen et al. 2023). Everything is batched on the device: one uniform draw per
proposed token and one exponential race per position (argmax(probs / E), E ~ Exp(1), samples from probs with no
cumulative sum), so no row is synced to the host. A seeded row draws its numbers from its own generator.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

PLACEHOLDER = -1  # output slots past a request's last kept token


def _exponential(shape: tuple[int, ...], device: torch.device, generators: Mapping[int, torch.Generator],
                 ) -> torch.Tensor:
    """Exp(1) noise [B, ...]; rows with a generator draw from it."""
    noise = torch.empty(shape, device=device).exponential_()
    for row, generator in generators.items():
        noise[row] = torch.empty(shape[1:], device=device).exponential_(generator=generator)
    return noise


def _uniform(shape: tuple[int, ...], device: torch.device, generators: Mapping[int, torch.Generator]) -> torch.Tensor:
    u = torch.rand(shape, device=device)
    for row, generator in generators.items():
        u[row] = torch.rand(shape[1:], device=device, generator=generator)
    return u


def rejection_sample(target_probs: torch.Tensor, draft_token_ids: torch.Tensor, num_draft: torch.Tensor,
                     greedy: torch.Tensor, draft_probs: torch.Tensor | None = None,
                     generators: Mapping[int, torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Verifies a batch of proposals; returns (output_token_ids [B, K + 1] with PLACEHOLDER past each row's
    last token, num_output [B] = kept proposals + 1).

    target_probs    [B, K + 1, V] float32: the target's distributions (already processed: temperature, top-k/p,
                    penalties, masks), p_i at row i < num_draft, p_{k+1} at index num_draft
    draft_token_ids [B, K] long: proposals, padded past num_draft (any value)
    num_draft       [B] long: each row's k (0 .. K)
    greedy          [B] bool: rows that decode greedily
    draft_probs     [B, K, V] float32 draft distributions; None for one-hot proposals (prompt lookup)
    """
    batch, width, vocab = target_probs.shape
    k_max = width - 1
    if k_max < 1:
        raise ValueError("rejection_sample needs room for at least one proposed token (target_probs[:, 2:, :])")
    device = target_probs.device
    generators = generators or {}
    positions = torch.arange(k_max, device=device)
    valid = positions[None, :] < num_draft[:, None]  # [B, K]
    drafts = draft_token_ids.clamp(0, vocab - 1)

    p_draft = target_probs[:, :k_max].gather(2, drafts[..., None]).squeeze(2)  # p_i(x_i)  [B, K]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(2, drafts[..., None]).squeeze(2)
    u = _uniform((batch, k_max), device, generators)
    accept_random = u * q_draft < p_draft  # u < p / q, without dividing by a zero q
    accept_greedy = target_probs[:, :k_max].argmax(dim=2) == drafts
    accept = torch.where(greedy[:, None], accept_greedy, accept_random) & valid
    # Kept: the leading run of accepted proposals.
    num_kept = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)  # [B]

    # The token after the kept ones, at position j = num_kept: from the residual where a proposal was rejected,
    # from p_{j} itself where none was left to reject (j == num_draft).
    rows = torch.arange(batch, device=device)
    p_next = target_probs[rows, num_kept]  # [B, V]
    rejected = num_kept < num_draft
    at = num_kept.clamp(max=k_max - 1)  # rows that rejected have num_kept < num_draft <= K
    if draft_probs is None:
        q_next = torch.zeros_like(p_next)
        q_next[rows, drafts[rows, at]] = 1.0
    else:
        q_next = draft_probs[rows, at]
    residual = (p_next - q_next).clamp_min(0.0)
    # A residual of all zeros (p == q wherever p > 0) cannot be rejected into; fall back to p for safety.
    residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p_next)
    dist = torch.where(rejected[:, None], residual, p_next)
    race = dist / _exponential((batch, vocab), device, generators)
    next_random = race.argmax(dim=1)
    next_greedy = p_next.argmax(dim=1)
    next_token = torch.where(greedy, next_greedy, next_random)

    out = torch.full((batch, width), PLACEHOLDER, dtype=torch.long, device=device)
    keep = positions[None, :] < num_kept[:, None]
    out[:, :k_max] = torch.where(keep, draft_token_ids, out[:, :k_max])
    out[rows, num_kept] = next_token
    return out, num_kept + 1

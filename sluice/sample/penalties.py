"""Logit processing before sampling: bias, allowed tokens, banned tokens, and penalties.

Each function takes float32 logits [N, V] and the piece of ``SamplingMetadata`` it
needs, and returns processed logits; the sampler calls them only when that piece is
not None, so a feature nobody uses costs nothing. All work is batched on tensors.

Penalty semantics (vLLM's, which follow OpenAI and Hugging Face):
  repetition (prompt + generated tokens, HF): logit / r where logit > 0, logit * r otherwise
  frequency  (generated tokens):             logit - f * count(token)
  presence   (generated tokens):             logit - p * [count(token) > 0]
applied in that order.
"""
from __future__ import annotations

import torch

from sluice.sample.metadata import PenaltyTensors


def apply_logit_bias(logits: torch.Tensor, bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    rows, token_ids, values = bias
    return logits.index_put((rows, token_ids), values, accumulate=True)


def apply_allowed_token_mask(logits: torch.Tensor, allowed: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    rows, disallowed = allowed
    masked_rows = logits[rows].masked_fill(disallowed, float("-inf"))
    return logits.index_copy(0, rows, masked_rows)


def apply_banned_tokens(logits: torch.Tensor, banned: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    rows, token_ids = banned
    return logits.index_put((rows, token_ids), torch.tensor(float("-inf"), device=logits.device))


def apply_penalties(logits: torch.Tensor, penalties: PenaltyTensors) -> torch.Tensor:
    """Repetition, then frequency, then presence penalties, on the penalized rows only."""
    rows = penalties.rows
    row_logits = logits[rows]
    counts = penalties.output_counts
    if penalties.prompt_mask is not None:
        repetition = penalties.repetition.unsqueeze(1)
        seen = penalties.prompt_mask | (counts > 0)
        penalized = torch.where(row_logits > 0, row_logits / repetition, row_logits * repetition)
        row_logits = torch.where(seen, penalized, row_logits)
    row_logits = row_logits - penalties.frequency.unsqueeze(1) * counts
    row_logits = row_logits - penalties.presence.unsqueeze(1) * (counts > 0).to(row_logits.dtype)
    return logits.index_copy(0, rows, row_logits)

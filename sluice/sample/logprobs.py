"""Logprobs of sampled and prompt tokens, and their conversion to the front end's Logprob dicts.

Logprobs are those of the model's own distribution (``log_softmax`` of the raw logits,
before bias, penalties or temperature), as vLLM returns by default. Each position
yields one row of ``LogprobsLists``: the chosen token first (sampled or prompt token)
with its rank in the full distribution (1 = most likely), then the top-k tokens.

    token_ids[i] = [chosen, top1, top2, ..., topk]
    logprobs[i]  = [lp(chosen), lp(top1), ...]
    ranks[i]     = 1 + #{tokens with a strictly larger logprob than chosen}
"""
from __future__ import annotations

from typing import Any

import torch

from sluice.core.interface import LogprobsLists
from sluice.outputs import Logprob


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: list[int]) -> LogprobsLists:
    """Builds LogprobsLists from log-probabilities [P, V], chosen tokens [P] and per-row top-k.

    Converting to Python lists is the one host sync here; callers only come here when
    some request asked for logprobs.
    """
    max_k = max(num_logprobs, default=0)
    chosen = token_ids.unsqueeze(1)
    chosen_logprobs = logprobs.gather(1, chosen)
    ranks = (logprobs > chosen_logprobs).sum(dim=1) + 1
    if max_k > 0:
        top = logprobs.topk(max_k, dim=1)
        all_ids = torch.cat([chosen, top.indices], dim=1)
        all_logprobs = torch.cat([chosen_logprobs, top.values], dim=1)
    else:
        all_ids, all_logprobs = chosen, chosen_logprobs
    id_rows, logprob_rows = all_ids.tolist(), all_logprobs.tolist()
    return LogprobsLists(
        token_ids=[row[:k + 1] for row, k in zip(id_rows, num_logprobs)],
        logprobs=[row[:k + 1] for row, k in zip(logprob_rows, num_logprobs)],
        ranks=ranks.tolist(),
    )


def compute_prompt_logprobs(logits: torch.Tensor, target_token_ids: torch.Tensor,
                            num_logprobs: int) -> LogprobsLists:
    """Logprobs of prompt tokens: ``logits[i]`` is the distribution that predicts ``target_token_ids[i]``.

    For a prompt chunk covering positions [s, e), the runner passes the logits of positions
    s .. e-1 and the prompt tokens at s+1 .. e (the last prompt position predicts no prompt
    token and is left out).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return gather_logprobs(logprobs, target_token_ids.long(), [num_logprobs] * logits.shape[0])


def to_logprob_dicts(lists: LogprobsLists, tokenizer: Any | None) -> list[dict[int, Logprob]]:
    """One dict per position, token id -> Logprob(logprob, rank, decoded_token), as vLLM returns.

    The chosen token comes first; if it is also among the top-k, the top-k entry (same
    logprob) overwrites it, with the same rank barring exact ties.
    """
    decoded = _TokenDecoder(tokenizer)
    dicts: list[dict[int, Logprob]] = []
    for token_ids, logprobs, chosen_rank in zip(lists.token_ids, lists.logprobs, lists.ranks):
        ranks = [chosen_rank] + list(range(1, len(token_ids)))
        dicts.append({t: Logprob(lp, rank, decoded(t)) for t, lp, rank in zip(token_ids, logprobs, ranks)})
    return dicts


class _TokenDecoder:
    """Decodes single tokens, memoised within one call (top-k lists repeat tokens a lot)."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str | None] = {}

    def __call__(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]

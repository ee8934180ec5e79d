"""Prompt lookup (n-gram) proposals: guess that a request's text goes on as it went on after the last earlier
occurrence of its latest n tokens.

For n from ``prompt_lookup_max`` down to ``prompt_lookup_min``: take the request's last n tokens, find their most
recent earlier occurrence in its tokens (prompt and output), and propose the (up to) ``num_speculative_tokens``
tokens that followed it. The longest n with a match wins; no match proposes nothing. Matching is one vectorized
comparison per n over the request's tokens (numpy sliding windows), no Python loop over positions, so it runs
on the host while the device runs the previous step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class NgramProposer:
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min and prompt_lookup_max must satisfy 1 <= min <= max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

    def propose(self, token_ids: Sequence[int] | np.ndarray, max_tokens: int | None = None) -> np.ndarray:
        """Up to ``min(num_speculative_tokens, max_tokens)`` proposed token ids (int64), possibly none."""
        limit = self.num_speculative_tokens if max_tokens is None else min(self.num_speculative_tokens, max_tokens)
        tokens = np.asarray(token_ids, dtype=np.int64)
        if limit <= 0 or len(tokens) < self.prompt_lookup_min + 1:
            return _EMPTY
        for n in range(min(self.prompt_lookup_max, len(tokens) - 1), self.prompt_lookup_min - 1, -1):
            # Windows that start at 0 .. len - n - 1: every earlier occurrence, not the suffix itself.
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n  # the most recent occurrence's continuation
                return tokens[start:start + limit].copy()
        return _EMPTY

    def propose_batch(self, requests: Sequence[Sequence[int] | np.ndarray],
                      max_tokens: Sequence[int] | None = None) -> list[np.ndarray]:
        """One proposal per request (``max_tokens``: each request's room left, e.g. before its max_tokens)."""
        limits = max_tokens if max_tokens is not None else [None] * len(requests)
        return [self.propose(tokens, limit) for tokens, limit in zip(requests, limits)]

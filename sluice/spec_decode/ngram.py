"""Prompt lookup (n-gram) proposals: guess that a request's text goes on as it went on after the last earlier
occurrence of its latest n tokens.

For n from ``prompt_lookup_max`` down to ``prompt_lookup_min``: take the request's last n tokens, find their most
recent earlier occurrence in its tokens (prompt and output), and propose the (up to) ``num_speculative_tokens``
tokens that followed it. The longest n with a match wins; no match proposes nothing. Matching is one vectorized
comparison over the request's tokens (its last token against all), then each longer n filters the few
candidates left: no Python loop over positions, and a request without a repeat costs a single pass.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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
        length = len(tokens)
        if limit <= 0 or length < self.prompt_lookup_min + 1:
            return _EMPTY
        # Earlier windows matching the last n tokens, by their end e (exclusive; e <= length - 1, so never the
        # suffix itself): n = 1 is one comparison over the tokens, and each longer n keeps those of n - 1
        # whose token before agrees too (a few candidates), so a request without a repeat costs one pass.
        ends = np.flatnonzero(tokens[:-1] == tokens[-1]) + 1
        found, n = None, 1
        while True:
            if n >= self.prompt_lookup_min and len(ends):
                found = ends
            if n == min(self.prompt_lookup_max, length - 1) or not len(ends):
                break
            ends = ends[ends > n]
            ends = ends[tokens[ends - n - 1] == tokens[length - n - 1]]
            n += 1
        if found is None:
            return _EMPTY
        start = int(found[-1])  # the most recent occurrence of the longest match: its continuation
        return tokens[start:start + limit].copy()

    def propose_batch(self, requests: Sequence[Sequence[int] | np.ndarray],
                      max_tokens: Sequence[int] | None = None) -> list[np.ndarray]:
        """One proposal per request (``max_tokens``: each request's room left, e.g. before its max_tokens)."""
        limits = max_tokens if max_tokens is not None else [None] * len(requests)
        return [self.propose(tokens, limit) for tokens, limit in zip(requests, limits)]

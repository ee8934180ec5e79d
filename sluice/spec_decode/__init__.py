"""Speculative decoding: proposers (what to guess) and the verification rule (what to keep)."""

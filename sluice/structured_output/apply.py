"""The logits hook of structured outputs: a step's grammar bitmask applied to its sampling rows in one op."""
from __future__ import annotations

import torch

from sluice.structured_output.manager import GrammarBitmask


def apply_grammar_bitmask(logits: torch.Tensor, sampling_req_ids: list[str], grammar: GrammarBitmask,
                          spec_token_ids: list[list[int]] | None = None) -> None:
    """Sets the logits of disallowed tokens to -inf, in place, on the rows of the constrained requests.

    ``logits`` row i belongs to ``sampling_req_ids[i]``, or with ``spec_token_ids`` (verification) request i
    has ``len(spec_token_ids[i]) + 1`` rows in order (GrammarBitmask.fill); logits wider than the bitmask (a
    padded LM head) are disallowed past it. One xgrammar kernel on the rows (its CUDA kernel, or its CPU one:
    about 50 ms for 256 rows of 49,152 logits where unpacking the bits for a torch masked fill takes 300 ms)."""
    filled = grammar.fill(sampling_req_ids, spec_token_ids, pin=logits.is_cuda)
    if filled is None:
        return
    import xgrammar as xgr
    rows, bitmask = filled  # one bitmask row per logits row, as the kernel takes them
    vocab_size = logits.shape[-1]
    num_bits = bitmask.shape[-1] * 32
    # On CUDA from pinned memory: a copy from pageable memory would wait for the queued forward.
    indices = torch.tensor(rows, dtype=torch.int32, pin_memory=logits.is_cuda).to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    vocab_size=min(vocab_size, num_bits), indices=indices)
    if vocab_size > num_bits:
        logits[indices.long(), num_bits:] = float("-inf")

"""The logits hook of structured outputs: a step's grammar bitmask applied to its sampling rows in one op."""
from __future__ import annotations

import torch

from sluice.structured_output.manager import GrammarBitmask

_BITS = torch.arange(32, dtype=torch.int32)


def apply_grammar_bitmask(logits: torch.Tensor, sampling_req_ids: list[str], grammar: GrammarBitmask) -> None:
    """Sets the logits of disallowed tokens to -inf, in place, on the rows of the constrained requests.

    ``logits`` row i belongs to ``sampling_req_ids[i]``; logits wider than the bitmask (a padded LM head)
    are disallowed past it. CUDA: xgrammar's kernel; CPU: the bits unpacked and one masked fill."""
    row_of = {req_id: i for i, req_id in enumerate(sampling_req_ids)}
    pairs = [(row_of[r], k) for k, r in enumerate(grammar.req_ids) if r in row_of]
    if not pairs:
        return
    rows = [row for row, _ in pairs]
    bitmask = grammar.bitmask
    if len(pairs) < len(grammar.req_ids):
        bitmask = bitmask[[k for _, k in pairs]]
    vocab_size = logits.shape[-1]
    num_bits = bitmask.shape[-1] * 32
    if logits.device.type == "cuda":
        import xgrammar as xgr
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=min(vocab_size, num_bits), indices=rows)
        if vocab_size > num_bits:
            logits[rows, num_bits:] = float("-inf")
        return
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).bool().view(len(rows), num_bits)
    if num_bits >= vocab_size:
        allowed = allowed[:, :vocab_size]
    else:
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - num_bits), value=False)
    index = torch.tensor(rows, dtype=torch.long)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))

"""The logits hook of structured outputs: a step's grammar bitmask applied to its sampling rows in one op."""
from __future__ import annotations

import torch

from sluice.layers import cpu_fused
from sluice.structured_output.manager import GrammarBitmask


def apply_grammar_bitmask(logits: torch.Tensor, sampling_req_ids: list[str], grammar: GrammarBitmask,
                          spec_token_ids: list[list[int]] | None = None) -> None:
    """Sets the logits of disallowed tokens to -inf, in place, on the rows of the constrained requests.

    ``logits`` row i belongs to ``sampling_req_ids[i]``, or with ``spec_token_ids`` (verification) request i
    has ``len(spec_token_ids[i]) + 1`` rows in order (GrammarBitmask.fill); logits past the grammars' ids (an
    LM head padded past the tokenizer) are disallowed. One kernel on the rows: xgrammar's on CUDA; on the CPU
    layers/cpu_fused.py's (1.2-1.4 ms for 256 rows of 49,152 float32 logits on 2 cores, where xgrammar's CPU
    kernel takes 34-67 ms), else xgrammar's."""
    filled = grammar.fill(sampling_req_ids, spec_token_ids, pin=logits.is_cuda)
    if filled is None:
        return
    rows, bitmask = filled  # one bitmask row per logits row, as the kernel takes them
    grammar_vocab_size = min(logits.shape[-1], grammar.vocab_size)
    if not logits.is_cuda and cpu_fused.can_apply_bitmask(logits, bitmask):
        cpu_fused.apply_bitmask_(logits, bitmask, rows, grammar_vocab_size)  # the ids past the grammar's too
        return
    import xgrammar as xgr
    # On CUDA from pinned memory: a copy from pageable memory would wait for the queued forward.
    indices = torch.tensor(rows, dtype=torch.int32, pin_memory=logits.is_cuda).to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    vocab_size=grammar_vocab_size, indices=indices)
    if logits.shape[-1] > grammar_vocab_size:
        logits[:, grammar_vocab_size:].index_fill_(0, indices.long(), float("-inf"))

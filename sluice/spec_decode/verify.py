"""The runner's verification of a step's proposals: logits at each proposal's position and after the last one
-> the kept proposals and one more token per request, on the device, no per-row host sync.

    request A proposed [x y z] (k = 3): logits rows  a0 a1 a2 a3   (a0: after A's last known token)
    request B proposed nothing   (k = 0): logits row  b0
    -> output [B, K + 1]: A [x y t -1] (z rejected, t from the target), B [u -1 -1 -1]

Every request that may speculate goes through here in a speculating engine, with or without proposals this
step, so a seeded request consumes its generator the same way every step: ``width`` (the configured k) uniform
draws and one exponential per vocabulary entry, whatever its neighbours propose. Proposals are one-hot (prompt
lookup, or a draft model's argmax), for which the speculative sampling rule in rejection.py is exact.

A constrained request (structured outputs) speculates too. The scheduler keeps only the leading proposals its
grammar accepts; the runner masks its k + 1 rows before they come here, row j with the grammar's mask after
proposals 0..j-1 (GrammarBitmask.fill), so greedy keeps proposals while they are the masked argmax and the
token after them is one the grammar allows. A request with logprobs gets them for each output token from its
row here (``verified_logprobs``), as the plain sampler computes them. A request with per-step sampling state
(penalties, bad words, min_tokens) has row j processed as if proposals 0..j-1 were already output: its
penalty counts, banned bad-word continuations and min_tokens count include them, exactly what the plain
sampler would see at that position had the earlier proposals been sampled.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from sluice.core.interface import LogprobsLists
from sluice.sample.argmax import row_argmax
from sluice.sample.logprobs import gather_logprobs
from sluice.sample.metadata import RequestSamplingState, SamplingMetadata, changes_logits
from sluice.sample.sampler import Sampler, apply_min_p, apply_top_k_top_p
from sluice.spec_decode.rejection import PLACEHOLDER, rejection_sample
from sluice.worker.input_batch import segment_offsets


def verify_proposals(logits: torch.Tensor, states: list[RequestSamplingState], num_spec: np.ndarray,
                     spec_token_ids: list[list[int]], width: int) -> torch.Tensor:
    """Output tokens [B, width + 1] (long, PLACEHOLDER past each row's last).

    logits          [sum(num_spec + 1), V]: request i's k_i + 1 rows in order
    states          [B]: each request's sampling state
    num_spec        [B] int64: its k_i (0 .. width)
    spec_token_ids  [B]: its proposals (k_i each)
    """
    device = logits.device
    batch, vocab = len(states), logits.shape[-1]
    lengths = num_spec + 1
    row_of = np.repeat(np.arange(batch), lengths)
    col_of = segment_offsets(lengths)
    drafts_host = np.zeros((batch, width), dtype=np.int64)
    for i, ids in enumerate(spec_token_ids):
        drafts_host[i, :len(ids)] = ids
    drafts = torch.from_numpy(drafts_host).to(device, non_blocking=True)
    num_draft = torch.from_numpy(num_spec.astype(np.int64)).to(device, non_blocking=True)
    flat = (torch.from_numpy(row_of * (width + 1) + col_of)).to(device, non_blocking=True)
    greedy_rows = [s.params.is_greedy for s in states]
    all_greedy = all(greedy_rows)
    if all_greedy and not any(changes_logits(s.params) for s in states):
        # Greedy rows with nothing to apply: the argmax in the logits' own dtype (widening keeps the order).
        return _verify_greedy(row_argmax(logits), flat, drafts, num_draft, batch, width)
    metadata = SamplingMetadata.build(_row_states(states, row_of, col_of, spec_token_ids), vocab, device)
    logits = Sampler.process_logits(logits.to(torch.float32), metadata)
    if all_greedy:
        return _verify_greedy(row_argmax(logits), flat, drafts, num_draft, batch, width)
    probs = _target_probs(logits, metadata)
    if metadata.greedy_mask is not None:  # greedy rows: one-hot at their argmax (the rule then keeps argmax)
        one_hot = torch.zeros_like(probs).scatter_(1, row_argmax(logits)[:, None], 1.0)
        probs = torch.where(metadata.greedy_mask[:, None], one_hot, probs)
    target = torch.zeros(batch * (width + 1), vocab, dtype=torch.float32, device=device)
    target[flat] = probs  # rows past a request's k + 1 stay zero: the rule never reads them
    generators = {i: s.generator for i, s in enumerate(states) if s.generator is not None and not greedy_rows[i]}
    greedy = torch.tensor(greedy_rows, dtype=torch.bool).to(device, non_blocking=True)
    out, _ = rejection_sample(target.view(batch, width + 1, vocab), drafts, num_draft, greedy,
                              generators=generators)
    return out


def verified_logprobs(logits: torch.Tensor, states: list[RequestSamplingState], num_spec: np.ndarray,
                      out: torch.Tensor) -> dict[int, LogprobsLists]:
    """Logprobs of the output tokens of the requests that asked for them, as the plain sampler computes them:
    log_softmax of the logits before bias, penalties and temperature (a grammar's mask applied), the token's
    rank and the top ``logprobs`` alternatives. Index in ``states`` -> one position per verification row
    (k_i + 1); positions past the request's last output token (PLACEHOLDER in ``out``) are the caller's to drop.

    logits  as verify_proposals took them (it leaves them unchanged)
    out     verify_proposals' output [B, width + 1]
    """
    asking = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not asking:
        return {}
    device = logits.device
    lengths = num_spec + 1
    starts = np.cumsum(lengths) - lengths
    rows = np.repeat(starts[asking], lengths[asking]) + segment_offsets(lengths[asking])
    owners = np.repeat(asking, lengths[asking])
    index = torch.from_numpy(np.stack([rows, owners, rows - starts[owners]])).to(device, non_blocking=True)
    chosen = out[index[1], index[2]].clamp_min(0)
    raw = torch.log_softmax(logits[index[0]].to(torch.float32), dim=-1)
    lists = gather_logprobs(raw, chosen, [states[i].params.logprobs for i in owners.tolist()])
    ends = np.cumsum(lengths[asking])
    return {i: lists.rows(int(end - lengths[i]), int(end)) for i, end in zip(asking, ends)}


def _row_states(states: list[RequestSamplingState], row_of: np.ndarray, col_of: np.ndarray,
                spec_token_ids: list[list[int]]) -> list[RequestSamplingState]:
    """The sampling state of each verification row: the request's own, or for a request with per-step state
    (penalties, bad words, min_tokens) at row j > 0 a copy whose output also holds proposals 0..j-1."""
    rows = [states[i] for i in row_of]
    for r in np.flatnonzero(col_of > 0).tolist():
        state, j = rows[r], int(col_of[r])
        if state.params.uses_per_step_state:
            rows[r] = dataclasses.replace(
                state, output_token_ids=state.output_token_ids + list(spec_token_ids[int(row_of[r])][:j]))
    return rows


def _verify_greedy(argmax: torch.Tensor, flat: torch.Tensor, drafts: torch.Tensor, num_draft: torch.Tensor,
                   batch: int, width: int) -> torch.Tensor:
    """Greedy rows only: keep proposals while they equal the target's argmax, then the argmax after them."""
    device = argmax.device
    target = torch.full((batch * (width + 1),), PLACEHOLDER, dtype=torch.long, device=device)
    target[flat] = argmax
    target = target.view(batch, width + 1)
    positions = torch.arange(width, device=device)
    accept = (target[:, :width] == drafts) & (positions[None, :] < num_draft[:, None])
    num_kept = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)
    out = torch.full((batch, width + 1), PLACEHOLDER, dtype=torch.long, device=device)
    keep = positions[None, :] < num_kept[:, None]
    out[:, :width] = torch.where(keep, drafts, out[:, :width])
    rows = torch.arange(batch, device=device)
    out[rows, num_kept] = target[rows, num_kept]
    return out


def _target_probs(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """The target's sampling distribution per row: temperature, top-k, top-p, softmax, min-p (as the sampler)."""
    if metadata.temperature is not None:
        logits = logits / metadata.temperature.unsqueeze(1)
    logits = apply_top_k_top_p(logits, metadata.top_k, metadata.max_top_k, metadata.top_p)
    probs = torch.softmax(logits, dim=-1)
    if metadata.min_p is not None:
        probs = apply_min_p(probs, metadata.min_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs

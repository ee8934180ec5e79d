"""Sampler: logits [N, V] + SamplingMetadata -> one token per row (and logprobs when asked).

One step, in order:
  1. log_softmax of the raw logits, kept for the rows that asked for logprobs
  2. logit_bias, allowed_token_ids, banned tokens (bad words; stop tokens below min_tokens)
  3. penalties (repetition, frequency, presence)
  4. greedy rows: argmax
     random rows: temperature -> top-k -> top-p -> min-p -> argmax(probs / q), q ~ Exp(1)
  5. logprobs of the sampled token, its rank, and the top-k

Step 4's exponential race is the Gumbel-max trick: it samples from ``probs`` without a
cumulative sum or a device sync. Unseeded rows share one batched draw; a seeded row
draws from its own generator, so its tokens do not depend on its batch neighbours.

Two paths run step 4. The torch code below is the reference and the CPU path. On CUDA, a
batch in which no row uses top-k, top-p or min-p takes the fused Triton kernel
(fused_sampling.py) instead: one read of the logits in their own dtype, no float32 copy.
Its noise is keyed rather than drawn: unseeded rows by a per-step seed drawn on the host
(``random.Random`` seeded from ``torch.initial_seed()``) and their row, seeded rows by
(request seed, output position). So on that path a seeded request draws other numbers
than its torch.Generator would (generator streams were device-specific anyway); its
tokens still repeat for the same seed, alone or in any batch and across preemption, as
long as its batches keep taking the fused path. A batch that takes the torch path (some
row uses top-k / top-p / min-p) draws a seeded row's noise from its generator.
Greedy rows on the fused path pick the lowest token id among tied maxima.

The torch path goes to float32 only where it computes: logprobs, bias/masks/penalties and
random rows; greedy rows take the argmax in the logits' own dtype (float32 holds every
bf16/fp16 value exactly, so the ids are the ones a float32 copy gives).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from random import Random

import torch

from sluice.core.interface import LogprobsLists
from sluice.sample.argmax import row_argmax
from sluice.sample.logprobs import compute_prompt_logprobs, gather_logprobs
from sluice.sample.metadata import SamplingMetadata
from sluice.sample.penalties import (apply_allowed_token_mask, apply_banned_tokens, apply_logit_bias,
                                     apply_penalties)


@dataclass(slots=True)
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # long [N], on the logits' device
    # One row per entry of logprobs_rows (the batch rows that asked), None when none asked.
    logprobs: LogprobsLists | None = None
    logprobs_rows: list[int] = field(default_factory=list)

    def logprobs_by_request(self, req_ids: list[str]) -> dict[str, LogprobsLists]:
        """Splits the logprobs per request; ``req_ids`` are the batch rows' ids, in order."""
        if self.logprobs is None:
            return {}
        return {req_ids[row]: self.logprobs.rows(i, i + 1) for i, row in enumerate(self.logprobs_rows)}


class Sampler:
    """Stateless but for the unseeded step seeds: per-request state lives in the metadata's
    RequestSamplingStates.

    ``use_fused_kernel``: None takes the fused kernel for eligible batches on CUDA; True for
    eligible batches on any device (CPU tensors under TRITON_INTERPRET=1 in tests); False never.
    """

    def __init__(self, use_fused_kernel: bool | None = None) -> None:
        self.use_fused_kernel = use_fused_kernel
        # Drawn on the host so that keying the fused kernel's noise never waits on the device.
        self._step_seeds = Random(torch.initial_seed())

    def sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        fused = self.takes_fused_path(logits, metadata)
        raw_logprobs = None
        if metadata.logprobs_rows:
            rows = torch.tensor(metadata.logprobs_rows, dtype=torch.long).to(logits.device, non_blocking=True)
            raw_logprobs = torch.log_softmax(logits[rows].to(torch.float32), dim=-1)
        logits = self.process_logits(logits, metadata)
        sampled = self._sample_fused(logits, metadata) if fused else self._sample(logits, metadata)
        if raw_logprobs is None:
            return SamplerOutput(sampled)
        lists = gather_logprobs(raw_logprobs, sampled[rows], metadata.num_logprobs)
        return SamplerOutput(sampled, lists, list(metadata.logprobs_rows))

    def takes_fused_path(self, logits: torch.Tensor, metadata: SamplingMetadata) -> bool:
        """Whether this batch samples with the fused kernel: no top-k, top-p or min-p in any row."""
        if self.use_fused_kernel is False or (self.use_fused_kernel is None and not logits.is_cuda):
            return False
        return metadata.no_top_k and metadata.no_top_p and metadata.no_min_p

    def compile_variants(self, logits: torch.Tensor) -> None:
        """Compiles every fused-kernel variant for logits of this shape and dtype (at start-up, so that no
        step stops for a compile); nothing when this sampler never takes the fused path."""
        if self.use_fused_kernel is not False:
            from sluice.sample import fused_sampling
            fused_sampling.compile_variants(logits)

    def _sample_fused(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        from sluice.sample import fused_sampling  # imports triton: only where the kernel runs

        # 2^62 and up: always a 64-bit kernel argument, so one compiled kernel serves every step.
        step_seed = self._step_seeds.getrandbits(62) | (1 << 62)
        return fused_sampling.sample(logits, metadata, step_seed)

    @staticmethod
    def process_logits(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Bias, masks and penalties in float32; out of place, so the caller's logits stay as they were."""
        needs_processing = (metadata.logit_bias is not None or metadata.allowed_token_mask is not None
                            or metadata.banned_tokens is not None or metadata.penalties is not None)
        if not needs_processing:
            return logits
        logits = logits.to(torch.float32)
        if metadata.logit_bias is not None:
            logits = apply_logit_bias(logits, metadata.logit_bias)
        if metadata.allowed_token_mask is not None:
            logits = apply_allowed_token_mask(logits, metadata.allowed_token_mask)
        if metadata.banned_tokens is not None:
            logits = apply_banned_tokens(logits, metadata.banned_tokens)
        if metadata.penalties is not None:
            logits = apply_penalties(logits, metadata.penalties)
        return logits

    def _sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        greedy = None if metadata.all_random else row_argmax(logits)
        if metadata.all_greedy:
            return greedy
        random = self._sample_random(logits, metadata)
        if metadata.all_random:
            return random
        return torch.where(metadata.greedy_mask, greedy, random)

    def _sample_random(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        logits = logits / metadata.temperature.unsqueeze(1)  # float32 temperature: bf16 logits widen
        logits = apply_top_k_top_p(logits, metadata.top_k, metadata.max_top_k, metadata.top_p)
        probs = torch.softmax(logits, dim=-1)
        if metadata.min_p is not None:
            probs = apply_min_p(probs, metadata.min_p)
        q = self._exponential_noise(probs, metadata)
        return row_argmax(probs.div(q))

    @staticmethod
    def _exponential_noise(probs: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        num_reqs, vocab_size = probs.shape
        seeded = metadata.seeded_rows
        q = torch.empty_like(probs)
        if len(seeded) < num_reqs:
            q.exponential_()
        for row, state in seeded.items():  # a loop over seeded requests, not tokens
            q[row] = state.draw_exponential(vocab_size, probs.device)
        # Exp(1) can return exactly 0; clamping keeps probs / q finite.
        return q.clamp_min_(1e-10)

    @staticmethod
    def compute_prompt_logprobs(logits: torch.Tensor, target_token_ids: torch.Tensor,
                                num_logprobs: int) -> LogprobsLists:
        return compute_prompt_logprobs(logits, target_token_ids, num_logprobs)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Sets logits outside each row's top-k / top-p nucleus to -inf.

    top-k keeps every token whose logit is at least the k-th largest (ties kept);
    top-p keeps the most likely tokens until their mass reaches p (at least one).
    """
    if top_k is None and top_p is None:
        return logits
    vocab_size = logits.shape[-1]
    if top_p is None:
        # top-k alone: a partial topk, no full sort.
        top_values = logits.topk(max_top_k, dim=-1).values
        kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
        kth = kth.masked_fill((top_k >= vocab_size).unsqueeze(1), float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab_size - top_k).clamp(min=0).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    outside = cumulative <= (1.0 - top_p).unsqueeze(1)
    outside[:, -1] = False  # the most likely token always stays
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return sorted_logits.scatter(-1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zeroes tokens less likely than min_p times the row's most likely token."""
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)

"""Per-request sampling state and the batched tensors one sampling step needs.

The model runner keeps one ``RequestSamplingState`` per running request (its params,
its seeded generator, a live view of its token history) and, each step, builds a
``SamplingMetadata`` for the rows that sample. Every feature is optional: a batch in
which no request uses penalties builds no token-count tensors, a batch without top-k
builds no top-k tensor, and so on; the sampler checks the ``None``s and skips the work.

    rows:          0 (greedy)   1 (T=0.7, top_k=5, seed=3)   2 (T=1, penalties)
    temperature    [1.0,         0.7,                         1.0]   (1.0 keeps greedy rows finite)
    top_k          [V,           5,                           V]     (V means off)
    seeded_rows    {1: state_1}                                      (own generator, own draw)
    penalty_rows   [2]                                               (counts built for row 2 only)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from sluice.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class RequestSamplingState:
    """What the sampler needs to know about one request across steps.

    ``output_token_ids`` is a live list: the runner appends each sampled token to it.
    ``generator`` is None for unseeded requests. ``num_draws`` counts the output positions
    a seeded request has drawn noise for; a request rebuilt after preemption catches up to
    one draw per output token, so its seeded stream continues exactly where it was.
    """
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_id: int | None = None
    num_draws: int = 0
    _prompt_ids_tensor: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def create(cls, params: SamplingParams, prompt_token_ids: list[int], output_token_ids: list[int],
               eos_token_id: int | None = None, device: torch.device | str = "cpu") -> "RequestSamplingState":
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=torch.device(device))
            generator.manual_seed(params.seed)
        if params.bad_words and params.bad_words_token_ids is None:
            logger.warning("bad_words were never converted to token ids (the engine front must call "
                           "SamplingParams.update_bad_words_from_tokenizer); they are ignored")
        return cls(params, generator, list(prompt_token_ids), output_token_ids, eos_token_id)

    def stop_token_ids_to_mask(self, num_pending: int = 0) -> list[int]:
        """Tokens banned while fewer than min_tokens were generated: eos (unless ignored) and stop ids.
        ``num_pending``: output tokens sampled but not yet on the host (async scheduling)."""
        params = self.params
        if len(self.output_token_ids) + num_pending >= params.min_tokens:
            return []
        ids = set(params.all_stop_token_ids)
        if self.eos_token_id is not None and not params.ignore_eos:
            ids.add(self.eos_token_id)
        return sorted(ids)

    def banned_bad_word_tokens(self) -> list[int]:
        """Last tokens of bad words whose earlier tokens end the generated text (vLLM's rule)."""
        sequences = self.params.bad_words_token_ids
        if sequences is None:
            return []
        output = self.output_token_ids
        banned = []
        for seq in sequences:
            prefix_len = len(seq) - 1
            if prefix_len == 0 or (len(output) >= prefix_len and output[-prefix_len:] == seq[:-1]):
                banned.append(seq[-1])
        return banned

    def draw_exponential(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """One Exp(1) vector from this request's generator, for the output position now sampled."""
        generator = self.generator
        assert generator is not None
        # Rebuilt after preemption: skip the draws its earlier output tokens consumed.
        while self.num_draws < len(self.output_token_ids):
            torch.empty(vocab_size, device=generator.device).exponential_(generator=generator)
            self.num_draws += 1
        self.num_draws += 1
        # Drawn where the generator lives (the stream is device-specific), then moved.
        noise = torch.empty(vocab_size, device=generator.device).exponential_(generator=generator)
        return noise.to(device, non_blocking=True)

    def claim_draw_position(self) -> int:
        """The output position now sampled, for noise keyed by (seed, position) instead of drawn.

        At least the number of output tokens (a rebuilt request resumes there, no catch-up), and
        one past the last claimed position while that sample has not reached the host yet (a
        pipelined step samples again before the previous token is appended).
        """
        position = max(self.num_draws, len(self.output_token_ids))
        self.num_draws = position + 1
        return position

    def prompt_ids_tensor(self, device: torch.device) -> torch.Tensor:
        """The prompt as a device tensor, built once (the prompt never changes)."""
        if self._prompt_ids_tensor is None or self._prompt_ids_tensor.device != device:
            self._prompt_ids_tensor = torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device)
        return self._prompt_ids_tensor


@dataclass(slots=True)
class PenaltyTensors:
    """Penalties for the rows that use them (``rows`` indexes the batch)."""
    rows: torch.Tensor  # long [R]
    presence: torch.Tensor  # float32 [R]
    frequency: torch.Tensor  # float32 [R]
    repetition: torch.Tensor  # float32 [R]
    output_counts: torch.Tensor  # float32 [R, V]: occurrences of each token in the generated text
    prompt_mask: torch.Tensor | None  # bool [R, V]: token occurs in the prompt (repetition only)


@dataclass(slots=True)
class PendingOutputs:
    """Async scheduling: batch rows whose last output token was sampled by the step still in flight,
    so it is not in ``output_token_ids`` yet, and those tokens' ids on the device."""
    rows: list[int]
    token_ids: torch.Tensor  # long [len(rows)], on the sampling device

    def of(self, rows: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """(positions within ``rows`` that have a pending token, their ids); ids None when there are none."""
        where = {row: i for i, row in enumerate(self.rows)}
        hits = [(k, where[row]) for k, row in enumerate(rows) if row in where]
        if not hits:
            return [], None
        index = _tensor([i for _, i in hits], torch.long, self.token_ids.device)
        return [k for k, _ in hits], self.token_ids.index_select(0, index)


@dataclass(slots=True)
class SamplingMetadata:
    """Batched sampling inputs for one step; ``None`` means no row uses the feature."""
    num_reqs: int
    vocab_size: int
    states: list[RequestSamplingState]
    all_greedy: bool
    all_random: bool
    greedy_mask: torch.Tensor | None  # bool [N]; only when the batch mixes greedy and random rows
    temperature: torch.Tensor | None  # float32 [N]; None when all greedy
    top_k: torch.Tensor | None  # long [N], vocab_size where off
    max_top_k: int  # largest top_k in use (0 when none)
    top_p: torch.Tensor | None  # float32 [N], 1.0 where off
    min_p: torch.Tensor | None  # float32 [N], 0.0 where off
    seeded_rows: dict[int, RequestSamplingState]  # random rows with their own generator
    penalties: PenaltyTensors | None
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (rows, token ids, biases)
    allowed_token_mask: tuple[torch.Tensor, torch.Tensor] | None  # (rows [R], bool [R, V] True=masked)
    banned_tokens: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) set to -inf
    logprobs_rows: list[int]  # rows that asked for logprobs
    num_logprobs: list[int]  # top-k each of those rows asked for

    @property
    def no_penalties(self) -> bool:
        return self.penalties is None

    @property
    def no_top_k(self) -> bool:
        return self.top_k is None

    @property
    def no_top_p(self) -> bool:
        return self.top_p is None

    @property
    def no_min_p(self) -> bool:
        return self.min_p is None

    @property
    def max_num_logprobs(self) -> int | None:
        return max(self.num_logprobs) if self.num_logprobs else None

    @classmethod
    def build(cls, states: list[RequestSamplingState], vocab_size: int,
              device: torch.device | str, pending: PendingOutputs | None = None) -> "SamplingMetadata":
        """``pending``: rows whose last output token is still on its way to the host; penalties
        count it and min_tokens counts it, on the device, so nothing waits for it."""
        device = torch.device(device)
        params = [s.params for s in states]
        greedy = [p.is_greedy for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)
        random_params = [(p if not g else None) for p, g in zip(params, greedy)]
        top_k = [min(p.top_k, vocab_size) if p is not None and p.top_k > 0 else vocab_size for p in random_params]
        top_p = [p.top_p if p is not None else 1.0 for p in random_params]
        min_p = [p.min_p if p is not None else 0.0 for p in random_params]
        used_top_k = [k for k in top_k if k < vocab_size]
        logprobs_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        return cls(
            num_reqs=len(states),
            vocab_size=vocab_size,
            states=states,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=None if all_greedy or all_random else _tensor(greedy, torch.bool, device),
            temperature=None if all_greedy else _tensor(
                [p.temperature if p is not None else 1.0 for p in random_params], torch.float32, device),
            top_k=_tensor(top_k, torch.long, device) if used_top_k else None,
            max_top_k=max(used_top_k, default=0),
            top_p=_tensor(top_p, torch.float32, device) if any(p < 1.0 for p in top_p) else None,
            min_p=_tensor(min_p, torch.float32, device) if any(p > 0.0 for p in min_p) else None,
            seeded_rows={i: s for i, (s, g) in enumerate(zip(states, greedy))
                         if not g and s.generator is not None},
            penalties=_build_penalties(states, vocab_size, device, pending),
            logit_bias=_build_logit_bias(params, vocab_size, device),
            allowed_token_mask=_build_allowed_mask(params, vocab_size, device),
            banned_tokens=_build_banned(states, vocab_size, device, pending),
            logprobs_rows=logprobs_rows,
            num_logprobs=[params[i].logprobs for i in logprobs_rows],
        )


def _tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Built on the host and copied without blocking: no device sync on the step's path.
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def changes_logits(params: SamplingParams) -> bool:
    """Whether SamplingMetadata carries anything that changes a request's logits before it samples: logit
    bias, allowed token ids, penalties, bad words or min_tokens (the builders below)."""
    return bool(params.uses_per_step_state or params.logit_bias or params.allowed_token_ids is not None)


def _build_penalties(states: list[RequestSamplingState], vocab_size: int, device: torch.device,
                     pending: PendingOutputs | None = None) -> PenaltyTensors | None:
    rows = [i for i, s in enumerate(states) if s.params.uses_penalties]
    if not rows:
        return None
    penalized = [states[i] for i in rows]
    output_counts = _token_counts([s.output_token_ids for s in penalized], vocab_size, device)
    if pending is not None:
        positions, token_ids = pending.of(rows)
        if token_ids is not None:  # the tokens the host has not seen yet, counted on the device
            output_counts.index_put_((_tensor(positions, torch.long, device), token_ids),
                                     torch.ones_like(token_ids, dtype=torch.float32), accumulate=True)
    prompt_mask = None
    if any(s.params.repetition_penalty != 1.0 for s in penalized):
        prompt_mask = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
        for r, state in enumerate(penalized):  # a loop over requests; the prompt tensor is cached
            prompt_ids = state.prompt_ids_tensor(device)
            prompt_mask[r, prompt_ids] = True  # the front checked prompt ids against the vocab
    return PenaltyTensors(
        rows=_tensor(rows, torch.long, device),
        presence=_tensor([s.params.presence_penalty for s in penalized], torch.float32, device),
        frequency=_tensor([s.params.frequency_penalty for s in penalized], torch.float32, device),
        repetition=_tensor([s.params.repetition_penalty for s in penalized], torch.float32, device),
        output_counts=output_counts,
        prompt_mask=prompt_mask,
    )


def _token_counts(histories: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """float32 [len(histories), V]: how often each token occurs in each history."""
    counts = torch.zeros(len(histories), vocab_size, dtype=torch.float32, device=device)
    rows = [r for r, history in enumerate(histories) for _ in history]
    if rows:
        token_ids = _tensor([t for history in histories for t in history], torch.long, device)
        row_ids = _tensor(rows, torch.long, device)
        counts.index_put_((row_ids, token_ids), torch.ones_like(token_ids, dtype=torch.float32),
                          accumulate=True)
    return counts


def _build_logit_bias(params: list[SamplingParams], vocab_size: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    entries = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()
               if t < vocab_size]
    if not entries:
        return None
    rows, token_ids, biases = zip(*entries)
    return (_tensor(list(rows), torch.long, device), _tensor(list(token_ids), torch.long, device),
            _tensor(list(biases), torch.float32, device))


def _build_allowed_mask(params: list[SamplingParams], vocab_size: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    rows = [i for i, p in enumerate(params) if p.allowed_token_ids is not None]
    if not rows:
        return None
    mask = torch.ones(len(rows), vocab_size, dtype=torch.bool)
    for r, i in enumerate(rows):
        allowed = [t for t in params[i].allowed_token_ids if t < vocab_size]
        mask[r, allowed] = False
    return _tensor(rows, torch.long, device), mask.to(device, non_blocking=True)


def _build_banned(states: list[RequestSamplingState], vocab_size: int, device: torch.device,
                  pending: PendingOutputs | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Bad words' next tokens and, below min_tokens, the stop tokens: all set to -inf."""
    pending_rows = set(pending.rows) if pending is not None else set()
    pairs = [(i, t) for i, s in enumerate(states)
             for t in s.stop_token_ids_to_mask(int(i in pending_rows)) + s.banned_bad_word_tokens()
             if t < vocab_size]
    if not pairs:
        return None
    rows, token_ids = zip(*pairs)
    return _tensor(list(rows), torch.long, device), _tensor(list(token_ids), torch.long, device)

"""Beam search on top of the engine, as vLLM's ``LLM.beam_search`` does it, with HF's selection rules.

Every step turns each live beam into a one-token request (prompt + beam tokens,
``logprobs=2 * beam_width``, ``max_tokens=1``) and runs them all as one batch; the prefix
cache makes the shared prefix of sibling beams cheap. Per prompt, the step then keeps:

    candidates = (beam, token) pairs from each beam's top 2w, scored cum_logprob + logprob
    top 2w of them, best first:
        rank < w and ends the beam (eos, or the last allowed token)  -> finished
        otherwise, not ending                                         -> live, until w are live

Finished beams score ``cum_logprob / num_generated ** length_penalty`` (HF: the generated
length counts the eos token, not the prompt). This equals transformers'
``generate(num_beams=w, do_sample=False, early_stopping="never")``: the search stops
early only when no live beam can still beat the w-th best finished one (exact, as HF's
"never" bound is), otherwise after ``max_tokens``.

Differences from vLLM: vLLM scores by the length of prompt + generated tokens without
the eos, and finishes every eos candidate of every beam's top 2w; here both follow HF.
Candidates are ranked by the model's raw logprobs, so ``temperature`` changes nothing.
Only the model's eos id ends a beam (not chat end-of-turn ids), as in HF and vLLM.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sluice.outputs import Logprob, RequestOutput
from sluice.sampling_params import BeamSearchParams, SamplingParams

# Runs one-token requests as a batch: (prompts, params) -> one RequestOutput per prompt, in order.
GenerateFn = Callable[[list[dict], SamplingParams], list[RequestOutput]]


@dataclass
class BeamSearchSequence:
    """One beam. ``tokens`` include the prompt (vLLM's shape); ``logprobs`` has one dict per generated token."""
    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (eos) or "length"
    stop_reason: int | None = None  # the eos id when finish_reason is "stop"


@dataclass
class BeamSearchOutput:
    """The best ``beam_width`` sequences of one prompt, best first."""
    sequences: list[BeamSearchSequence]


def get_beam_search_score(num_generated_tokens: int, cum_logprob: float, length_penalty: float) -> float:
    """HF's length-normalized score of a finished beam."""
    return cum_logprob / (num_generated_tokens ** length_penalty)


@dataclass
class _Candidate:
    parent: BeamSearchSequence
    token_id: int
    logprobs: dict[int, Logprob]
    cum_logprob: float

    def to_beam(self) -> BeamSearchSequence:
        return BeamSearchSequence(self.parent.tokens + [self.token_id], self.parent.logprobs + [self.logprobs],
                                  self.cum_logprob)


@dataclass
class _BeamSearchInstance:
    """The search state of one prompt."""
    num_prompt_tokens: int
    max_new_tokens: int  # max_tokens, capped so that prompt + output fits max_model_len
    beams: list[BeamSearchSequence]
    finished: list[tuple[float, BeamSearchSequence]] = field(default_factory=list)

    def advance(self, candidates: list[_Candidate], step: int, params: BeamSearchParams,
                eos_token_id: int | None) -> None:
        """Applies one step's candidates (see the module docstring) and the exact early stop."""
        width = params.beam_width
        candidates.sort(key=lambda c: c.cum_logprob, reverse=True)
        num_generated = step + 1
        last_step = num_generated >= self.max_new_tokens
        live: list[BeamSearchSequence] = []
        for rank, candidate in enumerate(candidates[:2 * width]):
            is_eos = candidate.token_id == eos_token_id and not params.ignore_eos
            if is_eos or last_step:
                if rank < width:
                    beam = candidate.to_beam()
                    beam.finish_reason = "stop" if is_eos else "length"
                    beam.stop_reason = candidate.token_id if is_eos else None
                    score = get_beam_search_score(num_generated, beam.cum_logprob, params.length_penalty)
                    self.finished.append((score, beam))
            elif len(live) < width:
                live.append(candidate.to_beam())
        self.beams = live
        if self.beams and not self._can_improve(num_generated, params):
            self.beams = []

    def _can_improve(self, num_generated: int, params: BeamSearchParams) -> bool:
        """Whether the best live beam could still enter the top ``beam_width`` finished beams.

        Logprobs are <= 0, so a live beam's cum_logprob only falls; with a positive length
        penalty its score is bounded by dividing by the longest possible length, otherwise by
        the current one (HF's bound for early_stopping="never").
        """
        if len(self.finished) < params.beam_width:
            return True
        worst_kept = sorted((s for s, _ in self.finished), reverse=True)[params.beam_width - 1]
        best_length = self.max_new_tokens if params.length_penalty > 0 else num_generated
        return get_beam_search_score(best_length, self.beams[0].cum_logprob, params.length_penalty) > worst_kept

    def best(self, width: int) -> list[BeamSearchSequence]:
        ranked = sorted(self.finished, key=lambda item: item[0], reverse=True)
        return [beam for _, beam in ranked[:width]]


def beam_search(engine, prompts: Sequence, params: BeamSearchParams, generate: GenerateFn) -> list[BeamSearchOutput]:
    """Beam search for each prompt; ``engine`` is the LLMEngine (tokenizer, limits), ``generate`` runs a batch."""
    width = params.beam_width
    if 2 * width > engine.model_config.max_logprobs:
        raise ValueError(f"beam_width={width} needs logprobs={2 * width}, above max_logprobs="
                         f"{engine.model_config.max_logprobs}: raise max_logprobs or lower beam_width")
    instances = [_start(engine, prompt, params) for prompt in prompts]
    step_params = SamplingParams(n=1, max_tokens=1, temperature=params.temperature, logprobs=2 * width,
                                 ignore_eos=True, detokenize=False)
    for step in range(max((i.max_new_tokens for i in instances), default=0)):
        live = [(instance, beam) for instance in instances for beam in instance.beams]
        if not live:
            break
        outputs = generate([{"prompt_token_ids": beam.tokens} for _, beam in live], step_params)
        candidates: dict[int, list[_Candidate]] = {id(instance): [] for instance, _ in live}
        for (instance, beam), output in zip(live, outputs):
            candidates[id(instance)].extend(_expand(beam, output, 2 * width))
        for instance in instances:
            if instance.beams:
                instance.advance(candidates[id(instance)], step, params, engine.eos_token_id)
    return [BeamSearchOutput(_with_text(engine.tokenizer, instance, params)) for instance in instances]


def _start(engine, prompt, params: BeamSearchParams) -> _BeamSearchInstance:
    _, prompt_ids = engine.tokenize_prompt(prompt)
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    max_new_tokens = min(params.max_tokens, engine.max_model_len - len(prompt_ids))
    if max_new_tokens < 1:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens long, but max_model_len is "
                         f"{engine.max_model_len}: it must leave room for at least one output token")
    return _BeamSearchInstance(len(prompt_ids), max_new_tokens, [BeamSearchSequence(list(prompt_ids))])


def _expand(beam: BeamSearchSequence, output: RequestOutput, num_candidates: int) -> list[_Candidate]:
    """The beam's top ``num_candidates`` continuations (the sampled token is dropped unless it is among them)."""
    logprobs = output.outputs[0].logprobs
    if not logprobs:
        return []
    step_logprobs = logprobs[0]
    return [_Candidate(beam, token_id, step_logprobs, beam.cum_logprob + logprob.logprob)
            for token_id, logprob in step_logprobs.items()
            if logprob.rank is None or logprob.rank <= num_candidates]


def _with_text(tokenizer, instance: _BeamSearchInstance, params: BeamSearchParams) -> list[BeamSearchSequence]:
    """The best beams, their text decoded from the generated tokens (the eos left out unless asked for)."""
    best = instance.best(params.beam_width)
    for beam in best:
        generated = beam.tokens[instance.num_prompt_tokens:]
        if beam.finish_reason == "stop" and not params.include_stop_str_in_output:
            generated = generated[:-1]
        beam.text = tokenizer.decode(generated, skip_special_tokens=True)
    return best

"""Turns the core's token ids into RequestOutputs: detokenization, stop strings, n > 1, output kinds.

A user request with ``n`` completions is one ParentRequestState and ``n`` child requests
in the core (``"{index}_{request_id}"`` when n > 1). Children finish independently; the
parent reports them together, in index order.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sluice.core.interface import EngineCoreOutput
from sluice.engine.detokenizer import IncrementalDetokenizer, fast_decoder
from sluice.engine.stats import FinishedRequestStats, IterationStats
from sluice.outputs import CompletionOutput, RequestMetrics, RequestOutput
from sluice.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class ChildState:
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0  # for delta outputs
    last_token_time: float | None = None


class ParentRequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float, priority: int = 0) -> None:
        self.request_id = request_id
        self.priority = priority
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.children_states: dict[str, ChildState] = {}
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.prompt_logprobs: list | None = None
        self.num_cached_tokens = 0

    def children(self) -> list[tuple[str, SamplingParams]]:
        if self.params.n == 1:
            return [(self.request_id, self.params)]
        out = []
        for i in range(self.params.n):
            child = self.params.clone()
            child.n = 1
            if child.seed is not None:
                child.seed = self.params.seed + i
            out.append((f"{i}_{self.request_id}", child))
        return out

    @property
    def finished(self) -> bool:
        for child in self.children_states.values():
            if child.finish_reason is None:
                return False
        return True


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._fast_decoder = fast_decoder(tokenizer) if tokenizer is not None else None
        self.child_to_parent: dict[str, ParentRequestState] = {}
        self.parents: dict[str, ParentRequestState] = {}
        # Aborted requests, reported with the next step's stats.
        self._aborted_stats: list[FinishedRequestStats] = []

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.parents)

    def add_request(self, parent: ParentRequestState) -> list[tuple[str, SamplingParams]]:
        """Registers a user request; returns its (child id, params) pairs for the core."""
        if parent.request_id in self.parents:
            raise ValueError(f"request id {parent.request_id!r} is already in use")
        self.parents[parent.request_id] = parent
        children = parent.children()
        for index, (child_id, params) in enumerate(children):
            detok = (IncrementalDetokenizer(self.tokenizer, parent.prompt_token_ids, params, self._fast_decoder)
                     if params.detokenize and self.tokenizer is not None else None)
            parent.children_states[child_id] = ChildState(index, params, detok)
            self.child_to_parent[child_id] = parent
        return children

    def abort_requests(self, request_ids: Iterable[str]) -> list[str]:
        """Forgets the given user requests; returns their child ids for the core to abort."""
        child_ids: list[str] = []
        for request_id in request_ids:
            parent = self.parents.pop(request_id, None)
            if parent is None:
                continue
            now = time.monotonic()
            for child_id, child in parent.children_states.items():
                self.child_to_parent.pop(child_id, None)
                child_ids.append(child_id)
                if child.finish_reason is None:
                    child.finish_reason = "abort"
                    self._aborted_stats.append(self._finished_stats(parent, child, now))
        return child_ids

    def process(self, core_outputs: list[EngineCoreOutput],
                stats: IterationStats) -> tuple[list[RequestOutput], list[str]]:
        """Returns the RequestOutputs to emit and the child ids a stop string ended."""
        now = time.monotonic()
        stats.finished_requests.extend(self._aborted_stats)
        self._aborted_stats.clear()
        touched: dict[str, ParentRequestState] = {}
        stopped: list[str] = []
        for out in core_outputs:
            parent = self.child_to_parent.get(out.req_id)
            if parent is None:
                continue  # aborted meanwhile
            child = parent.children_states[out.req_id]
            if child.finish_reason is not None:
                continue
            if self._update_child(parent, child, out, now, stats):
                stopped.append(out.req_id)
            touched[parent.request_id] = parent
        outputs = []
        for parent in touched.values():
            request_output = self._make_output(parent)
            if parent.finished:
                self._finish(parent, now, stats)
            if request_output is not None:
                outputs.append(request_output)
        return outputs, stopped

    def _update_child(self, parent: ParentRequestState, child: ChildState, out: EngineCoreOutput,
                      now: float, stats: IterationStats) -> bool:
        stopped_by_string = False
        if out.scheduled_time is not None and parent.metrics.first_scheduled_time is None:
            parent.metrics.first_scheduled_time = out.scheduled_time
        if out.new_token_ids:
            if parent.metrics.first_token_time is None:
                parent.metrics.first_token_time = now
                parent.num_cached_tokens = out.num_cached_tokens
                stats.time_to_first_tokens.append(now - parent.metrics.arrival_time)
                stats.num_prompt_tokens += len(parent.prompt_token_ids)
            elif child.last_token_time is not None:
                stats.inter_token_latencies.append(now - child.last_token_time)
            child.last_token_time = parent.metrics.last_token_time = now
            stats.num_generation_tokens += len(out.new_token_ids)
            child.token_ids.extend(out.new_token_ids)
            if out.new_logprobs is not None:
                self._append_logprobs(child, out)
            if child.detokenizer is not None:
                # A stop token (eos or a stop id) ending the request leaves its text out.
                stop_str = child.detokenizer.update(out.new_token_ids,
                                                    stop_terminated=out.finish_reason == "stop")
                # A step may bring several tokens (speculative decoding): a stop string among them ends the
                # text even where a later one of them finished the request (max_tokens, eos).
                if stop_str is not None:
                    child.finish_reason, child.stop_reason = "stop", stop_str
                    stopped_by_string = out.finish_reason is None  # the core still runs it: stop it there
        if out.new_prompt_logprobs is not None:
            from sluice.sample.logprobs import to_logprob_dicts
            dicts = to_logprob_dicts(out.new_prompt_logprobs, self.tokenizer)
            if parent.prompt_logprobs is None:
                parent.prompt_logprobs = [None]  # the first prompt token has no logprob
            parent.prompt_logprobs.extend(dicts)
        if out.finish_reason is not None and child.finish_reason is None:
            child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
        return stopped_by_string

    def _append_logprobs(self, child: ChildState, out: EngineCoreOutput) -> None:
        from sluice.sample.logprobs import to_logprob_dicts
        dicts = to_logprob_dicts(out.new_logprobs, self.tokenizer)
        if child.logprobs is None:
            child.logprobs = []
        child.logprobs.extend(dicts)  # in place: a copy per token would be quadratic in the output length
        sampled = [d[t].logprob for d, t in zip(dicts, out.new_token_ids)]
        child.cumulative_logprob = (child.cumulative_logprob or 0.0) + sum(sampled)

    def _make_output(self, parent: ParentRequestState) -> RequestOutput | None:
        kind = parent.params.output_kind
        finished = parent.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        completions = []
        for child in parent.children_states.values():
            child_finished = child.finish_reason is not None
            text = (child.detokenizer.get_next_output_text(child_finished, delta)
                    if child.detokenizer is not None else "")
            token_ids, logprobs = child.token_ids, child.logprobs
            if delta:
                token_ids = token_ids[child.num_sent_tokens:]
                logprobs = logprobs[child.num_sent_tokens:] if logprobs is not None else None
                child.num_sent_tokens += len(token_ids)
            completions.append(CompletionOutput(
                index=child.index, text=text, token_ids=list(token_ids),
                cumulative_logprob=child.cumulative_logprob, logprobs=logprobs,
                finish_reason=child.finish_reason, stop_reason=child.stop_reason))
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids,
            outputs=completions, finished=finished, prompt_logprobs=parent.prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens, metrics=parent.metrics)

    def _finish(self, parent: ParentRequestState, now: float, stats: IterationStats) -> None:
        parent.metrics.finished_time = now
        self.parents.pop(parent.request_id, None)
        for child_id, child in parent.children_states.items():
            self.child_to_parent.pop(child_id, None)
            stats.finished_requests.append(self._finished_stats(parent, child, now))

    @staticmethod
    def _finished_stats(parent: ParentRequestState, child: ChildState, now: float) -> FinishedRequestStats:
        """vLLM's request intervals: queued (arrival to first scheduling), prefill (to the first token),
        decode (first to last token), inference (first scheduling to last token). A request aborted
        before it ran spent all of its time queued."""
        metrics = parent.metrics
        scheduled = metrics.first_scheduled_time if metrics.first_scheduled_time is not None else now
        first_token = metrics.first_token_time
        last_token = child.last_token_time
        return FinishedRequestStats(
            finish_reason=child.finish_reason or "abort",
            e2e_latency=now - metrics.arrival_time,
            queue_time=max(0.0, scheduled - metrics.arrival_time),
            num_prompt_tokens=len(parent.prompt_token_ids),
            num_generation_tokens=len(child.token_ids),
            request_id=parent.request_id,
            arrival_time=metrics.arrival_time,
            prefill_time=max(0.0, first_token - scheduled) if first_token is not None else 0.0,
            decode_time=max(0.0, last_token - first_token) if last_token and first_token else 0.0,
            inference_time=max(0.0, last_token - scheduled) if last_token is not None else 0.0,
            ttft=first_token - metrics.arrival_time if first_token is not None else None,
            n=parent.params.n if child.index == 0 else 0,
            max_tokens=parent.params.max_tokens,
            num_cached_tokens=parent.num_cached_tokens,
            priority=parent.priority)

"""Scheduler: hands each step's token budget across requests so num_computed_tokens catches up with num_tokens.

One step, budget 16, block_size 4 (A and B decode, C is a 30-token prompt chunked):

    running:  A  num_tokens=9   computed=8   -> 1 token   (decode, samples)
              B  num_tokens=21  computed=20  -> 1 token   (decode, samples)
    waiting:  C  num_tokens=30  computed=0   -> 14 tokens (chunk, samples nothing yet)

A prompt chunk is also capped at ``long_prefill_token_threshold`` tokens when that is set.
Running requests go first, in order; then waiting ones in policy order (fcfs: arrival;
priority: lowest (priority, arrival_time) first), while budget, ``max_num_seqs`` and free
blocks last. A running request that cannot get a block preempts the lowest-priority running
request (its blocks are freed, num_computed_tokens drops to 0, it goes back to the front of the
waiting queue, or to its (priority, arrival_time) place; with ``kv_offload`` set its KV may first be
swapped to host memory and come back on admission: core/kv_offload.py); waiting requests never preempt. A request samples in a step iff
its tokens are all computed after it; ``update_from_output`` appends the samples and checks stops.

``num_computed_tokens`` advances inside ``schedule()``: the runner executes the step before the
next ``schedule()``. Outputs carry the value from before the step.

Async scheduling (``SchedulerConfig.async_scheduling``): step t+1 is scheduled while step t still runs
on the GPU, before t's samples are known. A request that samples in step t gets an output
placeholder; the next schedule() counts it as a token to compute, and the runner feeds it the
sample of step t straight from the device:

    schedule(t):    A num_tokens=9 computed=8  -> 1 token, samples      placeholders 0 -> 1
    schedule(t+1):  A num_tokens=9 computed=9  -> 1 token (the pending one), samples    placeholders 2
    update(t):      A gets token 10            num_tokens=10            placeholders 1

A request whose pending samples will end it (max_tokens, max_model_len) is not scheduled again;
one that stops on eos or a stop token wastes the one step already scheduled, whose sample is
dropped. ``update_from_output(t)`` always runs before ``schedule(t+2)``, so at most one sample
per request is pending.

Speculative decoding: a request's proposed tokens (``Request.spec_token_ids``, from the runner's proposer)
are scheduled as tokens beyond ``num_tokens``, in the same budget as everyone's:

    A  num_tokens=9  computed=8  spec=[x y z]  -> 4 tokens (its last token + 3 proposals), samples 1..4
    update: 2 proposals kept + 1 sampled     -> num_tokens=12, computed rolls back from 12 to 11

``update_from_output`` rolls ``num_computed_tokens`` back past the rejected proposals (their KV slots are
written again later) and checks stops token by token. A budget that runs out keeps a prefix of the proposals.
Blocks are published to the prefix cache only up to ``num_tokens``, so no cached block holds an unverified
token.
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from sluice.config import POLICIES, CacheConfig, SchedulerConfig, kv_capped_max_model_len
from sluice.core.interface import (
    CachedRequestData, EngineCoreOutput, ModelRunnerOutput, NewRequestData, SchedulerOutput,
)
from sluice.core.kv_offload import KVOffload
from sluice.core.sliding_window_manager import make_kv_cache_manager
from sluice.core.request import Request, RequestStatus
from sluice.stats import SchedulerStats, SpecDecodingStats

logger = logging.getLogger(__name__)



class AdmissionHook(Protocol):
    """Decides which waiting requests may join the running set this step (beyond budget and blocks)."""

    def start_step(self, running: list[Request], waiting: list[Request]) -> None:
        """Called once per schedule(), before the waiting queue is walked; may reorder ``waiting`` in place."""

    def admits(self, request: Request) -> bool:
        """Whether ``request`` may start now; True also records it as admitted for the rest of the step."""

    def started(self, request: Request) -> None:
        """``request`` left the waiting queue for the running set."""


def _priority_key(request: Request) -> tuple[int, float]:
    return (request.priority, request.arrival_time)


@dataclass(slots=True)
class _StepPlan:
    """What one schedule() call has decided so far."""
    token_budget: int
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Requests admitted from the waiting queue: the runner gets them in full.
    new_reqs: list[Request] = field(default_factory=list)
    # Running requests: block ids appended this step.
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    preempted_req_ids: set[str] = field(default_factory=set)
    # Speculative decoding: proposals scheduled this step (included in num_scheduled_tokens).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    def add_running(self, request: Request, num_tokens: int, new_block_ids: list[int]) -> None:
        self.num_scheduled_tokens[request.request_id] = num_tokens
        self.new_block_ids[request.request_id] = new_block_ids
        self.token_budget -= num_tokens
        if request.spec_token_ids:
            # Tokens past its known (and pending) ones are proposals; a cut budget keeps their prefix.
            num_spec = num_tokens - (request.num_tokens + request.num_output_placeholders
                                     - request.num_computed_tokens)
            if num_spec > 0:
                self.spec_token_ids[request.request_id] = request.spec_token_ids[:num_spec]
            request.spec_token_ids = []

    def add_new(self, request: Request, num_tokens: int) -> None:
        self.num_scheduled_tokens[request.request_id] = num_tokens
        self.new_reqs.append(request)
        self.token_budget -= num_tokens

    def unschedule(self, request: Request) -> None:
        """Undoes add_running for a request preempted later in the same step."""
        num_tokens = self.num_scheduled_tokens.pop(request.request_id, 0)
        self.new_block_ids.pop(request.request_id, None)
        self.spec_token_ids.pop(request.request_id, None)
        self.token_budget += num_tokens


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        if scheduler_config.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {scheduler_config.policy!r}")
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        # A prompt chunk takes at most this many tokens per step, so that a long prompt's prefill
        # cannot stretch the steps every running request waits on (0: the budget is the limit).
        self.long_prefill_token_threshold = scheduler_config.max_prefill_chunk
        # KV slots past each step's tokens (a draft model writes its proposals' KV there).
        self.num_lookahead_tokens = scheduler_config.num_lookahead_tokens
        if cache_config.kv_layer_groups is None:
            self.kv_cache_manager = make_kv_cache_manager(
                cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching,
                cache_config.sliding_window)
        else:  # windowed and global layers: one block table per layer group (block ids: one list per group)
            from sluice.core.hybrid_kv_manager import HybridKVCacheManager
            self.kv_cache_manager = HybridKVCacheManager(
                cache_config.num_blocks, cache_config.block_size, cache_config.enable_prefix_caching,
                list(cache_config.kv_layer_groups))
        # EngineConfig.with_kv_cache has capped it already; a scheduler built by hand gets the same cap.
        self.max_model_len = kv_capped_max_model_len(scheduler_config.max_model_len, cache_config,
                                                     self.long_prefill_token_threshold)
        self.policy = scheduler_config.policy
        self.requests: dict[str, Request] = {}
        # fcfs: arrival order, preempted requests in front; priority: sorted by (priority, arrival_time).
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        # Finished or aborted since the last schedule(): the runner drops their state.
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0
        # Metrics: whether the last step's admissions stopped on KV blocks, max_num_seqs or a preemption
        # (waiting for capacity) rather than on the token budget (deferred to the next step).
        self._admission_blocked = False
        # Set by core/kv_metrics.py (--kv-cache-metrics): hands over the sampled KV block timings.
        self.kv_cache_events_source = None
        # Set by core/kv_offload.py (--swap-space, --kv-offload-space): swap preemption and the host prefix tier.
        self.kv_offload: KVOffload | None = None
        # Optional admission hook (LoRA: at most max_loras adapters among running requests). None admits all.
        self.admission: AdmissionHook | None = None
        # Outputs of requests that failed in schedule() (finish reason "error"), sent by the next update.
        self._failed_outputs: list[EngineCoreOutput] = []
        # Speculative decoding's counters, from the first step that verified proposals (None until then).
        self.spec_decoding_stats: SpecDecodingStats | None = None

    # ---- requests in and out ------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the scheduler")
        if request.num_tokens > self.max_model_len:
            raise ValueError(f"prompt_token_ids has {request.num_tokens} tokens, more than max_model_len="
                             f"{self.max_model_len} (or the KV cache capacity, if smaller)")
        if request.status != RequestStatus.WAITING:
            raise ValueError(f"status of a new request must be WAITING, got {request.status.name}")
        self.requests[request.request_id] = request
        self._enqueue_waiting(request)

    def finish_requests(self, req_ids: str | Iterable[str], finished_status: RequestStatus) -> None:
        """Ends requests now (aborts, stop strings); unknown or already finished ids are ignored."""
        if not RequestStatus.is_finished(finished_status):
            raise ValueError(f"finished_status must be a finished status, got {finished_status.name}")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = finished_status
            self._free_request(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting or self._failed_outputs)

    def has_requests(self) -> bool:
        """Whether a schedule() call is still due: unfinished requests, or finished ids the runner must drop."""
        return self.has_unfinished_requests() or bool(self.finished_req_ids)

    def get_num_unfinished_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    def make_stats(self) -> SchedulerStats:
        prefix_stats = self.kv_cache_manager.prefix_cache_stats
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage,
            prefix_cache_queries=prefix_stats.queries,
            prefix_cache_hits=prefix_stats.hits,
            num_preemptions=self.num_preemptions,
            num_waiting_for_capacity=len(self.waiting) if self._admission_blocked else 0,
            kv_cache_events=self.kv_cache_events_source() if self.kv_cache_events_source is not None else None,
            kv_offload=dataclasses.replace(self.kv_offload.stats) if self.kv_offload is not None else None,
            spec_decoding=self.spec_decoding_stats.copy() if self.spec_decoding_stats is not None else None,
        )

    # ---- one step -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        step = _StepPlan(token_budget=self.max_num_batched_tokens)
        self._schedule_running(step)
        # After a preemption blocks are short: admitting waiting requests would only thrash.
        self._admission_blocked = bool(step.preempted_req_ids)
        if not step.preempted_req_ids:
            self._schedule_waiting(step)
        return self._make_output(step)

    def _schedule_running(self, step: _StepPlan) -> None:
        for request in list(self.running):
            if step.token_budget == 0:
                break
            if request.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if request.num_output_placeholders and self._pending_samples_end(request):
                continue
            num_new_tokens = min(request.num_tokens + request.num_output_placeholders + len(request.spec_token_ids)
                                 - request.num_computed_tokens, step.token_budget, self.long_prefill_token_threshold)
            if num_new_tokens <= 0:
                continue
            num_slots = num_new_tokens + (self._lookahead(request, num_new_tokens) if self.num_lookahead_tokens else 0)
            new_block_ids = self.kv_cache_manager.allocate_slots(request, num_slots)
            while new_block_ids is None:
                victim = self._pick_victim()
                self._preempt(victim, step)
                if victim is request:
                    break
                new_block_ids = self.kv_cache_manager.allocate_slots(request, num_slots)
            if new_block_ids is not None:
                step.add_running(request, num_new_tokens, new_block_ids)

    def _schedule_waiting(self, step: _StepPlan) -> None:
        admission = self.admission
        if admission is not None:
            admission.start_step(self.running, self.waiting)
        # Requests the admission hook refuses, or whose grammar is still compiling, keep their place in the
        # queue; those behind them go on.
        index = 0
        while index < len(self.waiting) and step.token_budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[index]
            if request.structured_output is not None and not request.structured_output.is_ready():
                if request.structured_output.error is not None:
                    self._fail(request)
                else:
                    index += 1
                continue
            if admission is not None and not admission.admits(request):
                index += 1
                continue
            computed_blocks, num_computed = self.kv_cache_manager.get_computed_blocks(request)
            # Tokens whose KV comes back from host memory (a swapped request's, host-tier prefix hits).
            num_loaded = (self.kv_offload.num_loadable_tokens(request, num_computed)
                          if self.kv_offload is not None else 0)
            num_new_tokens = min(request.num_tokens - num_computed - num_loaded, step.token_budget,
                                 self.long_prefill_token_threshold)
            num_slots = num_loaded + num_new_tokens
            if self.num_lookahead_tokens:
                num_slots += self._lookahead(request, num_computed + num_loaded + num_new_tokens
                                             - request.num_computed_tokens)
            if self.kv_cache_manager.allocate_slots(request, num_slots, computed_blocks) is None:
                self._admission_blocked = True
                break
            if self.kv_offload is not None:
                self._admit_loaded(request, num_computed, num_loaded)
                num_computed += num_loaded
            self.waiting.pop(index)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.num_computed_tokens = num_computed
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            step.add_new(request, num_new_tokens)
            if admission is not None:
                admission.started(request)
        if self.waiting and len(self.running) >= self.max_num_seqs:
            self._admission_blocked = True

    def _fail(self, request: Request) -> None:
        """Finishes a waiting request that cannot run (its grammar did not compile): finish reason "error"."""
        logger.warning("request %s fails: %s", request.request_id, request.structured_output.error)
        self.waiting.remove(request)
        request.status = RequestStatus.FINISHED_ERROR
        self._failed_outputs.append(EngineCoreOutput(request.request_id, [], finish_reason=request.get_finish_reason()))
        self._free_request(request)

    def _lookahead(self, request: Request, num_new_tokens: int) -> int:
        """KV slots to allocate past a step's tokens, short of max_model_len (a draft model's proposals' KV)."""
        return max(0, min(self.num_lookahead_tokens,
                          self.max_model_len - request.num_computed_tokens - num_new_tokens))

    def _pending_samples_end(self, request: Request) -> bool:
        """Whether the samples still on their way will finish the request by length."""
        max_tokens = request.sampling_params.max_tokens
        num_output = request.num_output_tokens + request.num_output_placeholders
        return ((max_tokens is not None and num_output >= max_tokens)
                or request.num_tokens + request.num_output_placeholders >= self.max_model_len)

    def _pick_victim(self) -> Request:
        if self.policy == "priority":
            return max(self.running, key=_priority_key)
        return self.running[-1]

    def _admit_loaded(self, request: Request, num_device_hit_tokens: int, num_loaded: int) -> None:
        """Records the host->device copies of an admitted request's loaded tokens; host-tier ones are prefix hits."""
        swapped = self.kv_offload.is_swapped(request)
        self.kv_offload.admit(request, self.kv_cache_manager.req_to_blocks[request.request_id],
                              num_device_hit_tokens, num_loaded)
        if not swapped and num_loaded:
            self.kv_cache_manager.prefix_cache_stats.hits += num_loaded

    def _preempt(self, request: Request, step: _StepPlan) -> None:
        """Preemption: drop the device KV and restart from zero (prefix hits make that cheap), after swapping it
        to host memory when the KV offload chooses to (it comes back on admission: see _schedule_waiting)."""
        self.running.remove(request)
        step.unschedule(request)
        if self.kv_offload is not None:
            self.kv_offload.swap_out(request, self.kv_cache_manager)
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue_waiting(request, front=True)
        step.preempted_req_ids.add(request.request_id)

    def _enqueue_waiting(self, request: Request, front: bool = False) -> None:
        if self.policy == "priority":
            bisect.insort(self.waiting, request, key=_priority_key)
        elif front:
            self.waiting.insert(0, request)
        else:
            self.waiting.append(request)

    def _make_output(self, step: _StepPlan) -> SchedulerOutput:
        new_reqs = [
            NewRequestData(
                req_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                output_token_ids=list(request.output_token_ids),
                sampling_params=request.sampling_params,
                block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
                num_computed_tokens=request.num_computed_tokens,
                eos_token_id=request.eos_token_id,
                lora_request=request.lora_request,
            )
            for request in step.new_reqs
        ]
        cached_reqs = [
            CachedRequestData(req_id, block_ids, self.requests[req_id].num_computed_tokens)
            for req_id, block_ids in step.new_block_ids.items()
        ]
        async_scheduling = self.scheduler_config.async_scheduling
        for req_id, num_tokens in step.num_scheduled_tokens.items():
            request = self.requests[req_id]
            request.num_computed_tokens += num_tokens
            if async_scheduling and request.num_computed_tokens >= request.num_tokens + request.num_output_placeholders:
                request.num_output_placeholders += 1  # it samples in this step
        finished_req_ids, self.finished_req_ids = self.finished_req_ids, set()
        kv_transfers = self.kv_offload.take_transfers() if self.kv_offload is not None else None
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=step.num_scheduled_tokens,
            total_num_scheduled_tokens=sum(step.num_scheduled_tokens.values()),
            finished_req_ids=finished_req_ids,
            preempted_req_ids=step.preempted_req_ids,
            kv_transfers=kv_transfers,
            scheduled_spec_token_ids=step.spec_token_ids,
        )

    # ---- after the runner ---------------------------------------------------------------

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        if self._failed_outputs:
            outputs, self._failed_outputs = self._failed_outputs, []
        if model_runner_output.pooler_output:
            outputs += self._finish_pooled(model_runner_output.pooler_output)
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None:  # aborted since schedule()
                continue
            sampled = model_runner_output.sampled_token_ids.get(req_id, [])
            if request.num_output_placeholders:
                request.num_output_placeholders = max(0, request.num_output_placeholders - len(sampled))
            # Async scheduling: a request preempted after its step was launched waits, yet samples.
            was_running = request.status == RequestStatus.RUNNING
            if scheduler_output.scheduled_spec_token_ids and sampled:
                self._roll_back_rejected(request, scheduler_output.scheduled_spec_token_ids.get(req_id), sampled)
            new_token_ids = self._append_until_stop(request, sampled)
            logprobs = model_runner_output.logprobs.get(req_id)
            if logprobs is not None and len(new_token_ids) < len(sampled):
                logprobs = logprobs.rows(0, len(new_token_ids))
            prompt_logprobs = model_runner_output.prompt_logprobs.get(req_id)
            if new_token_ids or request.is_finished() or prompt_logprobs is not None:
                outputs.append(EngineCoreOutput(
                    req_id=req_id,
                    new_token_ids=new_token_ids,
                    finish_reason=request.get_finish_reason(),
                    stop_reason=request.stop_reason,
                    new_logprobs=logprobs,
                    new_prompt_logprobs=prompt_logprobs,
                    num_cached_tokens=max(request.num_cached_tokens, 0),
                    # Once, with the first token: the front end times queue and prefill from it.
                    scheduled_time=(request.first_scheduled_time
                                    if request.num_output_tokens == len(new_token_ids) else None),
                ))
            if request.is_finished():
                (self.running if was_running else self.waiting).remove(request)
                self._free_request(request)
            elif model_runner_output.spec_token_ids:
                self._take_proposals(request, model_runner_output.spec_token_ids.get(req_id))
        return outputs

    def _roll_back_rejected(self, request: Request, spec_token_ids: list[int] | None, sampled: list[int]) -> None:
        """Rolls ``num_computed_tokens`` back past the proposals the runner rejected; counts the verification."""
        if not spec_token_ids:
            return
        num_accepted = len(sampled) - 1
        request.num_computed_tokens -= len(spec_token_ids) - num_accepted
        if self.spec_decoding_stats is None:
            self.spec_decoding_stats = SpecDecodingStats()
        self.spec_decoding_stats.observe(len(spec_token_ids), num_accepted)

    def _take_proposals(self, request: Request, proposals: list[int] | None) -> None:
        """Keeps a request's proposals for the next step, as many as its length limits leave room to keep; a
        constrained request's up to the first one its grammar refuses (its matcher has just taken this step's
        tokens, and takes nothing more before the proposals are verified)."""
        if proposals and request.structured_output is not None:
            proposals = request.structured_output.valid_proposals(proposals)
        if not proposals:
            return
        room = self.max_model_len - request.num_tokens - 1
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens - 1)
        if room > 0:
            request.spec_token_ids = list(proposals[:room])

    def _finish_pooled(self, pooler_output: dict[str, bytes]) -> list[EngineCoreOutput]:
        """Pooling requests end with their prompt: each pooled one finishes (stop) and frees its blocks.
        The main loop then skips them (they left ``self.requests``). With async scheduling a request may
        have been preempted after its last step launched; that step's vector is still right."""
        outputs = []
        for req_id, pooled in pooler_output.items():
            request = self.requests.get(req_id)
            if request is None:  # aborted since schedule()
                continue
            self.finish_requests(req_id, RequestStatus.FINISHED_STOPPED)
            outputs.append(EngineCoreOutput(req_id, [], finish_reason="stop", pooled_output=pooled,
                                            num_cached_tokens=max(request.num_cached_tokens, 0)))
        return outputs

    def _append_until_stop(self, request: Request, sampled: list[int]) -> list[int]:
        """Appends sampled tokens one by one; the first that ends the request is the last kept."""
        if len(sampled) == 1:  # every step without speculative tokens
            request.output_token_ids.append(sampled[0])
            self._check_stop(request, sampled[0])
            return sampled
        for i, token_id in enumerate(sampled):
            request.append_output_token_ids([token_id])
            if self._check_stop(request, token_id):
                return sampled[:i + 1]
        return list(sampled)

    def _check_stop(self, request: Request, token_id: int) -> bool:
        params = request.sampling_params
        if request.structured_output is not None and request.structured_output.advance(token_id):
            request.status = RequestStatus.FINISHED_STOPPED  # the grammar is complete (or was left)
            if token_id in params.all_stop_token_ids:
                request.stop_reason = token_id
            return True
        if request.num_output_tokens >= params.min_tokens:
            if token_id in params.all_stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return True
            if not params.ignore_eos and token_id == request.eos_token_id:
                request.status = RequestStatus.FINISHED_STOPPED
                return True
        max_tokens_reached = params.max_tokens is not None and request.num_output_tokens >= params.max_tokens
        if max_tokens_reached or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    def _free_request(self, request: Request) -> None:
        if request.structured_output is not None:
            request.structured_output.free()
        self.kv_cache_manager.free(request)
        if self.kv_offload is not None:
            self.kv_offload.free(request)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]

"""The LoRA admission hook: the running set never holds more than max_loras adapters; a request whose adapter
finds no slot waits in its place while others (the base model, adapters already running) go ahead."""
from __future__ import annotations

import pytest

from sluice.config import CacheConfig, SchedulerConfig
from sluice.core.request import Request
from sluice.core.scheduler import Scheduler
from sluice.lora.request import LoRARequest
from sluice.lora.scheduling import LoRAAdmission
from sluice.sampling_params import SamplingParams


def _scheduler(max_loras: int) -> Scheduler:
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64),
                          CacheConfig(block_size=4, enable_prefix_caching=True, num_blocks=64))
    scheduler.admission = LoRAAdmission(max_loras)
    return scheduler


def _request(req_id: str, lora_id: int) -> Request:
    lora = LoRARequest(f"a{lora_id}", lora_id, "/unused") if lora_id else None
    return Request(req_id, [1, 2, 3, 4, 5], SamplingParams(max_tokens=4), lora_request=lora)


def test_running_set_holds_at_most_max_loras_adapters():
    scheduler = _scheduler(max_loras=2)
    for req_id, lora_id in [("a", 1), ("b", 2), ("c", 3), ("base", 0), ("d", 1)]:
        scheduler.add_request(_request(req_id, lora_id))
    output = scheduler.schedule()
    assert sorted(output.num_scheduled_tokens) == ["a", "b", "base", "d"]
    assert [r.request_id for r in scheduler.waiting] == ["c"]
    assert {new.req_id: new.lora_request.lora_int_id if new.lora_request else 0
            for new in output.scheduled_new_reqs} == {"a": 1, "b": 2, "base": 0, "d": 1}
    scheduler.finish_requests(["b"], scheduler.requests["b"].status.FINISHED_ABORTED)
    assert "c" in scheduler.schedule().num_scheduled_tokens  # adapter 2's slot is free again


def test_adapter_ids_keep_prefix_cache_blocks_apart():
    scheduler = _scheduler(max_loras=2)
    scheduler.add_request(_request("first", 1))
    scheduler.schedule()
    manager = scheduler.kv_cache_manager
    same, other = _request("same", 1), _request("other", 2)
    assert manager.get_computed_blocks(same)[1] > 0
    assert manager.get_computed_blocks(other)[1] == 0


# ---- fair scheduling across adapters -----------------------------------------------------------------------
def _median_queue_steps_of_b(fair: bool, num_a_per_tick: int) -> float:
    """Adapter A sends ``num_a_per_tick`` requests per step and adapter B one every other step, for 40 steps,
    into a scheduler with room for 4 running requests; returns B's median queue time in steps."""
    from statistics import median

    from tests.core.fakes import FakeRunner, run_step

    scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                          CacheConfig(block_size=4, enable_prefix_caching=False, num_blocks=256))
    scheduler.admission = LoRAAdmission(max_loras=2, fair=fair)
    runner = FakeRunner.for_scheduler(scheduler)
    arrival_step: dict[str, int] = {}
    queue_steps: dict[str, int] = {}
    for step in range(400):
        if step < 40:
            new = [(f"a{step}-{i}", 1) for i in range(num_a_per_tick)] + ([(f"b{step}", 2)] if step % 2 == 0 else [])
            for req_id, lora_id in new:
                request = _request(req_id, lora_id)
                request.arrival_time = float(step)
                scheduler.add_request(request)
                arrival_step[req_id] = step
        output, _ = run_step(scheduler, runner)
        for new_req in output.scheduled_new_reqs:
            queue_steps.setdefault(new_req.req_id, step - arrival_step[new_req.req_id])
        if step >= 40 and not scheduler.has_unfinished_requests():
            break
    b_times = [steps for req_id, steps in queue_steps.items() if req_id.startswith("b")]
    assert len(b_times) == 20
    return median(b_times)


def test_fair_scheduling_keeps_a_light_adapter_out_of_a_heavy_adapters_backlog():
    alone = _median_queue_steps_of_b(fair=True, num_a_per_tick=0)
    fair = _median_queue_steps_of_b(fair=True, num_a_per_tick=5)
    fcfs = _median_queue_steps_of_b(fair=False, num_a_per_tick=5)
    assert fair <= 2 * max(alone, 1)
    assert fcfs > 10 * max(fair, 1)


def test_lora_requests_info_gauge_names_running_and_waiting_adapters():
    from prometheus_client import CollectorRegistry, generate_latest

    from sluice.lora.scheduling import lora_stats
    from sluice.metrics import SchedulerMetrics

    scheduler = _scheduler(max_loras=1)
    for req_id, lora_id in [("a", 1), ("b", 2), ("c", 0)]:
        scheduler.add_request(_request(req_id, lora_id))
    scheduler.schedule()
    registry = CollectorRegistry()
    metrics = SchedulerMetrics("tiny", registry)
    stats = scheduler.make_stats()
    stats.lora = lora_stats(1, scheduler.running, scheduler.waiting)
    metrics.record(stats)
    text = generate_latest(registry).decode()
    assert 'sluice:lora_requests_info{max_lora="1",running_lora_adapters="a1",waiting_lora_adapters="a2"}' in text


def _reference_fair_order(queue, waiting: list[Request]) -> list[Request]:
    """The fair order spelled out: each time, the adapter with the lowest (virtual time, head's arrival),
    ties to the adapter seen first in ``waiting``; preempted requests first."""
    from collections import deque

    from sluice.core.request import RequestStatus

    ordered = [r for r in waiting if r.status == RequestStatus.PREEMPTED]
    queues: dict[int, deque] = {}
    for request in waiting:
        if request.status != RequestStatus.PREEMPTED:
            queues.setdefault(request.lora_int_id, deque()).append(request)
    clock = {i: max(queue.virtual_time.get(i, 0.0), queue.now) for i in queues}
    while queues:
        lora_id = min(queues, key=lambda i: (clock[i], queues[i][0].arrival_time))
        ordered.append(queues[lora_id].popleft())
        clock[lora_id] += 1
        if not queues[lora_id]:
            del queues[lora_id]
    return ordered


@pytest.mark.parametrize("arrivals", ["tied", "distinct"])
def test_fair_order_equals_the_spelled_out_fair_order_as_requests_come_and_start(arrivals):
    """Tied arrivals (three steps share a time) make ties the full merge breaks by place; distinct ones let
    most steps take the incremental path. Either way: the order of the spelled-out merge."""
    import random

    from sluice.core.request import RequestStatus
    from sluice.lora.scheduling import FairLoRAQueue

    rng = random.Random(0)
    queue = FairLoRAQueue()
    merges = []
    full_merge = queue._merge
    queue._merge = lambda w: merges.append(1) or full_merge(w)
    waiting: list[Request] = []
    for step in range(300):
        for i in range(rng.choice([0, 0, 1, 3])):
            request = _request(f"r{step}-{i}", rng.choice([0, 1, 1, 1, 2, 3, 4]))
            request.arrival_time = float(step // 3) if arrivals == "tied" else step + i / 10
            waiting.insert(0, request) if rng.random() < 0.05 else waiting.append(request)
            if rng.random() < 0.05:
                request.status = RequestStatus.PREEMPTED
        expected = _reference_fair_order(queue, waiting)
        waiting[:] = queue.order(waiting)
        assert [r.request_id for r in waiting] == [r.request_id for r in expected]
        again = _reference_fair_order(queue, waiting)  # nothing changed (the merge may skip itself)
        assert [r.request_id for r in queue.order(waiting)] == [r.request_id for r in again]
        for _ in range(rng.choice([0, 0, 1, 2])):  # start some, not always from the front
            if waiting:
                started = waiting.pop(min(len(waiting) - 1, rng.choice([0, 0, 0, 0, 0, 0, 1, 3])))
                queue.started(started)
    if arrivals == "distinct":
        assert len(merges) < 200, len(merges)  # of 300 steps: the others took the incremental path


def test_an_unchanged_list_stands_and_arrivals_after_front_starts_are_inserted_without_a_merge():
    from sluice.lora.scheduling import FairLoRAQueue

    queue = FairLoRAQueue()
    waiting = []
    for i, lora_id in enumerate([1, 1, 1, 2, 2, 3]):
        waiting.append(_request(f"r{i}", lora_id))
        waiting[-1].arrival_time = float(i)
    waiting[:] = queue.order(waiting)
    assert [r.request_id for r in waiting] == ["r0", "r3", "r5", "r1", "r4", "r2"]
    assert queue.order(waiting) is waiting  # no arrival, no start: the order stands
    queue.started(waiting.pop(0))
    waiting.append(_request("r6", 1))
    waiting[-1].arrival_time = 6.0
    merges = []
    monkeypatched = queue._merge
    queue._merge = lambda w: merges.append(1) or monkeypatched(w)
    waiting[:] = queue.order(waiting)  # the front started, one arrived: inserted at its key, no merge
    assert [r.request_id for r in waiting] == ["r3", "r5", "r1", "r4", "r2", "r6"] and not merges
    queue.started(waiting.pop(1))  # not the front: a full merge next time
    assert [r.request_id for r in queue.order(waiting)] == ["r3", "r1", "r4", "r2", "r6"] and merges

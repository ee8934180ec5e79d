"""The LoRA admission hook: the running set never holds more than max_loras adapters; a request whose adapter
finds no slot waits in its place while others (the base model, adapters already running) go ahead."""
from __future__ import annotations

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

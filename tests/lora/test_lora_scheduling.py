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

"""Test doubles for the engine core: a fake model runner with a fake paged KV cache.

The fake runner does what the real one does with blocks, minus the tensors: it writes each
scheduled token into its slot ``(block_table[p // block_size], p % block_size)``, and a
sampled token is a function of the context *read back from those slots*. A wrong block
table, a stale prefix-cache hit or a block reused too early therefore changes the
token stream (or trips an assertion), and the tests compare streams with a reference
computed from the plain token list.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sluice.config import CacheConfig, SchedulerConfig
from sluice.core.interface import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from sluice.core.kv_offload import KVOffload, PreemptionCosts, install_kv_offload
from sluice.core.request import Request
from sluice.core.scheduler import Scheduler
from sluice.sampling_params import SamplingParams

VOCAB_SIZE = 1000
NextToken = Callable[[str, list[int]], int]


def hashed_next_token(req_id: str, context: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole context, in order."""
    acc = len(context)
    for token in context:
        acc = (acc * 1_000_003 + token) % 2_147_483_647
    return acc % VOCAB_SIZE


def reference_output(prompt: list[int], max_tokens: int, next_token: NextToken = hashed_next_token,
                     req_id: str = "") -> list[int]:
    context = list(prompt)
    for _ in range(max_tokens):
        context.append(next_token(req_id, context))
    return context[len(prompt):]


def make_request(req_id: str, prompt: list[int], *, max_tokens: int | None = 16, arrival_time: float = 0.0,
                 priority: int = 0, eos_token_id: int | None = None, cache_salt: str | None = None,
                 parent_request_id: str | None = None, **sampling_kwargs) -> Request:
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens, **sampling_kwargs),
                   eos_token_id=eos_token_id, priority=priority, arrival_time=arrival_time,
                   cache_salt=cache_salt, parent_request_id=parent_request_id)


def make_scheduler(*, num_blocks: int = 64, block_size: int = 4, max_num_batched_tokens: int = 64,
                   max_num_seqs: int = 16, max_model_len: int = 128, policy: str = "fcfs",
                   enable_prefix_caching: bool = True, long_prefill_token_threshold: int = 0,
                   num_swap_blocks: int = 0, num_offload_blocks: int = 0, preemption_mode: str = "swap",
                   costs: PreemptionCosts | None = None) -> Scheduler:
    """A scheduler; with swap or host-tier blocks, a KVOffload of that many host blocks (one byte per block)."""
    scheduler = _make_scheduler(num_blocks, block_size, max_num_batched_tokens, max_num_seqs, max_model_len,
                                policy, enable_prefix_caching, long_prefill_token_threshold)
    if num_swap_blocks or num_offload_blocks:
        install_kv_offload(scheduler, KVOffload(block_size, 1, num_swap_blocks, num_offload_blocks,
                                                preemption_mode, costs))
    return scheduler


def _make_scheduler(num_blocks, block_size, max_num_batched_tokens, max_num_seqs, max_model_len, policy,
                    enable_prefix_caching, long_prefill_token_threshold) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=max_model_len, policy=policy,
                        long_prefill_token_threshold=long_prefill_token_threshold),
        CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching, num_blocks=num_blocks),
    )


@dataclass
class _RunnerRequest:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class FakeRunner:
    """Executes SchedulerOutputs against a fake KV cache of (position, token) slots."""
    num_blocks: int
    block_size: int
    next_token: NextToken = hashed_next_token
    requests: dict[str, _RunnerRequest] = field(default_factory=dict)
    kv: list[list[tuple[int, int] | None]] = field(init=False)
    # Host blocks (swap space and host tier, core/kv_offload.py): id -> a copy of a device block's slots.
    host_kv: dict[int, list[tuple[int, int] | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kv = [[None] * self.block_size for _ in range(self.num_blocks)]

    @classmethod
    def for_scheduler(cls, scheduler: Scheduler, next_token: NextToken = hashed_next_token) -> "FakeRunner":
        return cls(scheduler.cache_config.num_blocks, scheduler.cache_config.block_size, next_token)

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        if output.kv_transfers is not None:  # device->host first, then host->device: as the real runner
            for device_block, host_block in output.kv_transfers.device_to_host:
                self.host_kv[host_block] = list(self.kv[device_block])
            for host_block, device_block in output.kv_transfers.host_to_device:
                self.kv[device_block] = list(self.host_kv[host_block])
        for req_id in output.finished_req_ids | output.preempted_req_ids:
            self.requests.pop(req_id, None)
        for new in output.scheduled_new_reqs:
            self.requests[new.req_id] = _RunnerRequest(
                new.prompt_token_ids + new.output_token_ids, list(new.block_ids), new.num_computed_tokens)
        for cached in output.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            assert state.num_computed_tokens == cached.num_computed_tokens, cached.req_id
            state.block_ids.extend(cached.new_block_ids)
        # Like real attention: every request's KV is written before anyone reads.
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            state = self.requests[req_id]
            for pos in range(state.num_computed_tokens, state.num_computed_tokens + num_tokens):
                block_id, offset = self._slot(state, pos)
                self.kv[block_id][offset] = (pos, state.token_ids[pos])
        sampled: dict[str, list[int]] = {}
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            state = self.requests[req_id]
            state.num_computed_tokens += num_tokens
            sampled[req_id] = []
            if state.num_computed_tokens >= len(state.token_ids):
                token = self.next_token(req_id, self._read_context(state))
                state.token_ids.append(token)
                sampled[req_id] = [token]
        return ModelRunnerOutput(req_ids=list(output.num_scheduled_tokens), sampled_token_ids=sampled)

    def _slot(self, state: _RunnerRequest, pos: int) -> tuple[int, int]:
        return state.block_ids[pos // self.block_size], pos % self.block_size

    def _read_context(self, state: _RunnerRequest) -> list[int]:
        context = []
        for pos in range(state.num_computed_tokens):
            block_id, offset = self._slot(state, pos)
            slot = self.kv[block_id][offset]
            assert slot is not None and slot[0] == pos, f"slot of position {pos} holds {slot}"
            context.append(slot[1])
        return context


@dataclass
class RunResult:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish_reasons: dict[str, str] = field(default_factory=dict)
    stop_reasons: dict[str, int | str | None] = field(default_factory=dict)
    outputs: list[list[EngineCoreOutput]] = field(default_factory=list)
    num_steps: int = 0


def run_step(scheduler: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    scheduler_output = scheduler.schedule()
    return scheduler_output, scheduler.update_from_output(scheduler_output, runner.execute(scheduler_output))


def run_to_completion(scheduler: Scheduler, runner: FakeRunner | None = None, max_steps: int = 1000) -> RunResult:
    """Steps until no request is left, then checks that every block went back to the pool."""
    runner = runner or FakeRunner.for_scheduler(scheduler)
    result = RunResult()
    while scheduler.has_unfinished_requests():
        assert result.num_steps < max_steps, "scheduler made no progress"
        scheduler_output, outputs = run_step(scheduler, runner)
        assert scheduler_output.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
        assert scheduler_output.num_reqs <= scheduler.max_num_seqs
        result.num_steps += 1
        result.outputs.append(outputs)
        for out in outputs:
            result.tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
            if out.finished:
                result.finish_reasons[out.req_id] = out.finish_reason
                result.stop_reasons[out.req_id] = out.stop_reason
    scheduler.kv_cache_manager.block_pool.check_all_free()
    if scheduler.kv_offload is not None:
        scheduler.kv_offload.take_transfers()  # host blocks freed in the last step are free from the next one
        scheduler.kv_offload.check_all_free()
    return result

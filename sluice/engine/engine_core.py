"""EngineCore: the loop body. Token ids in, token ids out; no text, no tokenizer.

    step():  scheduler.schedule() -> runner.execute() -> scheduler.update_from_output()

With async scheduling (the default on CUDA) one step is always in flight, so the GPU never waits
for the host's bookkeeping:

    step() t+1:  schedule(t+1)  ->  launch(t+1)  ->  collect(t)  ->  update_from_output(t)
                 (GPU runs t)       (queued behind t)  (waits for t)  (GPU runs t+1)

and the outputs a call returns are those of the previous step. The step is collected before the
next one launches when that one needs its samples on the host (bad words, a speculating engine's
verification), or when nothing else is scheduled; a speculating step is collected before the next
one is scheduled (a speculating engine runs asynchronously only the steps in which
``disable_by_batch_size`` turned speculation off). A step with structured outputs launches its
forward first and collects the previous step inside the runner's launch, just before its token
bitmask is filled (the matchers must have taken the previous samples): see DeferredGrammar.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from sluice.config import EngineConfig
from sluice.core.interface import EngineCoreOutput, SchedulerOutput
from sluice.core.kv_offload import KVOffload, install_kv_offload
from sluice.core.request import Request, RequestStatus
from sluice.core.scheduler import Scheduler
from sluice.engine.cpu_threads import set_cpu_threads
from sluice.engine.startup import StartupTimer
from sluice.stats import SchedulerStats
from sluice.structured_output import StructuredOutputManager
from sluice.structured_output.manager import DeferredGrammar, GrammarBitmask
from sluice.worker.model_runner import LaunchedStep, make_model_runner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineCoreInfo:
    """What only the core knows once it is up: the KV cache it sized, and the model it loaded.
    The clients hand it to the front end with ``config.with_kv_cache(num_kv_blocks)``."""
    num_kv_blocks: int
    num_parameters: int
    load_seconds: float
    kv_bytes_per_block: int
    startup_seconds: dict[str, float] = field(default_factory=dict)  # phase -> seconds (engine/startup.py)
    num_cpu_blocks: int = 0  # host KV blocks: swap space and the host prefix tier


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        """``config``: resolved by create_engine_config; ``self.config`` is it with the KV cache sized."""
        timer = StartupTimer()
        set_cpu_threads(config.model.cpu_threads)
        if config.parallel.tensor_parallel_size == 1:
            self.runner = make_model_runner(config)
        else:  # rank 0 here, ranks 1..N-1 in processes it starts: same calls (sluice/distributed/executor.py)
            from sluice.distributed.backends import make_tp_executor
            self.runner = make_tp_executor(config)
        timer.lap("config")
        self.runner.load_model()
        timer.lap("weights")
        num_blocks = self.runner.determine_num_kv_blocks(config.cache)
        timer.lap("profiling")
        self.runner.initialize_kv_cache(num_blocks)  # allocates the KV cache, then captures CUDA graphs
        timer.lap("graph_capture")
        timer.split_graph_capture(self.runner.graph_capture_seconds)
        num_host_blocks = self._host_kv_blocks(config)
        if num_host_blocks:
            self.runner.initialize_host_kv_cache(num_host_blocks)
        self.config = config.with_kv_cache(num_blocks, num_host_blocks)
        if self.config.max_model_len < config.max_model_len:
            logger.warning("The KV cache holds %d tokens, less than max_model_len=%d: requests stop at %d tokens",
                           self.config.num_kv_tokens, config.max_model_len, self.config.max_model_len)
        self.scheduler = Scheduler(self.config.scheduler, self.config.cache)
        if self.config.observability.kv_cache_metrics:
            from sluice.core.kv_metrics import install_kv_cache_metrics
            install_kv_cache_metrics(self.scheduler, self.config.observability.kv_cache_metrics_sample)
        if num_host_blocks:  # after the KV metrics, whose timed pool the host tier then watches
            self._install_kv_offload()
        if self.config.lora is not None:
            from sluice.lora.scheduling import LoRAAdmission
            self.scheduler.admission = LoRAAdmission(self.config.lora.max_loras, self.config.lora.fair_scheduling)
        self.info = EngineCoreInfo(num_blocks, self.runner.num_parameters, self.runner.load_seconds,
                                   self.runner.kv_spec.bytes_per_block, timer.phases, num_host_blocks)
        logger.info("engine core start-up: %s", timer.describe())
        # Structured outputs: grammars compile in its thread pool; it fills the bitmask of constrained rows.
        self.structured_output = StructuredOutputManager(self.config.model, self.config.structured_outputs.backend)
        self._async_scheduling = self.config.scheduler.async_scheduling
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None

    def _host_kv_blocks(self, config: EngineConfig) -> int:
        """Host blocks for swap space and the host prefix tier (0: both off)."""
        bytes_per_block = self.runner.kv_spec.bytes_per_block
        return (config.cache.swap_space_bytes + config.cache.kv_offload_space_bytes) // bytes_per_block

    def _install_kv_offload(self) -> None:
        cache = self.config.cache
        bytes_per_block = self.runner.kv_spec.bytes_per_block
        num_swap_blocks = cache.swap_space_bytes // bytes_per_block
        num_offload_blocks = cache.num_cpu_blocks - num_swap_blocks
        # A pooling request keeps per-chunk state in the runner (mean pooling's sums): it restarts from zero.
        swaps = num_swap_blocks and self.config.model.pooler_config is None
        mode = cache.preemption_mode if swaps else "recompute"
        costs = self.runner.measure_preemption_costs() if mode == "auto" else None
        if costs is not None:
            logger.info("preemption costs: matmul %.1f TFLOP/s, host<->device copies %.1f GB/s",
                        costs.matmul_flops_per_s / 1e12, costs.copy_bytes_per_s / 1e9)
        install_kv_offload(self.scheduler, KVOffload(cache.block_size, bytes_per_block, num_swap_blocks,
                                                     num_offload_blocks, mode, costs))

    def add_request(self, request: Request) -> None:
        if request.lora_request is not None:
            if self.runner.lora_manager is None:
                raise ValueError("lora_request needs an engine started with enable_lora=True")
            self.runner.lora_manager.add_adapter(request.lora_request)  # loads it now: a bad one fails here
        if request.sampling_params.structured_outputs is not None:
            self.structured_output.attach(request)
        try:
            self.scheduler.add_request(request)
        except BaseException:
            if request.structured_output is not None:
                request.structured_output.free()
            raise

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(list(request_ids), RequestStatus.FINISHED_ABORTED)

    def stop_requests(self, request_ids: Iterable[str]) -> None:
        """Ends requests the front end stopped (a stop string matched): status stop, blocks freed."""
        self.scheduler.finish_requests(list(request_ids), RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        verified: list[EngineCoreOutput] = []
        if self._in_flight is not None and self._in_flight[1].spec_out is not None:
            # A speculating step (it verified proposals, or makes the next ones) outputs a number of tokens
            # only its collection tells, and its proposals are the next step's: collected before the next
            # schedule.
            verified, self._in_flight = self._finish(self._in_flight), None
        return verified + self._step()

    def _step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        structured, requests = self.structured_output, self.scheduler.requests
        grammars = structured.step_grammars(requests, scheduler_output)
        if structured.num_active and scheduler_output.is_empty() and self._in_flight is None:
            structured.wait_for_compiles(0.01)  # only requests whose grammar is compiling: no busy loop
        if not self._async_scheduling:
            grammar = structured.grammar_bitmask(requests, grammars)
            return self.scheduler.update_from_output(scheduler_output,
                                                     self.runner.execute(scheduler_output, grammar))
        previous, self._in_flight = self._in_flight, None
        outputs: list[EngineCoreOutput] = []
        if previous is not None and (scheduler_output.is_empty() or self.runner.must_collect_first(scheduler_output)):
            outputs, previous = self._finish(previous), None
        if grammars and previous is not None:
            # The forward launches first; the runner asks for the bitmask once it is queued, and only then is
            # the previous step collected (advancing the matchers) and the bitmask filled, while the device runs.
            def make_bitmask(step: tuple[SchedulerOutput, LaunchedStep] = previous) -> GrammarBitmask | None:
                outputs.extend(self._finish(step))
                return structured.grammar_bitmask(requests, grammars)

            deferred = DeferredGrammar(make_bitmask)
            launched = self.runner.launch(scheduler_output, deferred)
            deferred.resolve()
        else:
            launched = self.runner.launch(scheduler_output, structured.grammar_bitmask(requests, grammars))
            if previous is not None:
                outputs = self._finish(previous)
        if scheduler_output.is_empty():
            outputs += self._finish((scheduler_output, launched))
        else:
            self._in_flight = (scheduler_output, launched)
        return outputs

    def _finish(self, step: tuple[SchedulerOutput, LaunchedStep]) -> list[EngineCoreOutput]:
        scheduler_output, launched = step
        return self.scheduler.update_from_output(scheduler_output, self.runner.collect(launched))

    def shutdown(self) -> None:
        """Stops tensor-parallel workers, if any (idempotent)."""
        if self.config.parallel.tensor_parallel_size > 1:
            self.runner.shutdown()

    def make_stats(self) -> SchedulerStats:
        stats = self.scheduler.make_stats()
        if self.config.lora is not None:
            from sluice.lora.scheduling import lora_stats
            stats.lora = lora_stats(self.config.lora.max_loras, self.scheduler.running, self.scheduler.waiting)
        return stats

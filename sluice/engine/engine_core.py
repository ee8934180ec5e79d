"""EngineCore: the loop body. Token ids in, token ids out; no text, no tokenizer.

    step():  scheduler.schedule() -> runner.execute() -> scheduler.update_from_output()

With async scheduling (the default on CUDA) one step is always in flight, so the GPU never waits
for the host's bookkeeping:

    step() t+1:  schedule(t+1)  ->  launch(t+1)  ->  collect(t)  ->  update_from_output(t)
                 (GPU runs t)       (queued behind t)  (waits for t)  (GPU runs t+1)

and the outputs a call returns are those of the previous step. The step is collected before the
next one launches when that one needs its samples on the host (bad words), or when nothing else
is scheduled.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from sluice.config import CacheConfig, EngineArgs, SchedulerConfig, resolve_batch_limits
from sluice.core.interface import EngineCoreOutput, SchedulerOutput
from sluice.core.request import Request, RequestStatus
from sluice.core.scheduler import Scheduler
from sluice.engine.startup import StartupTimer
from sluice.models.model_config import ModelConfig
from sluice.worker.model_runner import LaunchedStep, ModelRunner, is_large_gpu

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, model_config: ModelConfig, args: EngineArgs) -> None:
        timer = StartupTimer()
        self.model_config = model_config
        max_model_len = model_config.max_model_len
        device_type = torch.device(model_config.device).type
        limits = resolve_batch_limits(args, max_model_len, device_type,
                                      large_gpu=device_type == "cuda" and is_large_gpu(model_config.device))
        async_scheduling = args.async_scheduling if args.async_scheduling is not None else device_type == "cuda"
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=limits.max_num_seqs,
            max_num_batched_tokens=limits.max_num_batched_tokens,
            max_model_len=max_model_len,
            policy=args.scheduling_policy,
            async_scheduling=async_scheduling,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
        )
        self.runner = ModelRunner(model_config, args.block_size, limits.max_num_seqs,
                                  limits.max_num_batched_tokens, enforce_eager=args.enforce_eager)
        timer.lap("config")
        self.runner.load_model()
        timer.lap("weights")
        num_blocks = self.runner.determine_num_kv_blocks(
            args.num_kv_blocks, args.kv_cache_memory, args.gpu_memory_utilization)
        timer.lap("profiling")
        self.runner.initialize_kv_cache(num_blocks)  # allocates the KV cache, then captures CUDA graphs
        timer.lap("graph_capture")
        timer.split_graph_capture(self.runner)
        self.cache_config = CacheConfig(
            block_size=args.block_size,
            enable_prefix_caching=args.enable_prefix_caching,
            num_blocks=num_blocks,
        )
        self.scheduler = Scheduler(self.scheduler_config, self.cache_config)
        if getattr(args, "kv_cache_metrics", False):
            from sluice.core.kv_metrics import install_kv_cache_metrics
            install_kv_cache_metrics(self.scheduler, args.kv_cache_metrics_sample)
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None
        self.startup_seconds = timer.phases
        logger.info("engine core start-up: %s", timer.describe())

    @property
    def num_parameters(self) -> int:
        return self.runner.num_parameters

    @property
    def load_seconds(self) -> float:
        return self.runner.load_seconds

    @property
    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_spec.bytes_per_block

    @property
    def num_kv_tokens(self) -> int:
        return self.cache_config.num_blocks * self.cache_config.block_size

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(list(request_ids), RequestStatus.FINISHED_ABORTED)

    def stop_requests(self, request_ids: Iterable[str]) -> None:
        """Ends requests the front end stopped (a stop string matched): status stop, blocks freed."""
        self.scheduler.finish_requests(list(request_ids), RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        if not self.scheduler_config.async_scheduling:
            return self.scheduler.update_from_output(scheduler_output, self.runner.execute(scheduler_output))
        previous, self._in_flight = self._in_flight, None
        outputs: list[EngineCoreOutput] = []
        if previous is not None and (scheduler_output.is_empty() or self.runner.must_collect_first(scheduler_output)):
            outputs, previous = self._finish(previous), None
        launched = self.runner.launch(scheduler_output)
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

    def make_stats(self):
        return self.scheduler.make_stats()

"""EngineCore: the loop body. Token ids in, token ids out; no text, no tokenizer.

    step():  scheduler.schedule() -> runner.execute() -> scheduler.update_from_output()
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from sluice.config import CacheConfig, EngineArgs, SchedulerConfig, default_max_num_batched_tokens
from sluice.core.interface import EngineCoreOutput
from sluice.core.request import Request, RequestStatus
from sluice.core.scheduler import Scheduler
from sluice.models.model_config import ModelConfig
from sluice.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, model_config: ModelConfig, args: EngineArgs) -> None:
        self.model_config = model_config
        max_model_len = model_config.max_model_len
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=default_max_num_batched_tokens(args, max_model_len),
            max_model_len=max_model_len,
            policy=args.scheduling_policy,
        )
        self.runner = ModelRunner(model_config, args.block_size, args.max_num_seqs,
                                  self.scheduler_config.max_num_batched_tokens, enforce_eager=args.enforce_eager)
        self.runner.load_model()
        num_blocks = self.runner.determine_num_kv_blocks(
            args.num_kv_blocks, args.kv_cache_memory, args.gpu_memory_utilization)
        self.runner.initialize_kv_cache(num_blocks)
        self.cache_config = CacheConfig(
            block_size=args.block_size,
            enable_prefix_caching=args.enable_prefix_caching,
            num_blocks=num_blocks,
        )
        self.scheduler = Scheduler(self.scheduler_config, self.cache_config)

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
        runner_output = self.runner.execute(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def make_stats(self):
        return self.scheduler.make_stats()

"""Offline throughput of the sluice engine on a list of BenchRequests, through the public ``LLM`` API.

Every request samples with temperature 1.0 and top_p 1.0, ignores eos and asks for exactly its ``output_len``
tokens (a request with a JSON schema, W7 or ``--structured-fraction``, ends earlier when its JSON is complete). The clock runs from the first ``add_request`` to the last finished output (``LLM.generate`` covers both),
after an untimed warmup of a few short requests (kernel compilation and CUDA graph capture are start-up cost, not
throughput). A stat logger attached to the engine records how many output tokens each step produced: their mean
is the average decode batch the roofline uses.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sluice.bench.compile_log import CompileLog
from sluice.bench.datasets import BenchRequest
from sluice.config import EngineArgs
from sluice.engine.stats import IterationStats, SchedulerStats

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ThroughputResult:
    """One contender's run over a list of requests; tokens per second count useful tokens only."""
    name: str
    num_requests: int
    elapsed_s: float
    prompt_tokens: int
    output_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_requests(cls, name: str, requests: Sequence[BenchRequest], elapsed_s: float,
                      output_tokens: int | None = None, extra: dict[str, Any] | None = None) -> "ThroughputResult":
        expected = sum(r.output_len for r in requests)
        if output_tokens is not None and output_tokens != expected:
            logger.warning("%s produced %d output tokens, the requests asked for %d", name, output_tokens, expected)
        return cls(name, len(requests), elapsed_s, sum(len(r.prompt_token_ids) for r in requests),
                   expected if output_tokens is None else output_tokens, dict(extra or {}))

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    def to_dict(self) -> dict[str, Any]:
        return {"num_requests": self.num_requests, "elapsed_s": self.elapsed_s,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "requests_per_s": self.requests_per_s, "output_tokens_per_s": self.output_tokens_per_s,
                "total_tokens_per_s": self.total_tokens_per_s, **self.extra}


class StepRecorder:
    """A StatLogger that counts engine steps that produced output tokens, and prefix-cache hits."""

    def __init__(self, baseline: SchedulerStats | None = None) -> None:
        # Scheduler counters are cumulative since the engine started: keep the warmup's out.
        self._baseline = baseline or SchedulerStats()
        self.decode_steps = 0
        self.generation_tokens = 0
        self.decode_batches: Counter[int] = Counter()  # output tokens in a step -> steps (the roofline's input)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0
        self.kv_offload: dict[str, int] | None = None  # swap and host-tier counters, with either on

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats) -> None:
        if iteration_stats.num_generation_tokens:
            self.decode_steps += 1
            self.generation_tokens += iteration_stats.num_generation_tokens
            self.decode_batches[iteration_stats.num_generation_tokens] += 1
        self.prefix_cache_queries = scheduler_stats.prefix_cache_queries - self._baseline.prefix_cache_queries
        self.prefix_cache_hits = scheduler_stats.prefix_cache_hits - self._baseline.prefix_cache_hits
        self.num_preemptions = scheduler_stats.num_preemptions - self._baseline.num_preemptions
        if scheduler_stats.kv_offload is not None:
            base = self._baseline.kv_offload
            self.kv_offload = {f.name: getattr(scheduler_stats.kv_offload, f.name) - (getattr(base, f.name) if base else 0)
                               for f in dataclasses.fields(scheduler_stats.kv_offload)}

    @property
    def avg_batch(self) -> float:
        """Output tokens per step that produced any: the batch a decode step ran at, on average."""
        return self.generation_tokens / self.decode_steps if self.decode_steps else 0.0


@dataclass(slots=True)
class EngineRun:
    result: ThroughputResult
    avg_batch: float
    decode_batches: dict[int, int]
    model_config: Any  # sluice.models.model_config.ModelConfig
    num_kv_blocks: int
    block_size: int  # tokens per KV block
    output_lens: list[int] = dataclasses.field(default_factory=list)  # tokens each request generated, in order


def sampling_params_for(requests: Sequence[BenchRequest], detokenize: bool) -> list[Any]:
    from sluice.sampling_params import SamplingParams, StructuredOutputsParams

    return [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=r.output_len,
                           detokenize=detokenize,
                           structured_outputs=StructuredOutputsParams(json=r.json_schema) if r.json_schema else None)
            for r in requests]


def warmup_requests(requests: Sequence[BenchRequest], num_warmup: int) -> list[BenchRequest]:
    """The untimed requests before the clock: the first ``num_warmup`` with at most 8 output tokens, and, where
    some requests are constrained, 16 constrained ones whose outputs end one step apart. The grammar bitmask
    kernel is specialised on its row count (1, a multiple of 16, any other), so those run it at each, and they
    compile the workload's first schemas. Prompts are reversed: the same lengths, but no block the timed run
    could find in the prefix cache."""
    warmup = [BenchRequest(r.prompt_token_ids[::-1], min(r.output_len, 8), r.json_schema)
              for r in requests[:num_warmup]]
    structured = [r for r in requests if r.json_schema is not None][:16]
    warmup += [BenchRequest(r.prompt_token_ids[::-1], min(r.output_len, i + 1), r.json_schema)
               for i, r in enumerate(structured)]
    return warmup


def run_sluice(engine_args: EngineArgs, requests: Sequence[BenchRequest], name: str = "sluice",
               detokenize: bool = True, num_warmup: int = 4, use_tqdm: bool = True,
               lora_requests: Sequence[Any] | None = None) -> EngineRun:
    """Loads the engine, warms it up, and times ``LLM.generate`` over ``requests``. The engine is dropped after.
    ``lora_requests``: each request's adapter (LoRARequest or None), for an engine with LoRA enabled."""
    from sluice.llm import LLM

    kwargs = {f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args)
              if not f.name.startswith("_")}
    llm = LLM(**kwargs)
    engine = llm.llm_engine
    if lora_requests:  # every adapter loaded (and its kernels compiled) before the clock starts
        num_warmup = max(num_warmup, len({id(r) for r in lora_requests if r is not None}))
    if num_warmup:
        warmup = warmup_requests(requests, num_warmup)
        warmup_loras = None
        if lora_requests:
            warmup_loras = list(lora_requests[:num_warmup])
            warmup_loras += [None] * (len(warmup) - len(warmup_loras))
        llm.generate(_prompts(warmup), sampling_params_for(warmup, detokenize), use_tqdm=False,
                     lora_request=warmup_loras)
    recorder = StepRecorder(engine.engine_core.make_stats())
    engine.stat_loggers.append(recorder)
    prompts, params = _prompts(requests), sampling_params_for(requests, detokenize)
    _sync(engine.model_config.device)
    with CompileLog() as compiles:  # a compile in the timed run is a stall that start-up should have paid
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=use_tqdm,
                               lora_request=list(lora_requests) if lora_requests else None)
        _sync(engine.model_config.device)
        elapsed = time.perf_counter() - start
    engine.stat_loggers.remove(recorder)
    if compiles.events:
        logger.warning("%d Triton kernel variants were built during the timed run (%.1f s of stalls): %s",
                       len(compiles.events), compiles.seconds,
                       ", ".join(sorted({event["kernel"] for event in compiles.events})))
    output_lens = [len(o.outputs[0].token_ids) for o in outputs]
    generated = sum(output_lens)
    cache_hit_rate = recorder.prefix_cache_hits / recorder.prefix_cache_queries if recorder.prefix_cache_queries else 0.0
    extra = {"enable_prefix_caching": engine_args.enable_prefix_caching, "enable_lora": engine_args.enable_lora,
             "avg_batch": recorder.avg_batch,
             "prefix_cache_hit_rate": cache_hit_rate, "num_preemptions": recorder.num_preemptions,
             "triton_compiles_during_run": len(compiles.events), "triton_compile_s": compiles.seconds}
    if recorder.kv_offload is not None:
        extra["kv_offload"] = recorder.kv_offload  # swapped and recomputed preemptions, bytes each way
    run = EngineRun(ThroughputResult.from_requests(name, requests, elapsed, output_tokens=generated, extra=extra),
                    recorder.avg_batch, dict(recorder.decode_batches), engine.model_config, engine.config.cache.num_blocks,
                    engine.config.cache.block_size, output_lens)
    del outputs, engine, llm
    free_device_memory()
    return run


def free_device_memory() -> None:
    """Returns freed device memory to the allocator's pool, so that the next contender can load (call it after
    dropping the last reference to the previous one)."""
    import gc

    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prompts(requests: Sequence[BenchRequest]) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()

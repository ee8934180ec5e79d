"""Every engine flag, defined once: EngineArgs feeds the CLI, ``LLM(...)`` and the server.

``EngineArgs.add_cli_args`` turns the dataclass fields into vLLM-named flags
(``max_num_seqs`` -> ``--max-num-seqs``); ``create_engine_config`` validates them and
freezes them into the configs the engine parts read.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_POLICIES = ("fcfs", "priority")
_DEVICES = ("auto", "cpu", "cuda")
_USAGE_CONTEXTS = ("llm", "server")


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    load_format: str = "auto"
    device: str = "auto"
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes of KV cache on CPU; default 1 GiB
    num_kv_blocks: int | None = None  # overrides the size computed from memory (vLLM: num_gpu_blocks_override)
    swap_space: float = 0.0  # GiB of CPU memory for swapped-out KV blocks
    max_num_seqs: int | None = None  # default: 1024 on GPUs with 70 GiB or more (not A100), else 256
    max_num_batched_tokens: int | None = None
    long_prefill_token_threshold: int = 0
    scheduling_policy: str = "fcfs"
    max_logprobs: int = 20
    enforce_eager: bool = False
    async_scheduling: bool | None = None  # default: on for CUDA
    tensor_parallel_size: int = 1
    disable_log_stats: bool = False
    kv_cache_metrics: bool = False  # sample KV block lifetimes (sluice/core/kv_metrics.py)
    kv_cache_metrics_sample: float = 0.01
    otlp_traces_endpoint: str | None = None  # OpenTelemetry tracing (sluice/tracing.py)
    collect_detailed_traces: str | None = None
    # Not a flag: who drives the engine ("llm": offline LLM, "server": the API server); picks batch defaults.
    usage_context: str = "llm"

    # Help text per flag, shown by `sluice ... --help`.
    _HELP = {
        "model": "HF model folder (config.json + *.safetensors) or a .gguf file; default: the embedded SmolLM2-135M-Instruct",
        "tokenizer": "tokenizer folder, if not the model's",
        "served_model_name": "model name reported by the API (default: the model path)",
        "dtype": "weights and activations dtype; auto = the checkpoint's dtype (float32 on CPU for float16 checkpoints)",
        "seed": "seed for dummy weights and for requests that give no seed",
        "max_model_len": "longest prompt + output in tokens (default: the model's context length)",
        "load_format": "auto, safetensors, gguf, or dummy (random weights, for benchmarks)",
        "device": "auto (cuda when available), cpu or cuda",
        "block_size": "tokens per KV cache block",
        "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes",
        "gpu_memory_utilization": "fraction of GPU memory for weights, activations and KV cache",
        "kv_cache_memory": "bytes of KV cache when running on the CPU",
        "num_kv_blocks": "number of KV blocks, overriding the memory-based size",
        "swap_space": "GiB of CPU memory for preempted requests' KV blocks (not supported yet: must be 0)",
        "max_num_seqs": "most requests in one step (default 1024 on GPUs of 70 GiB or more except A100, else 256)",
        "max_num_batched_tokens": "token budget of one step (default: 16384 offline / 8192 serving on GPUs of 70 GiB "
                                  "or more except A100; 8192 / 2048 on other GPUs; 2048 on CPU)",
        "long_prefill_token_threshold": "most tokens of one prompt per step, so long prompts do not stall "
                                        "running streams (0: only the step budget limits them)",
        "scheduling_policy": "fcfs or priority (lower value first)",
        "max_logprobs": "largest logprobs / prompt_logprobs a request may ask for",
        "enforce_eager": "never capture CUDA graphs",
        "async_scheduling": "schedule step t+1 while step t runs on the GPU (default: on for CUDA)",
        "tensor_parallel_size": "GPUs to shard the model over",
        "disable_log_stats": "do not log engine stats",
        "kv_cache_metrics": "export KV block lifetime, idle-before-eviction and reuse-gap histograms",
        "kv_cache_metrics_sample": "fraction of KV blocks timed by --kv-cache-metrics",
        "otlp_traces_endpoint": "send one OpenTelemetry span per request to this OTLP endpoint "
                                "(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, _HEADERS, OTEL_SERVICE_NAME... apply)",
        "collect_detailed_traces": "also send a span per engine step: model, worker or all (needs "
                                   "--otlp-traces-endpoint)",
    }
    _NOT_FLAGS = {"usage_context"}
    _CHOICES = {"dtype": _DTYPES, "load_format": _LOAD_FORMATS,
                "scheduling_policy": _POLICIES, "device": _DEVICES}

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, model_positional: bool = False) -> argparse.ArgumentParser:
        group = parser.add_argument_group("engine")
        for f in dataclasses.fields(cls):
            if f.name.startswith("_") or f.name in cls._NOT_FLAGS or (model_positional and f.name == "model"):
                continue
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"default": f.default, "help": cls._HELP.get(f.name, "")}
            if f.type in ("bool", bool, "bool | None"):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _flag_type(f.type)
                if f.name in cls._CHOICES:
                    kwargs["choices"] = cls._CHOICES[f.name]
            group.add_argument(flag, dest=f.name, **kwargs)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    def validate(self) -> None:
        for name, choices in self._CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.usage_context not in _USAGE_CONTEXTS:
            raise ValueError(f"usage_context must be one of {', '.join(_USAGE_CONTEXTS)}, got {self.usage_context!r}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be 0 or more, got {self.long_prefill_token_threshold}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be non-negative, got {self.swap_space}")
        if self.swap_space > 0:
            raise ValueError("swap_space > 0 (swapping preempted requests' KV to the CPU) is not supported yet: "
                             "preempted requests are recomputed, usually from the prefix cache")
        if not 0.0 < self.kv_cache_metrics_sample <= 1.0:
            raise ValueError(f"kv_cache_metrics_sample must be in (0, 1], got {self.kv_cache_metrics_sample}")
        if self.collect_detailed_traces is not None:
            unknown = set(self.collect_detailed_traces.split(",")) - {"model", "worker", "all"}
            if unknown:
                raise ValueError(f"collect_detailed_traces takes model, worker or all, got {sorted(unknown)}")
            if not self.otlp_traces_endpoint:
                raise ValueError("collect_detailed_traces needs otlp_traces_endpoint (--otlp-traces-endpoint)")
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not supported yet")


def _flag_type(type_str: Any):
    text = str(type_str)
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    policy: str = "fcfs"
    async_scheduling: bool = False
    long_prefill_token_threshold: int = 0


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    enable_prefix_caching: bool
    num_blocks: int  # decided once the model is loaded and memory measured
    swap_space_bytes: int = 0
    num_cpu_blocks: int = 0


@dataclass(frozen=True)
class BatchLimits:
    max_num_seqs: int
    max_num_batched_tokens: int


def resolve_batch_limits(args: EngineArgs, max_model_len: int, device_type: str, large_gpu: bool) -> BatchLimits:
    """``max_num_seqs`` and ``max_num_batched_tokens``, where not given, as vLLM picks them.

        device                      max_num_seqs   max_num_batched_tokens (offline LLM / server)
        GPU >= 70 GiB, not A100     1024           16384 / 8192
        other GPUs                  256            8192 / 2048
        CPU                         256            2048 (max_model_len, at least 512, if shorter)
    """
    serving = args.usage_context == "server"
    if device_type == "cuda" and large_gpu:
        seqs, tokens = 1024, (8192 if serving else 16384)
    elif device_type == "cuda":
        seqs, tokens = 256, (2048 if serving else 8192)
    else:
        seqs, tokens = 256, (2048 if max_model_len >= 2048 else max(max_model_len, 512))
    return BatchLimits(
        max_num_seqs=args.max_num_seqs if args.max_num_seqs is not None else seqs,
        max_num_batched_tokens=args.max_num_batched_tokens if args.max_num_batched_tokens is not None else tokens)

"""Every engine flag, defined once, and the one resolved, frozen EngineConfig.

    EngineArgs (CLI flags, LLM(...) kwargs)
        -- create_engine_config(args) -->  EngineConfig          (once, before the engine core starts)
                                             model:     ModelConfig      checkpoint, dtype, tokenizer, vocab
                                             cache:     CacheConfig      block size, prefix caching, KV sizing
                                             scheduler: SchedulerConfig  batch limits, policy, max_model_len
                                             parallel:  ParallelConfig   tensor parallel size
                                             device:    DeviceConfig     the device probe (type, name, memory)
                                             observability: ObservabilityConfig  KV block timings, tracing
                                             structured_outputs: StructuredOutputsConfig  grammar backend
        -- the core sizes its KV cache --> config.with_kv_cache(num_blocks)   (cache.num_blocks set,
                                             scheduler.max_model_len capped at the KV cache's capacity)

Every default is decided in ``create_engine_config``, the device probe included (``probe_device``, which
reads the GPU through NVML so the front-end process never opens a CUDA context). The engine core gets
the resolved config and reports the numbers only it can know (KV blocks) in its ready message; the
front end (LLMEngine, AsyncLLM, the server's limits) validates against the config the client hands back
after that. Defaults that depend on the device live in ``BATCH_DEFAULTS``: the flags' help text, the
resolution and the README's table (checked by tests/engine/test_config.py) all read them.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sluice.core.kv_layer_groups import KVLayerGroup
    from sluice.spec_decode.config import SpeculativeConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
POLICIES = ("fcfs", "priority")
DEVICES = ("auto", "cpu", "cuda")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # vLLM's choices; fp8_e5m2 is refused (validate)
USAGE_CONTEXTS = ("llm", "server")
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
LARGE_GPU_MIN_BYTES = 70 * 2**30


# ---- defaults that depend on the device: written once ------------------------------------------------------
@dataclass(frozen=True)
class BatchDefaults:
    """vLLM's batch defaults for one class of device."""
    max_num_seqs: int
    max_num_batched_tokens_offline: int  # LLM(...)
    max_num_batched_tokens_served: int  # sluice serve


BATCH_DEFAULTS = {
    "large_gpu": BatchDefaults(1024, 16384, 8192),  # 70 GiB or more, not an A100
    "gpu": BatchDefaults(256, 8192, 2048),
    "cpu": BatchDefaults(256, 2048, 2048),  # shrunk to max_model_len (at least 512) for short contexts
}
_L, _G, _C = BATCH_DEFAULTS["large_gpu"], BATCH_DEFAULTS["gpu"], BATCH_DEFAULTS["cpu"]

# What the README's engine-flag table says a default is, where the field's value alone does not say it.
DEFAULT_DESCRIPTIONS = {
    "model": "embedded SmolLM2-135M-Instruct",
    "max_model_len": "model context",
    "max_num_seqs": f"{_L.max_num_seqs} on GPUs of 70 GiB or more (not A100), else {_G.max_num_seqs}",
    "max_num_batched_tokens": (f"{_L.max_num_batched_tokens_offline} offline / {_L.max_num_batched_tokens_served} "
                               f"served on those GPUs; {_G.max_num_batched_tokens_offline} / "
                               f"{_G.max_num_batched_tokens_served} on others; {_C.max_num_batched_tokens_offline} "
                               "on CPU"),
    "long_prefill_token_threshold": "0 (off)",
    "max_cpu_loras": "max-loras",
    "async_scheduling": "on for CUDA",
    "num_kv_blocks": "from memory",
    "kv_cache_memory": f"{DEFAULT_CPU_KV_CACHE_BYTES // 2**30} GiB",
}


def default_description(name: str) -> str:
    """An EngineArgs field's default as the README and ``--help`` state it."""
    if name in DEFAULT_DESCRIPTIONS:
        return DEFAULT_DESCRIPTIONS[name]
    value = next(f.default for f in dataclasses.fields(EngineArgs) if f.name == name)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


# ---- the flags ---------------------------------------------------------------------------------------------
@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    served_model_name: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    load_format: str = "auto"
    quantization: str | None = None  # fp8 | awq | gptq | compressed-tensors | rtn (sluice/layers/quantization/)
    device: str = "auto"
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 | fp8_e4m3 (sluice/attention/kv_quant.py)
    calculate_kv_scales: bool = False  # fp8 KV scales from the first step's K and V (amax / 448)
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes of KV cache on CPU; default 1 GiB
    num_kv_blocks: int | None = None  # overrides the size computed from memory (vLLM: num_gpu_blocks_override)
    swap_space: float = 0.0  # GiB of host memory (pinned on CUDA) for preempted requests' KV blocks
    kv_offload_space: float = 0.0  # GiB of host memory for a prefix-cache tier below the device pool
    preemption_mode: str = "auto"  # auto | recompute | swap (core/kv_offload.py)
    max_num_seqs: int | None = None  # default: BATCH_DEFAULTS
    max_num_batched_tokens: int | None = None  # default: BATCH_DEFAULTS
    long_prefill_token_threshold: int = 0
    scheduling_policy: str = "fcfs"
    max_logprobs: int = 20
    enforce_eager: bool = False
    async_scheduling: bool | None = None  # default: on for CUDA
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1  # engine cores, each a full replica in its own process (engine/dp_client.py)
    pipeline_parallel_size: int = 1  # only 1: pipeline parallelism is not implemented
    distributed_executor_backend: str = "mp"  # mp | ray: how ranks 1..N-1 of tensor parallelism are started
    disable_log_stats: bool = False
    cpu_threads: int | None = None  # torch threads of the process running the model on the CPU
    runner: str = "auto"  # auto | generate | pooling (embeddings); see sluice/pooling/config.py
    task: str = "auto"  # auto | generate | embed (vLLM's older flag: embed means runner pooling)
    kv_cache_metrics: bool = False  # sample KV block lifetimes (sluice/core/kv_metrics.py)
    kv_cache_metrics_sample: float = 0.01
    otlp_traces_endpoint: str | None = None  # OpenTelemetry tracing (sluice/tracing.py)
    collect_detailed_traces: str | None = None
    enable_lora: bool = False  # serve LoRA adapters (sluice/lora/)
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # default: max_loras
    lora_scheduling: str = "fair"  # fair | fcfs: the order waiting requests of different adapters start in
    structured_outputs_backend: str = "xgrammar"  # auto | xgrammar | guidance (sluice/structured_output/)
    # Speculative decoding (sluice/spec_decode/): vLLM's JSON, a string on the command line or a dict.
    speculative_config: str | dict | None = None
    # Not a flag: who drives the engine ("llm": offline LLM, "server": the API server); picks batch defaults.
    usage_context: str = "llm"

    # Help text per flag, shown by `sluice ... --help`; device-dependent defaults come from DEFAULT_DESCRIPTIONS.
    _HELP = {
        "model": "HF model folder (config.json + *.safetensors) or a .gguf file; default: the embedded SmolLM2-135M-Instruct",
        "tokenizer": "tokenizer folder, if not the model's",
        "skip_tokenizer_init": "load no tokenizer: prompts are token ids, outputs carry token ids and empty text",
        "served_model_name": "model name reported by the API (default: the model path)",
        "dtype": "weights and activations dtype; auto = the checkpoint's dtype (on CPU, 16-bit checkpoints run in bfloat16 where the CPU has native bf16, else float32)",
        "seed": "seed for dummy weights and for requests that give no seed",
        "max_model_len": "longest prompt + output in tokens (default: the model's context length)",
        "load_format": "auto, safetensors, gguf, or dummy (random weights, for benchmarks)",
        "quantization": "fp8 or rtn (4-bit weights; both quantize a 16/32-bit checkpoint at load), awq, gptq or "
                        "compressed-tensors; "
                        "default: the checkpoint's quantization_config, if any",
        "device": "auto (cuda when available), cpu or cuda",
        "block_size": "tokens per KV cache block",
        "kv_cache_dtype": "KV cache element type: auto (the model's dtype) or fp8 / fp8_e4m3 (float8_e4m3fn with "
                          "a per-layer K and V scale from the checkpoint, else 1.0; half the bytes, twice the "
                          "blocks; CUDA needs compute capability 8.9+)",
        "calculate_kv_scales": "with --kv-cache-dtype fp8: set each layer's K and V scales from the first step's "
                               "K and V (amax / 448) instead of the checkpoint's or 1.0",
        "enable_prefix_caching": "reuse KV blocks of shared prompt prefixes",
        "gpu_memory_utilization": "fraction of GPU memory for weights, activations and KV cache",
        "kv_cache_memory": "bytes of KV cache when running on the CPU",
        "num_kv_blocks": "number of KV blocks, overriding the memory-based size",
        "swap_space": "GiB of host memory (pinned on CUDA) for preempted requests' KV blocks: a preempted request "
                      "swaps its KV out instead of recomputing it when --preemption-mode says so",
        "kv_offload_space": "GiB of host memory for a prefix-cache tier: full KV blocks evicted from the device "
                            "cache are kept there (LRU) and copied back on a prefix hit (0: off)",
        "preemption_mode": "recompute, swap, or auto: per preempted request, whichever start-up measured as "
                           "cheaper (prefill FLOPs at the matmul rate vs. KV bytes over the copy bandwidth); "
                           "swap needs --swap-space, and falls back to recompute when it is full",
        "max_num_seqs": f"most requests in one step (default {DEFAULT_DESCRIPTIONS['max_num_seqs']})",
        "max_num_batched_tokens": f"token budget of one step (default: {DEFAULT_DESCRIPTIONS['max_num_batched_tokens']})",
        "long_prefill_token_threshold": "most tokens of one prompt per step, so long prompts do not stall "
                                        "running streams (0: only the step budget limits them)",
        "scheduling_policy": "fcfs or priority (lower value first)",
        "max_logprobs": "largest logprobs / prompt_logprobs a request may ask for",
        "enforce_eager": "never capture CUDA graphs",
        "async_scheduling": "schedule step t+1 while step t runs on the GPU (default: on for CUDA)",
        "tensor_parallel_size": "ranks (GPUs; processes on the CPU) to shard the model over: attention heads, "
                                "MLP and vocabulary split across them (sluice/distributed/)",
        "data_parallel_size": "engine cores (full model replicas, each its own process and devices) behind the "
                              "front end; requests are routed by prompt prefix and load",
        "pipeline_parallel_size": "only 1: pipeline parallelism is not supported (use --tensor-parallel-size)",
        "distributed_executor_backend": "mp: ranks 1..N-1 of tensor parallelism are processes the engine core "
                                        "spawns; ray: Ray actors in a placement group (joins RAY_ADDRESS "
                                        "or this process's Ray, else starts a local one)",
        "disable_log_stats": "do not log engine stats",
        "cpu_threads": "torch threads for the model on the CPU (default: $SLUICE_CPU_THREADS, else "
                       "$OMP_NUM_THREADS, else the physical cores)",
        "runner": "generate (completions, chat) or pooling (embeddings); auto: pooling for sentence-transformers "
                  "folders (modules.json) and bare *Model architectures",
        "task": "embed is --runner pooling, generate is --runner generate (vLLM's older flag)",
        "kv_cache_metrics": "export KV block lifetime, idle-before-eviction and reuse-gap histograms",
        "kv_cache_metrics_sample": "fraction of KV blocks timed by --kv-cache-metrics",
        "otlp_traces_endpoint": "send one OpenTelemetry span per request to this OTLP endpoint "
                                "(OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, _HEADERS, OTEL_SERVICE_NAME... apply)",
        "collect_detailed_traces": "also send a span per engine step: model, worker or all (needs "
                                   "--otlp-traces-endpoint)",
        "enable_lora": "serve PEFT LoRA adapters (LoRARequest offline; the request's model name on the server)",
        "max_loras": "most distinct LoRA adapters in one step (device slots)",
        "max_lora_rank": "largest LoRA rank an adapter may have",
        "max_cpu_loras": "LoRA adapters kept loaded in host memory (default: --max-loras)",
        "lora_scheduling": "fair: waiting requests start in per-adapter fair order (an adapter with many "
                           "requests cannot starve one with few); fcfs: arrival order (fair needs the fcfs policy)",
        "structured_outputs_backend": "grammar library for structured outputs (response_format, guided_json...): "
                                      "xgrammar, guidance (llguidance), or auto (xgrammar, llguidance for what "
                                      "xgrammar refuses)",
        "speculative_config": "speculative decoding, as JSON: {\"method\": \"ngram\", \"num_speculative_tokens\": "
                              "4, \"prompt_lookup_min\": 2, \"prompt_lookup_max\": 5} or {\"model\": DRAFT_FOLDER, "
                              "\"num_speculative_tokens\": 3} or {\"method\": \"eagle3\", \"model\": HEAD_FOLDER, "
                              "\"num_speculative_tokens\": 3}; optional \"disable_by_batch_size\"",
    }
    _NOT_FLAGS = {"usage_context"}
    _CHOICES = {"dtype": DTYPES, "load_format": LOAD_FORMATS, "scheduling_policy": POLICIES, "device": DEVICES,
                "kv_cache_dtype": KV_CACHE_DTYPES,
                "runner": ("auto", "generate", "pooling"), "task": ("auto", "generate", "embed"),
                "preemption_mode": ("auto", "recompute", "swap"),
                "lora_scheduling": ("fair", "fcfs"),

                "structured_outputs_backend": ("auto", "xgrammar", "guidance")}

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
        if self.quantization in ("None", "none", ""):
            self.quantization = None
        from sluice.layers.quantization import QUANTIZATION_METHODS
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} or None, "
                             f"got {self.quantization!r}")
        for name, choices in self._CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.kv_cache_dtype == "fp8_e5m2":
            raise ValueError("kv_cache_dtype fp8_e5m2 is not supported: use fp8 (float8_e4m3fn with per-layer scales)")
        if self.calculate_kv_scales and self.kv_cache_dtype == "auto":
            raise ValueError("calculate_kv_scales needs an fp8 KV cache (--kv-cache-dtype fp8)")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.usage_context not in USAGE_CONTEXTS:
            raise ValueError(f"usage_context must be one of {', '.join(USAGE_CONTEXTS)}, got {self.usage_context!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be 0 or more, got {self.long_prefill_token_threshold}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("swap_space", "kv_offload_space"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.preemption_mode == "swap" and not self.swap_space:
            raise ValueError("preemption_mode swap needs swap_space (--swap-space GiB) above 0")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {self.cpu_threads}")
        if not 0.0 < self.kv_cache_metrics_sample <= 1.0:
            raise ValueError(f"kv_cache_metrics_sample must be in (0, 1], got {self.kv_cache_metrics_sample}")
        if self.collect_detailed_traces is not None:
            unknown = set(self.collect_detailed_traces.split(",")) - {"model", "worker", "all"}
            if unknown:
                raise ValueError(f"collect_detailed_traces takes model, worker or all, got {sorted(unknown)}")
            if not self.otlp_traces_endpoint:
                raise ValueError("collect_detailed_traces needs otlp_traces_endpoint (--otlp-traces-endpoint)")
        if self.tensor_parallel_size != 1:
            from sluice.distributed.support import check_parallel_args
            check_parallel_args(self)
        if self.pipeline_parallel_size != 1:
            raise ValueError(f"pipeline_parallel_size must be 1, got {self.pipeline_parallel_size}: pipeline "
                             "parallelism is not supported (tensor_parallel_size shards the model instead)")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be at least 1, got {self.data_parallel_size}")
        if self.enable_lora:
            for name in ("max_loras", "max_lora_rank"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
            if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
                raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")


def _flag_type(type_str: Any):
    text = str(type_str)
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


# ---- the resolved sections -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    model: str  # resolved path
    tokenizer: str
    served_model_name: str
    hf_config: Any  # transformers.PretrainedConfig
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str  # "cpu" | "cuda"
    max_model_len: int  # as asked (or the model's context); the scheduler's may be capped by the KV cache
    vocab_size: int
    is_gguf: bool
    load_format: str
    seed: int
    quantization: str | None = None  # the flag; the checkpoint's quantization_config applies regardless
    skip_tokenizer_init: bool = False
    max_logprobs: int = 20
    enforce_eager: bool = False
    cpu_threads: int | None = None  # torch threads of the process running the model on the CPU
    # Set for pooling (embedding) engines: --runner pooling / --task embed, or a sentence-transformers folder.
    pooler_config: Any = None  # sluice.pooling.config.PoolerConfig | None

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        from sluice.models.model_config import hf_num_kv_heads
        return hf_num_kv_heads(self.hf_config)

    @property
    def head_dim(self) -> int:
        from sluice.models.model_config import hf_head_dim
        return hf_head_dim(self.hf_config)

    @property
    def context_length(self) -> int:
        from sluice.models.model_config import hf_context_length
        return hf_context_length(self.hf_config)

    @property
    def kv_layer_groups(self) -> "tuple[KVLayerGroup, ...] | None":
        """The layer groups of a model mixing windowed and global layers (one block table each), else None."""
        from sluice.core.kv_layer_groups import is_hybrid, kv_layer_groups
        from sluice.models.model_config import hf_layer_sliding_windows
        windows = hf_layer_sliding_windows(self.hf_config)
        return tuple(kv_layer_groups(windows)) if is_hybrid(windows) else None

    @property
    def kv_sliding_window(self) -> int | None:
        """The window the KV cache manager may free blocks behind: set only when every layer has one."""
        from sluice.models.model_config import hf_kv_sliding_window
        return hf_kv_sliding_window(self.hf_config)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    policy: str = "fcfs"
    async_scheduling: bool = False
    long_prefill_token_threshold: int = 0
    # KV slots allocated past each step's tokens (a draft model writes its proposals' KV there; 0 otherwise).
    num_lookahead_tokens: int = 0

    @property
    def max_prefill_chunk(self) -> int:
        """The most prompt tokens one request runs in a step (0 threshold: the budget is the limit)."""
        return self.long_prefill_token_threshold or self.max_num_batched_tokens


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    enable_prefix_caching: bool
    num_blocks: int | None  # None until the engine core has sized the KV cache (or --num-kv-blocks)
    swap_space_bytes: int = 0  # host memory for swapped-out KV (core/kv_offload.py)
    num_cpu_blocks: int = 0  # host KV blocks (swap space and host tier), set once the core sized them
    kv_offload_space_bytes: int = 0  # host prefix-cache tier (0: off)
    preemption_mode: str = "auto"
    sliding_window: int | None = None  # every layer's window: the KV cache manager frees blocks behind it
    # Windowed and global layers mixed (Gemma 2/3): one block table per group (core/hybrid_kv_manager.py).
    kv_layer_groups: "tuple[KVLayerGroup, ...] | None" = None
    cache_dtype: str = "auto"  # --kv-cache-dtype: auto (the model's dtype), fp8 or fp8_e4m3
    calculate_kv_scales: bool = False  # fp8 scales from the first step's K and V
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int = DEFAULT_CPU_KV_CACHE_BYTES  # the KV budget on the CPU

    @property
    def num_kv_tokens(self) -> int:
        if self.num_blocks is None:
            raise RuntimeError("the KV cache is not sized yet: use the config the engine core client reports")
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str = "mp"  # mp | ray (sluice/distributed/executor.py, ray_executor.py)


@dataclass(frozen=True)
class DeviceConfig:
    """The device probe's answer, taken once, before the engine core starts."""
    type: str  # "cpu" | "cuda"
    name: str = ""
    total_memory_bytes: int = 0

    @property
    def is_large_gpu(self) -> bool:
        """A GPU of 70 GiB or more that is not an A100: vLLM's larger batch defaults suit it."""
        return (self.type == "cuda" and self.total_memory_bytes >= LARGE_GPU_MIN_BYTES
                and "a100" not in self.name.lower())


@dataclass(frozen=True)
class ObservabilityConfig:
    """What the engine records beyond the default metrics; everything here is off by default and costs nothing."""
    kv_cache_metrics: bool = False  # time a sample of KV blocks (core/kv_metrics.py)
    kv_cache_metrics_sample: float = 0.01
    otlp_traces_endpoint: str | None = None  # one OpenTelemetry span per request (sluice/tracing.py)
    collect_detailed_traces: str | None = None  # also a span per engine step: "model", "worker" or "all"


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (sluice/lora/): present only with enable_lora."""
    max_loras: int = 1  # device slots: most distinct adapters in one step
    max_lora_rank: int = 16
    max_cpu_loras: int = 1  # adapters kept loaded in host memory (LRU)
    fair_scheduling: bool = True  # waiting requests start in per-adapter fair order (sluice/lora/scheduling.py)


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """Constrained decoding (sluice/structured_output/): which grammar library compiles a request's constraint."""
    backend: str = "xgrammar"  # auto (xgrammar, llguidance for what xgrammar refuses) | xgrammar | guidance


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: DeviceConfig
    observability: ObservabilityConfig = ObservabilityConfig()
    structured_outputs: StructuredOutputsConfig = StructuredOutputsConfig()
    usage_context: str = "llm"
    disable_log_stats: bool = False
    lora: LoRAConfig | None = None  # None: LoRA off, and the model is built without the hook
    speculative: "SpeculativeConfig | None" = None  # None: no speculative decoding (sluice/spec_decode/)

    @property
    def max_model_len(self) -> int:
        """The longest request the engine runs: the model's, capped by the KV cache once it is sized."""
        return self.scheduler.max_model_len

    @property
    def num_kv_tokens(self) -> int:
        return self.cache.num_kv_tokens

    def with_kv_cache(self, num_blocks: int, num_cpu_blocks: int = 0) -> "EngineConfig":
        """The config once the core has sized the KV cache: what every part validates against."""
        cache = dataclasses.replace(self.cache, num_blocks=num_blocks, num_cpu_blocks=num_cpu_blocks)
        max_model_len = kv_capped_max_model_len(self.model.max_model_len, cache, self.scheduler.max_prefill_chunk)
        return dataclasses.replace(self, cache=cache,
                                   scheduler=dataclasses.replace(self.scheduler, max_model_len=max_model_len))


def kv_capped_max_model_len(max_model_len: int, cache: CacheConfig, max_chunk_tokens: int) -> int:
    """A request longer than the whole KV cache could never run, even alone: lengths are capped at its size.

    With a sliding window on every layer a request holds at most its window and one prompt chunk, so a pool of
    that size runs requests of any length. With layer groups, a block is one group deep: a request of T tokens
    holds ``hybrid_request_blocks(T)`` of them."""
    if cache.kv_layer_groups is not None and cache.num_blocks is not None:
        longest, too_long = 0, max_model_len + 1  # the footprint grows with the length: bisect it
        while too_long - longest > 1:
            mid = (longest + too_long) // 2
            if hybrid_request_blocks(mid, cache.kv_layer_groups, max_chunk_tokens, cache.block_size) <= cache.num_blocks:
                longest = mid
            else:
                too_long = mid
        return longest
    if cache.sliding_window is not None and cache.num_blocks is not None:
        if cache.num_blocks >= windowed_request_blocks(cache.sliding_window, max_chunk_tokens, cache.block_size):
            return max_model_len
    return min(max_model_len, cache.num_kv_tokens)


def windowed_request_blocks(sliding_window: int, max_chunk_tokens: int, block_size: int) -> int:
    """The most blocks a request holds when every layer is windowed: its window and one prompt chunk, plus the
    partly filled block at each end."""
    return -(-(sliding_window + max_chunk_tokens) // block_size) + 1


def hybrid_request_blocks(num_tokens: int, groups: "tuple[KVLayerGroup, ...] | list[KVLayerGroup]",
                          max_chunk_tokens: int, block_size: int) -> int:
    """The most blocks (one layer group deep each) a request of ``num_tokens`` tokens holds: every block in the
    global groups, at most ``windowed_request_blocks`` in each windowed one."""
    full = -(-num_tokens // block_size)
    return sum(full if g.sliding_window is None else
               min(full, windowed_request_blocks(g.sliding_window, max_chunk_tokens, block_size)) for g in groups)


# ---- resolution ----------------------------------------------------------------------------------------------
def create_engine_config(args: EngineArgs, device: DeviceConfig | None = None) -> EngineConfig:
    """Validates ``args`` and decides every default: the one place an EngineConfig is made.

    ``device``: the probe's answer, for tests; by default ``probe_device(args.device)``."""
    args.validate()
    from sluice.models.model_config import default_served_name, hf_context_length, read_checkpoint
    from sluice.pooling.config import prefix_caching_applies, resolve_pooler_config

    device = device if device is not None else probe_device(args.device)
    model_path, hf_config, is_gguf = read_checkpoint(args.model, args.load_format)
    context_length = hf_context_length(hf_config)
    max_model_len = args.max_model_len or context_length
    if max_model_len > context_length:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {context_length}")
    # Rope settings that depend on the serving length read it here (longrope's factor set).
    hf_config.sluice_max_model_len = max_model_len
    if not args.skip_tokenizer_init:
        from sluice.tokenizer import check_tokenizer_files
        check_tokenizer_files(args.tokenizer or model_path)
    model = ModelConfig(
        model=model_path, tokenizer=args.tokenizer or model_path,
        served_model_name=args.served_model_name or default_served_name(args.model), hf_config=hf_config,
        dtype=_resolve_dtype(hf_config, args.dtype, device.type), device=device.type, max_model_len=max_model_len,
        vocab_size=hf_config.vocab_size, is_gguf=is_gguf, load_format=args.load_format, seed=args.seed,
        quantization=_check_quantization(args.quantization, hf_config, is_gguf, args.runner, args.task),
        skip_tokenizer_init=args.skip_tokenizer_init, max_logprobs=args.max_logprobs,
        enforce_eager=args.enforce_eager, cpu_threads=args.cpu_threads,
        pooler_config=resolve_pooler_config(args.runner, args.task, model_path, hf_config))
    if args.tensor_parallel_size > 1:
        from sluice.distributed.support import check_tp_model
        check_tp_model(model, args.tensor_parallel_size)
    max_num_seqs, max_num_batched_tokens = resolve_batch_limits(args, max_model_len, device)
    speculative = _speculative_config(args, model)
    async_scheduling = args.async_scheduling if args.async_scheduling is not None else device.type == "cuda"
    scheduler = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
        policy=args.scheduling_policy,
        # A speculating engine runs a step that verifies proposals (or makes the next ones) one after the
        # other, and the others asynchronously (EngineCore.step).
        async_scheduling=async_scheduling,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        num_lookahead_tokens=speculative.num_lookahead_tokens if speculative is not None else 0)
    cache = CacheConfig(
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching and prefix_caching_applies(model.pooler_config),
        num_blocks=args.num_kv_blocks,
        swap_space_bytes=int(args.swap_space * 2**30), kv_offload_space_bytes=int(args.kv_offload_space * 2**30),
        preemption_mode=args.preemption_mode, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES,
        sliding_window=model.kv_sliding_window, kv_layer_groups=_kv_layer_groups(args, model),
        cache_dtype=args.kv_cache_dtype,
        calculate_kv_scales=args.calculate_kv_scales)
    return EngineConfig(model=model, cache=cache, scheduler=scheduler,
                        parallel=ParallelConfig(args.tensor_parallel_size, args.data_parallel_size,
                                                args.distributed_executor_backend),
                        device=device,
                        observability=ObservabilityConfig(
                            kv_cache_metrics=args.kv_cache_metrics,
                            kv_cache_metrics_sample=args.kv_cache_metrics_sample,
                            otlp_traces_endpoint=args.otlp_traces_endpoint,
                            collect_detailed_traces=args.collect_detailed_traces),
                        structured_outputs=StructuredOutputsConfig(args.structured_outputs_backend),
                        usage_context=args.usage_context, disable_log_stats=args.disable_log_stats,
                        lora=_lora_config(args), speculative=speculative)


def _kv_layer_groups(args: EngineArgs, model: ModelConfig) -> "tuple[KVLayerGroup, ...] | None":
    groups = model.kv_layer_groups
    if groups is not None and (args.swap_space or args.kv_offload_space):
        raise ValueError("swap_space / kv_offload_space: models mixing sliding-window and global layers (Gemma 2/3) "
                         "keep one block table per layer group, which swap and the host tier do not copy; "
                         "leave them at 0 (preempted requests recompute)")
    return groups


def _speculative_config(args: EngineArgs, model: ModelConfig) -> "SpeculativeConfig | None":
    from sluice.spec_decode.config import parse_speculative_config
    speculative = parse_speculative_config(args.speculative_config, model.vocab_size, args.load_format,
                                           model.hf_config)
    if speculative is None:
        return None
    if model.pooler_config is not None:
        raise ValueError("speculative_config applies to generation models, not to pooling (embedding) ones")
    if model.kv_layer_groups is not None:
        raise ValueError("speculative_config: models mixing sliding-window and global layers are not supported "
                         "(their windowed layers free blocks behind the window, which rejected proposals would need)")
    if model.kv_sliding_window is not None:
        raise ValueError("speculative_config: models whose every layer has a sliding window are not supported "
                         "(their KV cache frees blocks behind the window, which rejected proposals would need)")
    return speculative


def _lora_config(args: EngineArgs) -> LoRAConfig | None:
    if not args.enable_lora:
        return None
    return LoRAConfig(max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                      max_cpu_loras=args.max_cpu_loras if args.max_cpu_loras is not None else args.max_loras,
                      # The priority policy keeps its queue sorted by priority: fair order applies to fcfs only.
                      fair_scheduling=args.lora_scheduling == "fair" and args.scheduling_policy == "fcfs")


def resolve_batch_limits(args: EngineArgs, max_model_len: int, device: DeviceConfig) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens): the given values, else BATCH_DEFAULTS for the device."""
    kind = "large_gpu" if device.is_large_gpu else ("gpu" if device.type == "cuda" else "cpu")
    defaults = BATCH_DEFAULTS[kind]
    tokens = (defaults.max_num_batched_tokens_served if args.usage_context == "server"
              else defaults.max_num_batched_tokens_offline)
    if kind == "cpu" and max_model_len < tokens:
        tokens = max(max_model_len, 512)
    return (args.max_num_seqs if args.max_num_seqs is not None else defaults.max_num_seqs,
            args.max_num_batched_tokens if args.max_num_batched_tokens is not None else tokens)


def _check_quantization(flag: str | None, hf_config: Any, is_gguf: bool, runner: str, task: str) -> str | None:
    """Validates the flag against the checkpoint now (a one-line error before anything loads)."""
    from sluice.layers.quantization import resolve_quant_config

    if is_gguf:
        if flag is not None:
            raise ValueError("--quantization does not apply to GGUF files (their tensors are dequantized at load)")
        return None
    resolved = resolve_quant_config(hf_config, flag)
    if resolved is not None and (runner == "pooling" or task == "embed"):
        raise ValueError("quantized checkpoints are supported by the generate runner only")
    return flag


def _resolve_dtype(hf_config: Any, dtype: str, device_type: str) -> str:
    from sluice.models.loader import resolve_dtype
    return str(resolve_dtype(hf_config, dtype, device_type)).removeprefix("torch.")


def probe_device(device: str) -> DeviceConfig:
    """The device the engine will run on. A GPU is read through NVML (no CUDA context in this process, which
    may be the API server's: a context there would hold GPU memory the engine core's KV cache should get)."""
    import torch

    device_type = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type != "cuda":
        return DeviceConfig(device_type)
    found = _nvml_first_visible_gpu()
    if found is None:  # no NVML: ask CUDA itself
        props = torch.cuda.get_device_properties(0)
        found = (props.name, props.total_memory)
    return DeviceConfig("cuda", name=found[0], total_memory_bytes=found[1])


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml_first_visible_gpu() -> tuple[str, int] | None:
    """(name, total memory in bytes) of the first GPU CUDA_VISIBLE_DEVICES shows, or None if NVML cannot say."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    if not visible.isdigit():
        return None  # a UUID or MIG name: leave it to CUDA
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        handle = ctypes.c_void_p()
        name = ctypes.create_string_buffer(96)
        memory = _NvmlMemory()
        if (nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(int(visible)), ctypes.byref(handle)) != 0
                or nvml.nvmlDeviceGetName(handle, name, ctypes.c_uint(len(name))) != 0
                or nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0):
            return None
        return name.value.decode(errors="replace"), int(memory.total)
    finally:
        nvml.nvmlShutdown()

"""Peers for ``sluice bench throughput`` on the same requests: Hugging Face transformers in the same process, and
the real vLLM in a process of its own (vllm_peer.py).

    hf     naive serving: ``model.generate`` on static batches of ``batch_size`` consecutive requests, left-padded.
           A batch runs until its longest request is done (max_new_tokens = that length, eos disabled); only each
           request's own ``output_len`` counts as useful output.
    hf-cb  transformers 5.x continuous batching: ``init_continuous_batching()`` + ``add_request(max_new_tokens=
           output_len)`` per request, attention "paged|sdpa", finished results counted with ``is_finished()``.
           On the CPU its KV cache is the engine's size (transformers would take a share of host memory).
    vllm   vllm.LLM at its own defaults (the engine's model, dtype, max_model_len, seed, prefix caching), one
           generate over every request after a short warmup; needs --vllm-pythonpath.

Both sample with temperature 1.0 and top_p 1.0 and never stop at eos. Weights are the engine's: the same
safetensors or GGUF tensors (dequantized), or, with ``load_format="dummy"``, a random model of the same shape and
dtype (not the same random values: throughput does not depend on them).
"""
from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sluice.bench.datasets import BenchRequest
from sluice.bench.throughput import ThroughputResult, free_device_memory
from sluice.config import ModelConfig

logger = logging.getLogger(__name__)

PEERS = ("hf", "hf-cb", "vllm")
CB_ATTENTION = "paged|sdpa"  # docs/benchmarks.md; transformers >= 5.2x strips the "paged|" prefix with a warning


@dataclass(frozen=True, slots=True)
class PeerConfig:
    batch_size: int = 64  # hf: requests per static batch
    cb_timeout_s: float = 3600.0  # hf-cb: give up when no result arrives for this long
    vllm_pythonpath: str | None = None  # vllm: where vLLM is installed (vllm_peer.find_vllm)
    vllm_timeout_s: float = 3600.0  # vllm: the whole peer process, start-up included
    enable_prefix_caching: bool = True  # vllm: as the engine ran
    kv_cache_dtype: str = "auto"  # vllm: as the engine ran (--kv-cache-dtype)
    calculate_kv_scales: bool = False
    cpu_kv_cache_tokens: int | None = None  # hf-cb on the CPU: a KV cache of the engine's size (see _cpu_cb_config)


def load_hf_model(model_config: ModelConfig, attn_implementation: str) -> Any:
    """A transformers model with the engine's weights (or dummy weights of the same shape), on its device."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, model_config.dtype)
    device = torch.device(model_config.device)
    torch.manual_seed(model_config.seed)
    with device:  # build the weights in place: an 8B model never touches host memory
        model = AutoModelForCausalLM.from_config(model_config.hf_config, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    if model_config.load_format != "dummy":
        result = model.load_state_dict(dict(_engine_weights(model_config, dtype)), strict=False)
        missing = [name for name in result.missing_keys if not _is_tied_head(model, name)]
        if missing or result.unexpected_keys:
            raise ValueError(f"model: the HF peer could not take the engine's weights (missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
        model.tie_weights()
    return model.eval()


def _is_tied_head(model: Any, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _engine_weights(model_config: ModelConfig, dtype: torch.dtype):
    if model_config.is_gguf:
        from sluice.models.gguf_loader import open_gguf
        return open_gguf(model_config.model).weights(dtype=dtype)
    from sluice.models.loader import iterate_safetensors
    return iterate_safetensors(model_config.model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generation_config(max_new_tokens: int) -> Any:
    from transformers import GenerationConfig

    # eos_token_id -1 is no token, so nothing ends a request early (ignore_eos). min_new_tokens would be
    # redundant, and with eos -1 it would ban the last vocabulary entry. Pad 0 is only ever left padding.
    return GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=max_new_tokens,
                            eos_token_id=-1, pad_token_id=0)


@torch.inference_mode()
def run_hf_static(model_config: ModelConfig, requests: Sequence[BenchRequest],
                  config: PeerConfig = PeerConfig()) -> ThroughputResult:
    """transformers ``generate`` over static, left-padded batches; counts each request's own output length."""
    model = load_hf_model(model_config, "sdpa")
    device = model.device
    warmup = torch.tensor([requests[0].prompt_token_ids[:8]], device=device)
    model.generate(warmup, attention_mask=torch.ones_like(warmup), generation_config=_generation_config(2))
    _sync(device)
    start = time.perf_counter()
    for first in range(0, len(requests), config.batch_size):
        batch = requests[first:first + config.batch_size]
        longest_prompt = max(len(r.prompt_token_ids) for r in batch)
        longest_output = max(r.output_len for r in batch)
        input_ids = torch.zeros((len(batch), longest_prompt), dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, request in enumerate(batch):
            n = len(request.prompt_token_ids)
            input_ids[row, longest_prompt - n:] = torch.tensor(request.prompt_token_ids)
            attention_mask[row, longest_prompt - n:] = 1
        out = model.generate(input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=_generation_config(longest_output))
        if out.shape[1] - longest_prompt != longest_output:
            raise RuntimeError(f"hf generate returned {out.shape[1] - longest_prompt} new tokens, "
                               f"expected {longest_output}")
    _sync(device)
    elapsed = time.perf_counter() - start
    del model
    free_device_memory()
    return ThroughputResult.from_requests("hf", requests, elapsed,
                                          extra={"batch_size": config.batch_size, "attn_implementation": "sdpa"})


@torch.no_grad()  # not inference_mode: the manager's thread updates tensors made during warmup in place
def run_hf_continuous_batching(model_config: ModelConfig, requests: Sequence[BenchRequest],
                               config: PeerConfig = PeerConfig()) -> ThroughputResult:
    """transformers continuous batching with default ``ContinuousBatchingConfig``; one request per prompt."""
    model = load_hf_model(model_config, CB_ATTENTION)
    longest_output = max(r.output_len for r in requests)
    cb_config = _cpu_cb_config(model, config)
    manager = model.init_continuous_batching(generation_config=_generation_config(longest_output),
                                             **_workload_hints(model, requests), **cb_config)
    if hasattr(manager, "warmup"):  # CUDA graph capture, as generate_batch does before its requests
        manager.warmup()
    manager.start()
    try:
        _sync(model.device)
        start = time.perf_counter()
        for index, request in enumerate(requests):
            manager.add_request(list(request.prompt_token_ids), request_id=f"bench-{index}",
                                max_new_tokens=request.output_len)
        generated = _collect_finished(manager, len(requests), config.cb_timeout_s)
        _sync(model.device)
        elapsed = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    attn = getattr(model.config, "_attn_implementation", CB_ATTENTION)
    del model, manager
    free_device_memory()
    return ThroughputResult.from_requests("hf-cb", requests, elapsed, output_tokens=generated,
                                          extra={"attn_implementation": attn,
                                                 **{"num_kv_blocks": c.num_blocks for c in cb_config.values()}})


def _workload_hints(model: Any, requests: Sequence[BenchRequest]) -> dict[str, Any]:
    """The sizing hints ``generate_batch`` gives its manager, where this transformers version takes them."""
    if "workload_hints" not in inspect.signature(model.init_continuous_batching).parameters:
        return {}
    from transformers.generation.continuous_batching.utils import WorkloadHints

    return {"workload_hints": WorkloadHints(max_prompt_length=max(len(r.prompt_token_ids) for r in requests),
                                            max_generated_length=max(r.output_len for r in requests),
                                            num_requests=len(requests))}


def _cpu_cb_config(model: Any, config: PeerConfig) -> dict[str, Any]:
    """On the CPU, a KV cache as large as the engine's. Left to itself transformers sizes the cache from a share of
    host memory and warms up at that size: tens of GiB, and 20 s of warmup for a 4-layer test model."""
    if (model.device.type != "cpu" or not config.cpu_kv_cache_tokens
            or "continuous_batching_config" not in inspect.signature(model.init_continuous_batching).parameters):
        return {}
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page_size = ContinuousBatchingConfig().page_size
    num_blocks = max(1, -(-config.cpu_kv_cache_tokens // page_size))
    return {"continuous_batching_config": ContinuousBatchingConfig(num_blocks=num_blocks)}


def _collect_finished(manager: Any, num_requests: int, timeout_s: float) -> int:
    """Waits for every request; returns the number of generated tokens. Raises on a failed request."""
    finished, generated = 0, 0
    last_result = time.monotonic()
    while finished < num_requests:
        result = manager.get_result(timeout=1)
        if result is None:
            if not manager.is_running() or time.monotonic() - last_result > timeout_s:
                raise RuntimeError(f"transformers continuous batching stopped after {finished} of "
                                   f"{num_requests} requests")
            continue
        last_result = time.monotonic()
        if result.is_finished():
            if getattr(result, "error", None):
                raise RuntimeError(f"transformers continuous batching failed request {result.request_id}: "
                                   f"{result.error}")
            finished += 1
            generated += len(result.generated_tokens)
    return generated


def run_vllm(model_config: ModelConfig, requests: Sequence[BenchRequest],
             config: PeerConfig = PeerConfig()) -> ThroughputResult:
    """The real vLLM, in a process of its own (vllm_peer.py)."""
    from sluice.bench.vllm_peer import run_vllm as run

    return run(model_config, requests, config)


PEER_RUNNERS = {"hf": run_hf_static, "hf-cb": run_hf_continuous_batching, "vllm": run_vllm}


def parse_peers(text: str | None) -> list[str]:
    """"hf,hf-cb" -> ["hf", "hf-cb"]; empty or "none" -> []."""
    if not text or text.strip().lower() == "none":
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEER_RUNNERS]
    if unknown:
        raise ValueError(f"peers must be a comma-separated subset of {', '.join(PEERS)}, got {unknown[0]!r}")
    return list(dict.fromkeys(names))

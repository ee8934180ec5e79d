"""The engine front's pooling half: adding embedding requests, and turning pooled vectors into outputs.

    LLMEngine.add_request(id, prompt, PoolingParams)  -> add_pooling_request: tokenize, truncate, check,
                                                         a prompt-only Request (max_tokens=1, never sampled)
    core step -> EngineCoreOutput.pooled_output        raw pooled hidden state (float32 bytes)
    PoolingOutputProcessor.process                     -> dimensions (Matryoshka) + normalization per request
                                                         -> PoolingRequestOutput (finished)

A pooling engine serves only PoolingParams and a generation engine only SamplingParams: the other kind
gets a ValueError (a 400 on the server) that says which runner the model needs.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sluice.core.interface import FINISH_REASON_ERROR, EngineCoreOutput
from sluice.core.request import Request
from sluice.stats import FinishedRequestStats, IterationStats
from sluice.pooling.config import PoolerConfig
from sluice.pooling.outputs import PoolingOutput, PoolingRequestOutput
from sluice.pooling.params import PoolingParams
from sluice.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sluice.engine.llm_engine import LLMEngine

# Every pooling request's params in the core: one step past the prompt ends it, so the scheduler never
# schedules it again once its prompt is computed (with async scheduling, its pending "sample" ends it).
_PROMPT_ONLY = SamplingParams(max_tokens=1, detokenize=False)


def check_runner(model_config: Any, params: Any) -> None:
    """ValueError when the request's kind (PoolingParams or not) does not match the engine's runner."""
    name = model_config.served_model_name
    pooling = model_config.pooler_config is not None
    if isinstance(params, PoolingParams) and not pooling:
        raise ValueError(f"model {name!r} is a generation model: embeddings need a pooling model (start the "
                         "engine with --runner pooling or --task embed)")
    if pooling and not isinstance(params, PoolingParams):
        raise ValueError(f"model {name!r} is an embedding model (--runner pooling): it does not generate text; "
                         "use LLM.embed or /v1/embeddings")


def add_pooling_request(engine: "LLMEngine", request_id: str, prompt: Any, params: PoolingParams,
                        priority: int = 0, arrival_time: float | None = None) -> None:
    """Validates and adds one embedding request to a pooling engine (ValueError names the bad field)."""
    config = engine.model_config
    check_runner(config, params)
    params = params.clone()
    params.verify(config.pooler_config, config.served_model_name)
    _, prompt_ids = engine.tokenize_prompt(prompt)
    prompt_ids = _truncate(prompt_ids, params.truncate_prompt_tokens, engine.max_model_len)
    _check_prompt(prompt_ids, config.vocab_size, engine.max_model_len, engine.config.num_kv_tokens)
    arrival_time = time.monotonic() if arrival_time is None else arrival_time
    engine.output_processor.add_request(PoolingRequestState(request_id, prompt_ids, params, arrival_time))
    engine.engine_core.add_request(Request(request_id, prompt_ids, _PROMPT_ONLY, priority=priority,
                                           arrival_time=arrival_time))


def _truncate(prompt_ids: list[int], truncate_prompt_tokens: int | None, max_model_len: int) -> list[int]:
    """The last k tokens (vLLM truncates from the left); -1 keeps as many as max_model_len allows."""
    if truncate_prompt_tokens is None:
        return prompt_ids
    keep = max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
    return prompt_ids[-keep:]


def _check_prompt(prompt_ids: list[int], vocab_size: int, max_model_len: int, kv_tokens: int) -> None:
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is out of range for vocab size {vocab_size}")
    limit = min(max_model_len, kv_tokens)
    if len(prompt_ids) > limit:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens long, more than max_model_len ({max_model_len}) "
                         f"or the KV cache ({kv_tokens} tokens) allows; truncate_prompt_tokens keeps its last "
                         "tokens")


def finalize_vector(raw: bytes, params: PoolingParams, pooler_config: PoolerConfig) -> np.ndarray:
    """The raw pooled state -> the request's embedding: first ``dimensions`` values, then L2-normalized
    when the request (or else the model's Normalize module) asks for it, as sentence-transformers does."""
    vector = np.frombuffer(raw, dtype="<f4")
    if params.dimensions is not None:
        vector = vector[:params.dimensions]
    normalize = pooler_config.normalize if params.normalize is None else params.normalize
    if normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)  # torch.nn.functional.normalize's eps
    return np.array(vector, dtype=np.float32)  # a writable copy (frombuffer views are read-only)


@dataclass(slots=True)
class PoolingRequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: PoolingParams
    arrival_time: float


class PoolingOutputProcessor:
    """OutputProcessor's counterpart for a pooling engine (same calls: add_request, abort_requests, process)."""

    def __init__(self, pooler_config: PoolerConfig) -> None:
        self.pooler_config = pooler_config
        self.requests: dict[str, PoolingRequestState] = {}
        self._aborted_stats: list[FinishedRequestStats] = []

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    def add_request(self, state: PoolingRequestState) -> None:
        if state.request_id in self.requests:
            raise ValueError(f"request id {state.request_id!r} is already in use")
        self.requests[state.request_id] = state

    def abort_requests(self, request_ids: Iterable[str]) -> list[str]:
        """Forgets the given requests; returns those the core must abort."""
        now = time.monotonic()
        aborted = []
        for request_id in request_ids:
            state = self.requests.pop(request_id, None)
            if state is not None:
                aborted.append(request_id)
                self._aborted_stats.append(_finished_stats(state, "abort", now))
        return aborted

    def process(self, core_outputs: list[EngineCoreOutput],
                stats: IterationStats) -> tuple[list[PoolingRequestOutput], list[str]]:
        """PoolingRequestOutputs of the requests the core pooled (no stop strings: the list is always empty)."""
        now = time.monotonic()
        stats.finished_requests.extend(self._aborted_stats)
        self._aborted_stats.clear()
        outputs = []
        for out in core_outputs:
            state = self.requests.pop(out.req_id, None)
            if state is None:
                continue  # aborted meanwhile
            stats.finished_requests.append(_finished_stats(state, out.finish_reason or "stop", now))
            if out.pooled_output is None:  # ended without a vector: failed, or an abort the core reported
                if out.finish_reason == FINISH_REASON_ERROR:
                    outputs.append(PoolingRequestOutput(state.request_id, PoolingOutput.from_array(np.zeros(0, np.float32)),
                                                        state.prompt_token_ids, True, failed=True))
                continue
            stats.num_prompt_tokens += len(state.prompt_token_ids)
            vector = finalize_vector(out.pooled_output, state.params, self.pooler_config)
            outputs.append(PoolingRequestOutput(state.request_id, PoolingOutput.from_array(vector),
                                                state.prompt_token_ids, True, out.num_cached_tokens, vector))
        return outputs, []


def _finished_stats(state: PoolingRequestState, finish_reason: str, now: float) -> FinishedRequestStats:
    latency = now - state.arrival_time
    return FinishedRequestStats(finish_reason=finish_reason, e2e_latency=latency, queue_time=latency,
                                num_prompt_tokens=len(state.prompt_token_ids), num_generation_tokens=0)

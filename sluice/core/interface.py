"""The one contract between the scheduler (pure Python) and the model runner (tensors).

The scheduler output is a diff: requests the runner has not seen (or must rebuild
after a preemption) arrive in full as ``NewRequestData``; requests it already holds
arrive as ``CachedRequestData`` carrying only the blocks appended this step.

    step t:   scheduled_new_reqs    = [A(prompt, blocks [3, 7]), B(...)]
    step t+1: scheduled_cached_reqs = [A(new_block_ids [9]), B([])]
              num_scheduled_tokens  = {"A": 1, "B": 16}

A request samples a token in a step iff, after the step, all of its known tokens
are computed: ``num_computed_tokens + num_scheduled_tokens >= num_tokens``.
A prefill chunk that stops short of that samples nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sluice.core.kv_offload import KVTransfers
    from sluice.lora.request import LoRARequest
    from sluice.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the runner must (re)build its state for.

    ``output_token_ids`` is non-empty when a preempted request resumes: its KV was
    dropped and will be recomputed from ``num_computed_tokens`` (usually a prefix
    cache hit or zero).
    """
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: "SamplingParams"
    block_ids: list[int]  # one list per layer group with windowed and global layers mixed (hybrid_kv_manager.py)
    num_computed_tokens: int  # before this step's tokens (a prefix-cache hit, or 0)
    eos_token_id: int | None = None
    lora_request: "LoRARequest | None" = None  # the adapter it runs with (None: the base model)


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds: only what changed since last step."""
    req_id: str
    new_block_ids: list[int]  # one list per layer group, as NewRequestData.block_ids
    num_computed_tokens: int  # before this step's tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    # req_id -> tokens to compute this step (a prefill chunk or 1 for a decode).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests finished or aborted since the last step: the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)
    # Requests preempted this step: the runner drops their state too; they come back as new.
    preempted_req_ids: set[str] = field(default_factory=set)
    # KV block copies between device and host memory to run before this step's forward (swap preemption,
    # the host prefix tier: core/kv_offload.py); None when there are none.
    kv_transfers: "KVTransfers | None" = None
    # Speculative decoding: req_id -> proposed tokens scheduled after its known tokens (counted in
    # num_scheduled_tokens); the runner verifies them and samples the token after the kept ones.
    scheduled_spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_reqs(self) -> int:
        return len(self.num_scheduled_tokens)

    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class LogprobsLists:
    """Top-k logprobs per sampled position: row i is one position of one request.

    ``token_ids[i][0]`` is the sampled (or prompt) token, followed by the top-k tokens.
    """
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]  # rank of token_ids[i][0] in the full distribution (1 = most likely)

    def rows(self, start: int, stop: int) -> "LogprobsLists":
        """Positions start .. stop - 1."""
        return LogprobsLists(self.token_ids[start:stop], self.logprobs[start:stop], self.ranks[start:stop])


@dataclass(slots=True)
class ModelRunnerOutput:
    # Order of requests in this step's batch.
    req_ids: list[str]
    # req_id -> tokens sampled this step ([] for a prefill chunk that samples nothing; with speculative
    # decoding, the kept proposals and the token after them).
    sampled_token_ids: dict[str, list[int]]
    # req_id -> logprobs of the sampled tokens, when the request asked for them.
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # req_id -> logprobs of prompt positions computed this step, when asked for.
    prompt_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    # Pooling engines: req_id -> the pooled hidden state (float32 bytes) of each request whose prompt this
    # step completed; such a request is finished (sampled_token_ids has none for it).
    pooler_output: dict[str, bytes] = field(default_factory=dict)
    # Speculative decoding: req_id -> tokens proposed to follow its new tokens (verified by the next step).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)


FINISH_REASON_ERROR = "error"  # a request the engine failed on its own (vLLM's name); the others carry on


@dataclass(slots=True)
class EngineCoreOutput:
    """What the engine core reports per request per step (token ids, never text)."""
    req_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id, when one ended the request
    new_logprobs: LogprobsLists | None = None
    new_prompt_logprobs: LogprobsLists | None = None
    num_cached_tokens: int = 0
    pooled_output: bytes | None = None  # pooling engines: the pooled hidden state, float32 little-endian
    scheduled_time: float | None = None  # time.monotonic() of first scheduling, with the first token only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

"""Request: the unit the scheduler moves, and the one invariant it obeys.

Every request carries ``num_tokens`` (prompt + generated so far) and
``num_computed_tokens`` (tokens whose KV is in the cache). The scheduler's only
job is to let ``num_computed_tokens`` catch up with ``num_tokens``; there is no
separate prefill or decode phase.
"""
from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sluice.lora.request import LoRARequest
    from sluice.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything from here on is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6  # failed on its own (its grammar did not compile); the others carry on

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        return status >= RequestStatus.FINISHED_STOPPED

    @staticmethod
    def finish_reason(status: "RequestStatus") -> str | None:
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One generation request as the engine core sees it (token ids only)."""

    __slots__ = (
        "request_id", "prompt_token_ids", "output_token_ids", "sampling_params",
        "eos_token_id", "priority", "arrival_time", "status", "stop_reason",
        "num_computed_tokens", "num_cached_tokens", "num_preemptions",
        "block_hashes", "lora_int_id", "lora_request", "cache_salt", "parent_request_id", "num_output_placeholders",
        "first_scheduled_time", "structured_output", "spec_token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: "SamplingParams",
        eos_token_id: int | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_int_id: int = 0,
        cache_salt: str | None = None,
        parent_request_id: str | None = None,
        lora_request: "LoRARequest | None" = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_computed_tokens = 0
        # Async scheduling: tokens a launched step will sample that have not come back yet. The next step
        # already computes them (its input id is taken from the previous step's samples on the device).
        self.num_output_placeholders = 0
        # Prompt tokens served from the prefix cache at first schedule (for metrics/usage).
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        # time.monotonic() when the scheduler first admitted it (queue time ends here; metrics, traces).
        self.first_scheduled_time: float | None = None
        # Hashes of this request's full blocks, filled lazily by the KV cache manager.
        self.block_hashes: list[int] = []
        # The adapter it runs with (None: the base model); its id also keys its prefix-cache blocks.
        self.lora_request = lora_request
        self.lora_int_id = lora_request.lora_int_id if lora_request is not None else lora_int_id
        self.cache_salt = cache_salt
        # The user request this one is a child of, when it asked for n > 1 completions.
        self.parent_request_id = parent_request_id
        # Structured outputs: its grammar state (sluice/structured_output/manager.py StructuredOutputRequest),
        # attached by the engine core; the scheduler waits for ``is_ready()`` and feeds ``advance(token)``.
        self.structured_output = None
        # Speculative decoding: tokens proposed to follow its known ones, for the next step to verify. They are
        # scheduled as tokens beyond num_tokens; the verified ones become output tokens, the rest are dropped.
        self.spec_token_ids: list[int] = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finish_reason(self) -> str | None:
        return RequestStatus.finish_reason(self.status)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens})")

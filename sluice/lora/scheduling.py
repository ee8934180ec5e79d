"""Scheduler hooks for LoRA (no torch).

``LoRAAdmission`` is the scheduler's admission hook with LoRA on: the running set never holds more than
``max_loras`` adapters, and (``--lora-scheduling fair``, the default) waiting requests start in the order
of ``FairLoRAQueue``, so that an adapter sending ten times more requests than another cannot make it wait
behind its backlog.
"""
from __future__ import annotations

import heapq
import operator
from collections import deque

from sluice.core.request import Request, RequestStatus
from sluice.stats import LoRAStats


class FairLoRAQueue:
    """Start-time fair queuing over adapters (the base model counts as one): each adapter has a virtual
    time that advances by one per request it starts; the waiting request of the adapter with the lowest
    virtual time goes next (FIFO within an adapter). An adapter that had nothing waiting joins at the
    current virtual time, so idle time banks no credit.

        waiting (arrival order)   A1 A2 A3 A4 B1 A5       virtual time A=7 B=5 (now 7)
        fair order                B1 A1 A2 ...            B joins at 7, ties go to the earlier arrival

    Preempted requests keep the front: they had started already.
    """

    def __init__(self) -> None:
        self.virtual_time: dict[int, float] = {}
        self.now = 0.0
        self._version = 0  # bumped by started(): the order depends on virtual times
        self._last: list[Request] | None = None  # the last order returned, and the version it was made at
        self._last_version = -1

    def order(self, waiting: list[Request]) -> list[Request]:
        """The fair order of ``waiting``: a merge of the adapters' FIFO queues through a heap keyed by
        (virtual time, head's arrival, first place in ``waiting``), O(n log adapters). When neither the
        waiting list nor any virtual time changed since the last call, and that merge never had to break
        a tie by place (which depends on the list's order), ordering the last order gives it back: it stands."""
        if self._last is not None and self._last_version == self._version and _same_requests(waiting, self._last):
            return waiting
        resumed = [r for r in waiting if r.status == RequestStatus.PREEMPTED]
        queues: dict[int, deque[Request]] = {}
        for request in waiting:
            if request.status != RequestStatus.PREEMPTED:
                queues.setdefault(request.lora_int_id, deque()).append(request)
        heap = [(max(self.virtual_time.get(lora_id, 0.0), self.now), queue[0].arrival_time, place, lora_id)
                for place, (lora_id, queue) in enumerate(queues.items())]
        heapq.heapify(heap)
        ordered = resumed
        tied = False
        while heap:
            clock, arrival, place, lora_id = heap[0]
            tied = tied or any(entry[:2] == (clock, arrival) for entry in heap[1:3])
            queue = queues[lora_id]
            ordered.append(queue.popleft())
            if queue:
                heapq.heapreplace(heap, (clock + 1, queue[0].arrival_time, place, lora_id))
            else:
                heapq.heappop(heap)
        self._last, self._last_version = (None, -1) if tied else (ordered, self._version)
        return ordered

    def started(self, request: Request) -> None:
        lora_id = request.lora_int_id
        start = max(self.virtual_time.get(lora_id, 0.0), self.now)
        self.now = start
        self.virtual_time[lora_id] = start + 1
        self._version += 1


def _same_requests(waiting: list[Request], last: list[Request]) -> bool:
    """Whether ``waiting`` holds the same requests in the same order as ``last`` (by identity): the order
    of an ordered list is itself, so nothing needs merging."""
    return len(waiting) == len(last) and all(map(operator.is_, waiting, last))


class LoRAAdmission:
    """A waiting request whose adapter is neither among the running requests' adapters nor fits in a free
    slot waits (keeping its place) until one frees up. Running requests are always scheduled, so every
    step's adapters fit in ``max_loras`` device slots. ``fair``: waiting requests in FairLoRAQueue order."""

    def __init__(self, max_loras: int, fair: bool = False) -> None:
        self.max_loras = max_loras
        self.fair_queue = FairLoRAQueue() if fair else None
        self._active: set[int] = set()

    def start_step(self, running: list[Request], waiting: list[Request]) -> None:
        self._active = {r.lora_int_id for r in running if r.lora_int_id}
        if self.fair_queue is not None and len(waiting) > 1:
            waiting[:] = self.fair_queue.order(waiting)

    def admits(self, request: Request) -> bool:
        lora_id = request.lora_int_id
        if not lora_id or lora_id in self._active:
            return True
        if len(self._active) >= self.max_loras:
            return False
        self._active.add(lora_id)
        return True

    def started(self, request: Request) -> None:
        if self.fair_queue is not None:
            self.fair_queue.started(request)


def lora_stats(max_loras: int, running: list[Request], waiting: list[Request]) -> LoRAStats:
    def names(requests: list[Request]) -> list[str]:
        return sorted({r.lora_request.lora_name for r in requests if r.lora_request is not None})
    return LoRAStats(max_loras, names(running), names(waiting))

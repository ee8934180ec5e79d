"""Scheduler hooks for LoRA (no torch).

``LoRAAdmission`` is the scheduler's admission hook with LoRA on: the running set never holds more than
``max_loras`` adapters, and (``--lora-scheduling fair``, the default) waiting requests start in the order
of ``FairLoRAQueue``, so that an adapter sending ten times more requests than another cannot make it wait
behind its backlog.
"""
from __future__ import annotations

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

    def order(self, waiting: list[Request]) -> list[Request]:
        resumed = [r for r in waiting if r.status == RequestStatus.PREEMPTED]
        queues: dict[int, deque[Request]] = {}
        for request in waiting:
            if request.status != RequestStatus.PREEMPTED:
                queues.setdefault(request.lora_int_id, deque()).append(request)
        clock = {lora_id: max(self.virtual_time.get(lora_id, 0.0), self.now) for lora_id in queues}
        ordered = resumed
        while queues:
            lora_id = min(queues, key=lambda i: (clock[i], queues[i][0].arrival_time))
            queue = queues[lora_id]
            ordered.append(queue.popleft())
            clock[lora_id] += 1
            if not queue:
                del queues[lora_id]
        return ordered

    def started(self, request: Request) -> None:
        lora_id = request.lora_int_id
        start = max(self.virtual_time.get(lora_id, 0.0), self.now)
        self.now = start
        self.virtual_time[lora_id] = start + 1


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

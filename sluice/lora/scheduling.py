"""Scheduler hooks for LoRA (no torch).

``LoRAAdmission`` is the scheduler's admission hook with LoRA on: the running set never holds more than
``max_loras`` adapters, and (``--lora-scheduling fair``, the default) waiting requests start in the order
of ``FairLoRAQueue``, so that an adapter sending ten times more requests than another cannot make it wait
behind its backlog.
"""
from __future__ import annotations

import bisect
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
        # The last order, kept when it broke no tie by place: its requests' merge keys (virtual time at
        # which each starts, arrival) ascending, how many of its front have started since, and per adapter
        # how many of its requests it holds and the key time its next request would get.
        self._last: list[Request] | None = None
        self._keys: list[tuple[float, float]] = []
        self._consumed = 0
        self._num_waiting: dict[int, int] = {}
        self._next_clock: dict[int, float] = {}

    def order(self, waiting: list[Request]) -> list[Request]:
        """The fair order of ``waiting``.

        Full merge: the adapters' FIFO queues through a heap keyed by (virtual time, head's arrival, first
        place in ``waiting``), O(n log adapters). Incremental, when the last order broke no tie by place
        (so it does not depend on the list's order): if since then only its front started, in order (the
        rest keeps its keys: starting the lowest key moves no other adapter's clock) and new requests were
        appended, each new one is inserted at its key, O(log n) + a list insert; an unchanged list is
        returned as it is.
        """
        if self._last is not None:
            incremental = self._insert_arrivals(waiting)
            if incremental is not None:
                return incremental
        return self._merge(waiting)

    def _merge(self, waiting: list[Request]) -> list[Request]:
        resumed = [r for r in waiting if r.status == RequestStatus.PREEMPTED]
        queues: dict[int, deque[Request]] = {}
        for request in waiting:
            if request.status != RequestStatus.PREEMPTED:
                queues.setdefault(request.lora_int_id, deque()).append(request)
        sizes = {lora_id: len(queue) for lora_id, queue in queues.items()}
        heap = [(max(self.virtual_time.get(lora_id, 0.0), self.now), queue[0].arrival_time, place, lora_id)
                for place, (lora_id, queue) in enumerate(queues.items())]
        heapq.heapify(heap)
        any_resumed = bool(resumed)
        ordered = resumed
        keys: list[tuple[float, float]] = []
        next_clock: dict[int, float] = {}
        tied = False
        while heap:
            clock, arrival, place, lora_id = heap[0]
            tied = tied or any(entry[:2] == (clock, arrival) for entry in heap[1:3])
            queue = queues[lora_id]
            ordered.append(queue.popleft())
            keys.append((clock, arrival))
            next_clock[lora_id] = clock + 1
            if queue:
                heapq.heapreplace(heap, (clock + 1, queue[0].arrival_time, place, lora_id))
            else:
                heapq.heappop(heap)
        if tied or any_resumed:
            self._last = None
        else:
            self._last, self._keys, self._consumed, self._next_clock = list(ordered), keys, 0, next_clock
            self._num_waiting = sizes
        return ordered

    def _insert_arrivals(self, waiting: list[Request]) -> list[Request] | None:
        """The incremental order (see ``order``), or None when the list changed otherwise."""
        rest = self._last[self._consumed:]
        if len(waiting) < len(rest) or not all(map(operator.is_, waiting, rest)):
            return None
        if len(waiting) == len(rest) and not self._consumed:
            return waiting
        keys = self._keys[self._consumed:]
        num_waiting, next_clock = self._num_waiting, self._next_clock  # (a failure below resets them by a merge)
        for request in waiting[len(rest):]:
            if request.status == RequestStatus.PREEMPTED:
                return None
            lora_id = request.lora_int_id
            if num_waiting.get(lora_id, 0):
                clock = next_clock[lora_id]
            else:  # joins now, as in the merge
                clock = max(self.virtual_time.get(lora_id, 0.0), self.now)
            key = (clock, request.arrival_time)
            index = bisect.bisect_left(keys, key)
            if index < len(keys) and keys[index] == key:
                return None  # a tie: the full merge breaks it by place
            keys.insert(index, key)
            rest.insert(index, request)
            num_waiting[lora_id] = num_waiting.get(lora_id, 0) + 1
            next_clock[lora_id] = clock + 1
        self._last, self._keys, self._consumed = rest, keys, 0
        return list(rest)

    def started(self, request: Request) -> None:
        lora_id = request.lora_int_id
        start = max(self.virtual_time.get(lora_id, 0.0), self.now)
        self.now = start
        self.virtual_time[lora_id] = start + 1
        last = self._last
        if last is not None and self._consumed < len(last) and last[self._consumed] is request:
            self._consumed += 1
            self._num_waiting[lora_id] -= 1
        else:
            self._last = None  # not the front of the last order: other clocks may have moved


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

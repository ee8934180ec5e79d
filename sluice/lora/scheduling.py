"""Scheduler hooks for LoRA (no torch): the running set never holds more than ``max_loras`` adapters."""
from __future__ import annotations

from sluice.core.request import Request


class LoRAAdmission:
    """The scheduler's admission hook with LoRA on: a waiting request whose adapter is neither among the
    running requests' adapters nor fits in a free slot waits (keeping its place) until one frees up. Running
    requests are always scheduled, so every step's adapters fit in ``max_loras`` device slots."""

    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._active: set[int] = set()

    def start_step(self, running: list[Request]) -> None:
        self._active = {r.lora_int_id for r in running if r.lora_int_id}

    def admits(self, request: Request) -> bool:
        lora_id = request.lora_int_id
        if not lora_id or lora_id in self._active:
            return True
        if len(self._active) >= self.max_loras:
            return False
        self._active.add(lora_id)
        return True

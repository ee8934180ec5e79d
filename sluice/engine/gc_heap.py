"""Keeping Python's garbage collector out of the step loop.

Start-up leaves half a million or more objects that the collector tracks (torch, triton and transformers
modules, the model's modules, tokenizer tables). A collection of the oldest generation walks all of them:
about 0.2-0.3 s, during which no step is launched and the GPU runs dry. A W1 run triggers several (an
L8 step profile on the H100 showed three GPU gaps of 0.3 s in 25 s). Moving the start-up heap to the
permanent generation (``gc.freeze()``) leaves those collections only the objects the run allocates.
Reference counting still frees frozen objects; only cycles among them wait for ``gc.unfreeze()``.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def freeze_startup_heap() -> None:
    """For a process that lives as long as its engine (the engine-core process, an API server): collect the
    start-up garbage once, then freeze what is left for the life of the process."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Freezes the heap for a run (``LLM.generate``) and unfreezes all of it afterwards, so that an engine dropped
    later is collected as usual, cycles included. A heap frozen before the run (some Python environments
    freeze a few hundred objects at start-up) leaves the run unfrozen too: freezing is only a hint to the
    collector, and an engine that stayed frozen would keep its GPU memory until the process ends."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()

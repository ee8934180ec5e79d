"""The step loop runs with the start-up heap frozen, so that no full collection stalls a step."""
from __future__ import annotations

import gc
import weakref

import pytest

from sluice import LLM, SamplingParams
from sluice.engine.gc_heap import frozen_heap
from tests.tiny_models import save_tiny_model


def test_frozen_heap_freezes_for_the_run_and_unfreezes_after():
    state = [[] for _ in range(3)]  # stands for the engine, built before the run
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        assert not any(obj is state for obj in gc.get_objects())  # frozen: no collection walks it
    assert gc.get_freeze_count() == 0
    assert any(obj is state for obj in gc.get_objects())
    with pytest.raises(RuntimeError):
        with frozen_heap():
            raise RuntimeError("a failed run unfreezes too")
    assert gc.get_freeze_count() == 0


def test_frozen_heap_freezes_even_when_the_process_froze_objects_before():
    """Some Python environments freeze a few hundred objects at start-up: the run is frozen all the same."""
    gc.freeze()  # what such an environment did
    try:
        state = [[] for _ in range(3)]
        with frozen_heap():
            assert not any(obj is state for obj in gc.get_objects())
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_generate_steps_with_the_heap_frozen_and_the_engine_is_collected_after(tmp_path):
    llm = LLM(model=str(save_tiny_model(tmp_path / "m")), max_num_seqs=4)
    engine = llm.llm_engine
    original_step = engine.step
    engine_tracked = []  # per step: does a collection still walk the engine? (frozen objects are not listed)

    def step(core=engine.core, original=original_step):
        engine_tracked.append(any(obj is core for obj in gc.get_objects()))
        return original()

    engine.step = step
    outputs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3, SamplingParams(max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4, 4]
    assert engine_tracked and not any(engine_tracked)
    assert gc.get_freeze_count() == 0
    assert any(obj is engine.core for obj in gc.get_objects())
    # Nothing of the engine stays frozen: once dropped, a collection frees it (cycles included).
    model = weakref.ref(engine.core.runner.model)
    del llm, engine, step, original_step
    gc.collect()
    assert model() is None

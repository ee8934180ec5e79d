"""The step loop runs with the start-up heap frozen, so that no full collection stalls a step."""
from __future__ import annotations

import gc
import weakref

import pytest

from sluice import LLM, SamplingParams
from sluice.engine.gc_heap import frozen_heap
from tests.tiny_models import save_tiny_model


def test_frozen_heap_freezes_for_the_run_and_unfreezes_after():
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError):
        with frozen_heap():
            raise RuntimeError("a failed run unfreezes too")
    assert gc.get_freeze_count() == 0


def test_frozen_heap_leaves_a_heap_frozen_by_someone_else_frozen():
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        with frozen_heap():
            pass
        assert gc.get_freeze_count() == before
    finally:
        gc.unfreeze()


def test_generate_steps_with_the_heap_frozen_and_the_engine_is_collected_after(tmp_path):
    llm = LLM(model=str(save_tiny_model(tmp_path / "m")), max_num_seqs=4)
    engine = llm.llm_engine
    original_step = engine.step
    freeze_counts = []

    def step():
        freeze_counts.append(gc.get_freeze_count())
        return original_step()

    engine.step = step
    outputs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3, SamplingParams(max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4, 4]
    assert freeze_counts and all(count > 0 for count in freeze_counts)
    assert gc.get_freeze_count() == 0
    # Nothing of the engine stays frozen: once dropped, a collection frees it (cycles included).
    model = weakref.ref(engine.core.runner.model)
    del llm, engine, step, original_step
    gc.collect()
    assert model() is None

"""CompileLog records the Triton compiles that happen inside it, and only those."""
from types import SimpleNamespace

import pytest

from sluice.bench.compile_log import CompileLog

triton = pytest.importorskip("triton")


def _compile(name: str) -> None:
    """What Triton's JIT does around one compile: the hook before, the compile, the hook after."""
    hooks = triton.knobs.runtime
    assert not hooks.jit_cache_hook(key=None, repr=f"{name}[num_warps=4]", fn=SimpleNamespace(name=name),
                                    compile={}, is_manual_warmup=False, already_compiled=False)
    hooks.jit_post_compile_hook(key=None, repr=f"{name}[num_warps=4]", fn=SimpleNamespace(name=name),
                                compile={}, is_manual_warmup=False, already_compiled=False)


def test_records_compiles_with_their_step_and_removes_its_hooks():
    with CompileLog() as log:
        _compile("paged_attention_kernel")
        log.step = 7
        _compile("_fused_sample_kernel")
    assert [(e["step"], e["kernel"]) for e in log.events] == [(-1, "paged_attention_kernel"),
                                                              (7, "_fused_sample_kernel")]
    assert all(e["seconds"] >= 0 for e in log.events) and log.seconds >= 0
    assert [e["kernel"] for e in log.during_run] == ["_fused_sample_kernel"]  # stamped with a step
    assert CompileLog.totals(log.during_run) == {"count": 1, "seconds": log.events[1]["seconds"]}
    assert log.events[1]["variant"].startswith("_fused_sample_kernel[")
    assert triton.knobs.runtime.jit_cache_hook is None and triton.knobs.runtime.jit_post_compile_hook is None

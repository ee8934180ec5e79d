"""An fp8 KV cache on the embedded default model (SmolLM2-135M, Q4_1 GGUF), CPU reference attention, float32,
scales calculated from the first step: greedy tokens and logits against the model-dtype KV cache.

Measured on this model (x86 CPU, float32, 16 prompts x 16 tokens): teacher-forced over the auto cache's own
outputs (358 positions), the logits move by a relative L2 of 0.037 (max |diff| 4.3 on logits of std 7.9) and
the argmax agrees at 95% of positions; every one of the 18 flips is at a near tie (auto's top-2 margin at most
0.30; the median margin is 1.13). A flip ends a greedy run's agreement, so 8 of 16 prompts keep all 16 tokens
(the matching prefix averages 10.4 tokens); in bfloat16, 10 of 16. The bounds below leave margin over these.
"""
from __future__ import annotations

import pytest
import torch

from sluice import LLM, SamplingParams
from sluice.attention import ENV_CPU_ATTENTION

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
           "Explain photosynthesis in one sentence.", "List three primary colors:",
           "Once upon a time, in a small village,", "The quick brown fox", "What is 17 times 23?",
           "Translate 'good morning' into Spanish:", "The meaning of life is", "import numpy as np\n",
           "Dear hiring manager,", "The three laws of motion are", "My favourite recipe for pancakes:",
           "In 1969, astronauts", "SELECT name FROM users WHERE"]
NUM_TOKENS = 16
MIN_PROMPTS_AGREEING = 6  # of 16 keep all 16 greedy tokens (measured 8)
MIN_MEAN_MATCHING_PREFIX = 8.0  # tokens (measured 10.4)
MAX_LOGITS_REL_L2 = 0.06  # measured 0.037
MIN_ARGMAX_AGREEMENT = 0.9  # measured 0.95
CLEAR_MARGIN = 1.0  # auto's top-2 logit margin above which fp8 never flips the argmax (flips measured up to 0.30)


def _run(kv_cache_dtype: str, **kwargs) -> tuple[list[list[int]], torch.Tensor, LLM]:
    """Greedy tokens, then the logits of every position of prompt + the auto cache's tokens (teacher-forced)."""
    llm = LLM(dtype="float32", max_model_len=256, kv_cache_dtype=kv_cache_dtype, **kwargs)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs], [o.prompt_token_ids for o in outputs], llm


def _teacher_forced_logits(llm: LLM, sequences: list[list[int]]) -> torch.Tensor:
    """Every logits row the model computes for the sequences (prompt logprobs ask for all positions), in order."""
    model = llm.llm_engine.core.runner.model
    rows: list[torch.Tensor] = []
    compute_logits = model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        logits = compute_logits(hidden)
        rows.append(logits.float().clone())
        return logits

    model.compute_logits = recording
    try:
        llm.generate([{"prompt_token_ids": s} for s in sequences],
                     SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    finally:
        model.compute_logits = compute_logits
    return torch.cat(rows)


@pytest.fixture(scope="module")
def runs():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_CPU_ATTENTION, "reference")
        auto_tokens, prompt_ids, auto = _run("auto")
        sequences = [p + t for p, t in zip(prompt_ids, auto_tokens)]
        auto_logits = _teacher_forced_logits(auto, sequences)
        del auto
        fp8_tokens, _, fp8 = _run("fp8", calculate_kv_scales=True)
        assert type(fp8.llm_engine.core.runner.attn_backend).__name__ == "TorchRefBackend"
        fp8_logits = _teacher_forced_logits(fp8, sequences)
    return auto_tokens, fp8_tokens, auto_logits, fp8_logits


def test_fp8_kv_keeps_the_first_greedy_tokens_of_prompts_without_near_ties(runs):
    auto_tokens, fp8_tokens, _, _ = runs
    agreeing = sum(a == f for a, f in zip(auto_tokens, fp8_tokens))
    first_divergence = [next((i for i, (a, f) in enumerate(zip(x, y)) if a != f), NUM_TOKENS)
                        for x, y in zip(auto_tokens, fp8_tokens)]
    print(f"fp8 KV: {agreeing}/16 prompts keep {NUM_TOKENS} greedy tokens; first divergence {first_divergence}")
    assert agreeing >= MIN_PROMPTS_AGREEING, first_divergence
    assert sum(first_divergence) / len(first_divergence) >= MIN_MEAN_MATCHING_PREFIX, first_divergence


def test_fp8_kv_logits_stay_close_to_auto_kv(runs):
    _, _, auto_logits, fp8_logits = runs
    assert auto_logits.shape == fp8_logits.shape and auto_logits.shape[0] > 16 * NUM_TOKENS
    rel_l2 = float((fp8_logits - auto_logits).norm() / auto_logits.norm())
    flips = fp8_logits.argmax(-1) != auto_logits.argmax(-1)
    argmax_agreement = 1.0 - float(flips.float().mean())
    top2 = auto_logits.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    print(f"fp8 KV argmax flips at auto top-2 margins {sorted(round(float(m), 3) for m in margins[flips])}; "
          f"median margin {margins.median():.3f}")
    print(f"fp8 KV logits: relative L2 {rel_l2:.4f}, max |diff| {(fp8_logits - auto_logits).abs().max():.3f} "
          f"(logits std {auto_logits.std():.2f}), argmax agreement {argmax_agreement:.3f} "
          f"over {auto_logits.shape[0]} positions")
    assert rel_l2 < MAX_LOGITS_REL_L2
    assert argmax_agreement > MIN_ARGMAX_AGREEMENT
    assert not (flips & (margins > CLEAR_MARGIN)).any(), "fp8 KV flipped a clear argmax"

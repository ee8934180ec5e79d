"""The trained tiny Llama (tests/tiny_models.py `save_trained_tiny_model`) is a sound instrument for
reduced-precision tests: it continues copy-task prompts with wide greedy margins, sluice in float32
on CPU equals transformers' generate on it, and sluice in bfloat16 on CPU gives the same first 32
tokens as float32 for every prompt (the GPU bfloat16 test relies on this)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sluice import LLM, SamplingParams
from tests.tiny_models import COPY_PERIOD, copy_task_prompts, hf_greedy, save_trained_tiny_model

MAX_NEW_TOKENS = 32
MIN_MARGIN = 1.0  # logits; bfloat16 moves this model's logits by about 0.3 (transformers, bf16 vs fp32)
ENGINE_ARGS = dict(max_model_len=256, block_size=16, max_num_batched_tokens=64, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> str:
    return str(save_trained_tiny_model(tmp_path_factory.mktemp("trained_llama")))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return copy_task_prompts()


@pytest.fixture(scope="module")
def float32_greedy(trained_model, prompts) -> list[list[int]]:
    return _sluice_greedy(trained_model, "float32", prompts)


def _periodic_continuation(prompt: list[int], num_tokens: int) -> list[int]:
    sequence = list(prompt)
    for _ in range(num_tokens):
        sequence.append(sequence[-COPY_PERIOD])
    return sequence[len(prompt):]


def _sluice_greedy(model: str, dtype: str, prompts: list[list[int]]) -> list[list[int]]:
    llm = LLM(model=model, dtype=dtype, device="cpu", **ENGINE_ARGS)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@torch.no_grad()
def test_greedy_path_repeats_the_pattern_with_wide_margins(trained_model, prompts):
    model = AutoModelForCausalLM.from_pretrained(trained_model, dtype=torch.float32).eval()
    for i, prompt in enumerate(prompts):
        continuation = _periodic_continuation(prompt, MAX_NEW_TOKENS)
        logits = model(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1:-1]
        top2 = logits.topk(2, dim=-1)
        assert top2.indices[:, 0].tolist() == continuation, f"prompt {i} is not continued by copying"
        margin = (top2.values[:, 0] - top2.values[:, 1]).min().item()
        assert margin > MIN_MARGIN, f"prompt {i}: greedy margin {margin:.2f}"


def test_float32_greedy_equals_transformers(trained_model, prompts, float32_greedy):
    assert float32_greedy == hf_greedy(trained_model, prompts, MAX_NEW_TOKENS)


def test_bfloat16_greedy_equals_float32_for_every_prompt(trained_model, prompts, float32_greedy):
    bfloat16 = _sluice_greedy(trained_model, "bfloat16", prompts)
    diverged = [i for i, (want, have) in enumerate(zip(float32_greedy, bfloat16)) if have != want]
    assert not diverged, f"bfloat16 diverges from float32 on prompts {diverged}"

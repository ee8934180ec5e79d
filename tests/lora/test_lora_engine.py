"""Multi-LoRA serving end to end (float32, CPU): greedy sluice output with a PEFT adapter equals the PEFT
model's generate token for token, alone and in batches mixing adapters and the base model, under chunked
prefill, forced preemption, prefix caching and fewer slots than adapters in flight. Every KV block is
back in the pool after each run."""
from __future__ import annotations

import random

import pytest

from sluice import LLM, LoRARequest, SamplingParams
from tests.engine.test_hf_equivalence import assert_no_leaked_blocks
from tests.lora.peft_adapters import save_peft_adapter
from tests.tiny_models import hf_greedy, save_tiny_model

MAX_NEW_TOKENS = 8
# name -> (rank, target modules, extra LoraConfig arguments)
ADAPTERS = {
    "attn_r4": (4, ["q_proj", "k_proj", "v_proj", "o_proj"], {}),
    "mlp_r8": (8, ["gate_proj", "up_proj", "down_proj"], {}),
    "all_r8_rslora": (8, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], {"use_rslora": True}),
}


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(4, 384) for _ in range(20)]
    prompts = [[rng.randrange(4, 384) for _ in range(n)] for n in (3, 11, 26)]
    return prompts + [shared + [rng.randrange(4, 384) for _ in range(k)] for k in (2, 7)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tmp_path_factory):
    """(base path, prompts, {adapter name: (LoRARequest, expected)}, base expected)."""
    root = tmp_path_factory.mktemp(request.param)
    base = save_tiny_model(root / "base", request.param)
    prompts = _prompts()
    adapters = {}
    for lora_id, (name, (rank, targets, extra)) in enumerate(ADAPTERS.items(), start=1):
        expected = save_peft_adapter(base, root / name, rank, targets, seed=lora_id, prompts=prompts,
                                     max_new_tokens=MAX_NEW_TOKENS, **extra)
        adapters[name] = (LoRARequest(name, lora_id, str(root / name)), expected)
    return base, prompts, adapters, hf_greedy(base, prompts, MAX_NEW_TOKENS)


def _llm(base, **kwargs) -> LLM:
    kwargs = {"max_loras": 3, "max_lora_rank": 8, **kwargs}
    return LLM(model=str(base), dtype="float32", device="cpu", max_model_len=128, enable_lora=True, **kwargs)


def _generate(llm: LLM, prompts, lora_requests) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                           lora_request=lora_requests)
    return [o.outputs[0].token_ids for o in outputs]


def _mixed_batch(prompts, adapters, base_expected):
    """Every prompt under every adapter and the base model, interleaved: (prompts, lora requests, expected)."""
    choices = [(None, base_expected)] + list(adapters.values())
    rows = [(p, choices[(i + j) % len(choices)], i) for j in range(len(choices)) for i, p in enumerate(prompts)]
    return ([p for p, _, _ in rows], [c[0] for _, c, _ in rows], [c[1][i] for _, c, i in rows])


def test_each_adapter_matches_peft_generate(setup):
    base, prompts, adapters, base_expected = setup
    llm = _llm(base)
    for name, (lora_request, expected) in adapters.items():
        assert expected != base_expected, f"{name} does not change the output: the test would prove nothing"
        assert _generate(llm, prompts, lora_request) == expected, name
        assert_no_leaked_blocks(llm)
    assert _generate(llm, prompts, None) == base_expected
    assert_no_leaked_blocks(llm)


ENGINE_CONFIGS = {
    "prefix_caching": dict(enable_prefix_caching=True),
    "chunked_prefill_budget_8": dict(max_num_batched_tokens=8),
    "forced_preemption": dict(num_kv_blocks=14, block_size=4, max_num_batched_tokens=32),
    "one_slot_for_three_adapters": dict(max_loras=1, max_cpu_loras=2, max_num_batched_tokens=16),
}


@pytest.mark.parametrize("config_name", list(ENGINE_CONFIGS))
def test_mixed_batch_gives_each_row_its_own_adapter(setup, config_name):
    base, prompts, adapters, base_expected = setup
    llm = _llm(base, **ENGINE_CONFIGS[config_name])
    batch_prompts, lora_requests, expected = _mixed_batch(prompts, adapters, base_expected)
    for _ in range(2):  # the second round hits the prefix cache: blocks of one adapter never serve another
        assert _generate(llm, batch_prompts, lora_requests) == expected
        assert_no_leaked_blocks(llm)
    if config_name == "forced_preemption":
        assert llm.llm_engine.core.scheduler.num_preemptions > 0


def test_unsupported_adapters_are_refused_naming_what(setup, tmp_path):
    base, prompts, _, _ = setup
    llm = _llm(base)
    save_peft_adapter(base, tmp_path / "embed", 4, ["q_proj", "embed_tokens"], seed=9)
    with pytest.raises(ValueError, match="embed_tokens"):
        _generate(llm, prompts[:1], LoRARequest("embed", 11, str(tmp_path / "embed")))
    save_peft_adapter(base, tmp_path / "dora", 4, ["q_proj"], seed=9, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        _generate(llm, prompts[:1], LoRARequest("dora", 12, str(tmp_path / "dora")))
    save_peft_adapter(base, tmp_path / "big", 16, ["q_proj"], seed=9)
    with pytest.raises(ValueError, match="rank 16 is above max_lora_rank=8"):
        _generate(llm, prompts[:1], LoRARequest("big", 13, str(tmp_path / "big")))
    with pytest.raises(ValueError, match="adapter_config.json"):
        _generate(llm, prompts[:1], LoRARequest("missing", 14, str(tmp_path / "nowhere")))
    assert_no_leaked_blocks(llm)


def test_lora_request_without_enable_lora_is_refused(setup):
    base, prompts, adapters, _ = setup
    llm = LLM(model=str(base), dtype="float32", device="cpu", max_model_len=128)
    with pytest.raises(ValueError, match="enable_lora"):
        _generate(llm, prompts[:1], adapters["attn_r4"][0])


def test_adapters_cross_the_process_split(setup):
    from sluice.config import EngineArgs
    from sluice.engine.llm_engine import LLMEngine

    base, prompts, adapters, base_expected = setup
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(base), dtype="float32", device="cpu", max_model_len=128,
                                                   enable_lora=True, max_loras=2), process_split=True)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
        lora_request, expected = adapters["mlp_r8"]
        engine.add_request("lora", {"prompt_token_ids": prompts[1]}, params, lora_request=lora_request)
        engine.add_request("base", {"prompt_token_ids": prompts[1]}, params)
        finished = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output.outputs[0].token_ids
        assert finished == {"lora": expected[1], "base": base_expected[1]}
    finally:
        engine.shutdown()

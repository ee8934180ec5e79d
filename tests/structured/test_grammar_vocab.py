"""A model whose embedding is wider than its tokenizer (tiny Llama: 384 ids, tokenizer 320): the grammars decide
over the tokenizer's ids only, the ids past them are masked whole, and greedy constrained output equals
transformers ``generate`` masked by xgrammar over the model's full vocabulary, token for token (float32, CPU)."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch
import xgrammar as xgr

from sluice import LLM, SamplingParams, StructuredOutputsParams
from sluice.structured_output.backends import grammar_vocab_size
from tests.tiny_models import build_tokenizer, save_tiny_model

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["color", "n"], "additionalProperties": False}
REGEX = r"[a-z]{3,8}-\d{2}"
PROMPTS = ["JSON: ", "abc abc", "The quick brown fox"]


def _constraint(kind: str) -> StructuredOutputsParams:
    if kind == "json":
        return StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    return StructuredOutputsParams(regex=REGEX)


def _hf_constrained_greedy(path, prompt_ids: list[int], kind: str, max_new_tokens: int) -> list[int]:
    """transformers greedy, each step masked by an xgrammar matcher over the model's whole vocabulary."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    vocab_size = model.config.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(build_tokenizer(), vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info)
    compiled = (compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False) if kind == "json"
                else compiler.compile_regex(REGEX))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[:, -1, :].clone()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            token = int(logits.argmax(-1))
            assert matcher.accept_token(token)
            ids.append(token)
            out.append(token)
            if matcher.is_terminated():
                break
    return out


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("padded"), "llama")


def test_grammar_vocab_is_the_tokenizers_ids_capped_by_the_model():
    tokenizer = build_tokenizer()
    assert len(tokenizer) == 320
    assert grammar_vocab_size(tokenizer, 384) == 320
    assert grammar_vocab_size(tokenizer, 300) == 300  # a tokenizer wider than the model keeps the model's


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_constrained_output_equals_transformers_masked_over_the_full_vocabulary(model_path,
                                                                                      async_scheduling):
    tokenizer = build_tokenizer()
    llm = LLM(model=str(model_path), dtype="float32", device="cpu", max_model_len=128, num_kv_blocks=24,
              block_size=4, max_num_batched_tokens=16, async_scheduling=async_scheduling, enable_prefix_caching=True)
    kinds = ["json", "regex", "json"]
    params = [SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=_constraint(k)) for k in kinds]
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    core = llm.llm_engine.core
    assert core.structured_output.grammar_vocab_size == 320 < llm.llm_engine.model_config.vocab_size == 384
    for prompt, kind, out in zip(PROMPTS, kinds, outputs):
        want = _hf_constrained_greedy(model_path, tokenizer(prompt)["input_ids"], kind, 24)
        assert list(out.outputs[0].token_ids) == want, (kind, out.outputs[0].text)
    assert core.scheduler.kv_cache_manager.usage == 0.0 and core.structured_output.num_active == 0


def test_sampled_tokens_never_leave_the_tokenizers_ids(model_path):
    """Random weights put a sixth of the probability on the 64 ids past the tokenizer: unmasked, some of 8
    sampled outputs would take one."""
    llm = LLM(model=str(model_path), dtype="float32", device="cpu", max_model_len=128)
    params = [SamplingParams(temperature=1.5, seed=seed, max_tokens=40, structured_outputs=_constraint("json"))
              for seed in range(8)]
    outputs = llm.generate(["JSON: "] * 8, params, use_tqdm=False)
    for out in outputs:
        completion = out.outputs[0]
        assert max(completion.token_ids) < 320
        if completion.finish_reason == "stop":
            jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert any(out.outputs[0].finish_reason == "stop" for out in outputs)

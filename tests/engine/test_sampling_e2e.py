"""Sampling end to end on a tiny random Llama (float32, CPU), with transformers as the oracle.

Logprobs and prompt logprobs, repetition penalty, beam search, n > 1 sharing the prompt's
KV blocks, seeded sampling in any batch, validation through LLM.generate, output kinds.
"""
from __future__ import annotations

import random

import pytest
import torch

from sluice import LLM, SamplingParams
from sluice.sampling_params import BeamSearchParams, RequestOutputKind
from tests.tiny_models import save_tiny_model

BLOCK_SIZE = 4
VOCAB_SIZE = 384


def _random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(4, VOCAB_SIZE) for _ in range(length)]


def _hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def _hf_generate(model, prompt: list[int], **config) -> list[list[int]]:
    """transformers' generate on one unpadded prompt; returns the generated part of each sequence."""
    from transformers import GenerationConfig
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=GenerationConfig(**config))
    return [row[len(prompt):] for row in out.tolist()]


def _hf_log_softmax(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_no_leaked_blocks(llm: LLM) -> None:
    pool = llm.llm_engine.core.scheduler.kv_cache_manager.block_pool
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.get_num_unfinished_requests() == 0
    assert pool.num_free_blocks == pool.num_blocks
    assert all(block.ref_cnt == 0 for block in pool.blocks)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def hf_model(model_path):
    return _hf_model(model_path)


def _llm(model_path, enable_prefix_caching: bool) -> LLM:
    return LLM(model=str(model_path), dtype="float32", device="cpu", max_model_len=128,
               block_size=BLOCK_SIZE, num_kv_blocks=256, enable_prefix_caching=enable_prefix_caching)


@pytest.fixture(scope="module")
def llm(model_path):
    return _llm(model_path, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def llm_without_prefix_caching(model_path):
    return _llm(model_path, enable_prefix_caching=False)


@pytest.fixture(params=["prefix_caching_on", "prefix_caching_off"])
def any_llm(request, llm, llm_without_prefix_caching):
    """n > 1 children share the prompt's full blocks either way (off: only among siblings)."""
    return llm if request.param == "prefix_caching_on" else llm_without_prefix_caching


# ---- logprobs ---------------------------------------------------------------------------

def test_logprobs_and_prompt_logprobs_equal_log_softmax_of_transformers_logits(llm, hf_model):
    prompt = _random_prompt(random.Random(1), 13)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    completion = output.outputs[0]
    reference = _hf_log_softmax(hf_model, prompt + completion.token_ids)

    assert len(completion.logprobs) == len(completion.token_ids) == 6
    for i, (token_id, logprobs) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = reference[len(prompt) + i - 1]
        top = row.topk(5)
        assert set(logprobs) == set(top.indices.tolist())  # greedy: the sampled token is the top-1
        for token_id_k, logprob in logprobs.items():
            assert logprob.logprob == pytest.approx(row[token_id_k].item(), abs=1e-4)
        assert logprobs[token_id].rank == 1
    assert completion.cumulative_logprob == pytest.approx(
        sum(reference[len(prompt) + i - 1, t].item() for i, t in enumerate(completion.token_ids)), abs=1e-3)

    assert output.prompt_logprobs[0] is None  # the first prompt token has no distribution
    assert len(output.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        row = reference[position - 1]
        logprobs = output.prompt_logprobs[position]
        actual_token = prompt[position]
        assert set(row.topk(3).indices.tolist()) <= set(logprobs)
        assert logprobs[actual_token].logprob == pytest.approx(row[actual_token].item(), abs=1e-4)
        assert logprobs[actual_token].rank == 1 + int((row > row[actual_token]).sum())
    assert_no_leaked_blocks(llm)


# ---- repetition penalty -----------------------------------------------------------------

def test_repetition_penalty_greedy_equals_transformers(llm, hf_model):
    rng = random.Random(2)
    prompts = [_random_prompt(rng, n) for n in (3, 9, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for prompt, output, unpenalized in zip(prompts, outputs, plain):
        want = _hf_generate(hf_model, prompt, do_sample=False, max_new_tokens=16, repetition_penalty=1.8,
                            eos_token_id=None, pad_token_id=0)[0]
        assert output.outputs[0].token_ids == want
    # The penalty has to matter for the comparison to mean anything.
    assert [o.outputs[0].token_ids for o in outputs] != [o.outputs[0].token_ids for o in plain]


# ---- beam search ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def beam_model(tmp_path_factory, model_path, hf_model):
    """The same weights, with eos set to a token greedy decoding emits early, so that beams do finish."""
    prompt = _random_prompt(random.Random(0), 5)
    greedy = _hf_generate(hf_model, prompt, do_sample=False, max_new_tokens=3, eos_token_id=None, pad_token_id=0)
    eos = greedy[0][2]
    path = save_tiny_model(tmp_path_factory.mktemp("llama_eos"), "llama", eos_token_id=eos)
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=64, block_size=BLOCK_SIZE)
    return llm, _hf_model(path), eos


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("beam_width", [2, 4])
def test_beam_search_equals_transformers_beam_search(beam_model, beam_width, length_penalty):
    """HF with early_stopping="never" is exhaustive up to max_new_tokens, which is what beam_search does."""
    llm, hf, eos = beam_model
    rng = random.Random(0)
    prompts = [_random_prompt(rng, n) for n in (5, 11, 20)]
    params = BeamSearchParams(beam_width=beam_width, max_tokens=10, length_penalty=length_penalty)
    outputs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    finish_reasons = set()
    for prompt, output in zip(prompts, outputs):
        want = _hf_generate(hf, prompt, num_beams=beam_width, num_return_sequences=beam_width, do_sample=False,
                            max_new_tokens=10, length_penalty=length_penalty, early_stopping="never",
                            eos_token_id=eos, pad_token_id=eos)
        want = [seq[:seq.index(eos) + 1] if eos in seq else seq for seq in want]  # drop padding after eos
        assert [seq.tokens[len(prompt):] for seq in output.sequences] == want
        for seq in output.sequences:
            assert seq.tokens[:len(prompt)] == prompt
            assert len(seq.logprobs) == len(seq.tokens) - len(prompt)
            chosen = [step[t].logprob for step, t in zip(seq.logprobs, seq.tokens[len(prompt):])]
            assert seq.cum_logprob == pytest.approx(sum(chosen), abs=1e-5)
            assert seq.text == llm.get_tokenizer().decode(
                [t for t in seq.tokens[len(prompt):] if t != eos], skip_special_tokens=True)
            finish_reasons.add(seq.finish_reason)
    if length_penalty <= 1.0:  # a strong penalty pushes eos-finished beams out of the top beam_width
        assert finish_reasons == {"stop", "length"}  # eos-finished beams competed with full-length ones
    assert_no_leaked_blocks(llm)


def test_length_penalty_changes_which_beam_wins(beam_model):
    llm, _, _ = beam_model
    prompt = {"prompt_token_ids": _random_prompt(random.Random(0), 5)}
    best = {lp: llm.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=10, length_penalty=lp))[0]
            .sequences[0] for lp in (0.0, 2.0)}
    assert best[0.0].finish_reason == "stop"  # short: fewer logprobs summed
    assert best[2.0].finish_reason == "length"  # a strong penalty favours long beams
    assert len(best[0.0].tokens) < len(best[2.0].tokens)


def test_beam_search_rejects_a_width_above_the_logprobs_cap(beam_model):
    llm, _, _ = beam_model
    with pytest.raises(ValueError, match="beam_width"):
        llm.beam_search([[5, 6, 7]], BeamSearchParams(beam_width=11, max_tokens=4))
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    assert_no_leaked_blocks(llm)


# ---- n > 1 ------------------------------------------------------------------------------

def test_n_completions_share_the_prompts_full_blocks_and_return_them_all(any_llm):
    llm = any_llm
    engine = llm.llm_engine
    kv_manager = engine.core.scheduler.kv_cache_manager
    pool = kv_manager.block_pool
    assert_no_leaked_blocks(llm)
    prompt = _random_prompt(random.Random(3), 10)  # 2 full blocks + 2 tokens
    engine.add_request("shared", {"prompt_token_ids": prompt},
                       SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True))
    outputs = engine.step()

    tables = [kv_manager.get_block_ids(f"{i}_shared") for i in range(4)]
    full_prompt_blocks = tables[0][:2]
    assert all(table[:2] == full_prompt_blocks for table in tables)  # one copy of the prompt's full blocks
    assert all(pool.blocks[b].ref_cnt == 4 for b in full_prompt_blocks)
    tails = [table[2] for table in tables]
    assert len(set(tails)) == 4 and all(pool.blocks[b].ref_cnt == 1 for b in tails)
    assert pool.num_blocks - pool.num_free_blocks == 2 + 4

    while engine.has_unfinished_requests():
        outputs += engine.step()
    final = [o for o in outputs if o.finished]
    assert len(final) == 1 and final[0].request_id == "shared"
    completions = final[0].outputs
    assert [c.index for c in completions] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in completions)
    assert len({tuple(c.token_ids) for c in completions}) > 1  # each child samples on its own
    assert_no_leaked_blocks(llm)


def test_n_greedy_completions_on_shared_blocks_equal_transformers_greedy(any_llm, hf_model):
    """Children admitted together read prompt KV a sibling writes in the same step."""
    prompt = _random_prompt(random.Random(6), 19)
    params = SamplingParams(n=3, temperature=0.0, max_tokens=8, ignore_eos=True)
    output = any_llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    want = _hf_generate(hf_model, prompt, do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)[0]
    assert [c.token_ids for c in output.outputs] == [want] * 3
    assert_no_leaked_blocks(any_llm)


def test_n_completions_with_a_seed_are_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    prompt = {"prompt_token_ids": _random_prompt(random.Random(4), 7)}
    first, second = (llm.generate(prompt, params, use_tqdm=False)[0] for _ in range(2))
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]


# ---- seeds ------------------------------------------------------------------------------

def test_seeded_sampling_is_identical_alone_and_in_a_batch_of_32_others(llm):
    rng = random.Random(5)
    prompt = {"prompt_token_ids": _random_prompt(rng, 9)}
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids

    others = [{"prompt_token_ids": _random_prompt(rng, rng.randrange(1, 30))} for _ in range(32)]
    other_params = [SamplingParams(temperature=rng.choice([0.0, 0.7, 1.3]), top_k=rng.choice([-1, 5]),
                                   seed=rng.choice([None, 99]), max_tokens=rng.randrange(1, 14), ignore_eos=True)
                    for _ in others]
    batch = others[:20] + [prompt] + others[20:]
    batch_params = other_params[:20] + [seeded] + other_params[20:]
    in_batch = llm.generate(batch, batch_params, use_tqdm=False)[20].outputs[0].token_ids
    assert in_batch == alone
    assert_no_leaked_blocks(llm)


# ---- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("make_params, field", [
    (lambda: SamplingParams(top_k=-2), "top_k"),
    (lambda: SamplingParams(top_p=0.0), "top_p"),
    (lambda: SamplingParams(top_p=1.5), "top_p"),
    (lambda: SamplingParams(n=0), "n"),
    (lambda: SamplingParams(logprobs=21), "logprobs"),
    (lambda: SamplingParams(prompt_logprobs=21), "prompt_logprobs"),
    (lambda: SamplingParams(logit_bias={VOCAB_SIZE: 1.0}), "logit_bias"),
])
def test_invalid_values_raise_naming_the_field_and_leave_no_request_behind(llm, make_params, field):
    good = SamplingParams(max_tokens=4, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9]}] * 3
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        llm.generate(prompts, [good, good, make_params()], use_tqdm=False)
    assert_no_leaked_blocks(llm)
    assert llm.generate(prompts[0], good, use_tqdm=False)[0].outputs[0].token_ids  # the engine still serves


# ---- output kinds -------------------------------------------------------------------------

def _stream(llm: LLM, request_id: str, kind: RequestOutputKind) -> list:
    engine = llm.llm_engine
    engine.add_request(request_id, "The quick brown fox", SamplingParams(
        n=2, temperature=0.0, max_tokens=12, ignore_eos=True, output_kind=kind))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    return outputs


def test_delta_pieces_concatenate_to_the_cumulative_text_and_final_only_yields_once(llm):
    cumulative = _stream(llm, "cumulative", RequestOutputKind.CUMULATIVE)
    delta = _stream(llm, "delta", RequestOutputKind.DELTA)
    final_only = _stream(llm, "final", RequestOutputKind.FINAL_ONLY)

    full = cumulative[-1]
    assert full.finished and len(cumulative) > 1
    for index in range(2):
        pieces = [o.outputs[index] for o in delta]
        assert "".join(p.text for p in pieces) == full.outputs[index].text
        assert [t for p in pieces for t in p.token_ids] == full.outputs[index].token_ids
    assert sum(1 for o in delta if any(c.text for c in o.outputs)) > 1  # really streamed in pieces
    assert len(final_only) == 1 and final_only[0].finished
    assert [c.text for c in final_only[0].outputs] == [c.text for c in full.outputs]
    assert [c.token_ids for c in final_only[0].outputs] == [c.token_ids for c in full.outputs]
    assert_no_leaked_blocks(llm)

"""Speculative decoding of constrained requests (structured outputs) and of requests with logprobs (float32, CPU).

Greedy constrained output with proposals (prompt lookup, a draft model, the target as its own draft, a proposer
whose proposals the grammar refuses) equals the output without speculation, token for token, and follows its
constraint, under chunked prefill, prefix caching and forced preemption, beside unconstrained requests and
requests with logprobs; logprobs with speculation equal those without; these requests do get proposals kept.
After every run, every KV block is back in the pool and every matcher freed."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from sluice import LLM, SamplingParams, StructuredOutputsParams
from tests.engine.test_hf_equivalence import assert_no_leaked_blocks
from tests.spec_decode.test_spec_engine import NGRAM, WrongProposer, _engine
from tests.tiny_models import build_tokenizer, save_tiny_model

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["color", "n"], "additionalProperties": False}
DATE = r"\d{4}-\d{2}-\d{2}"
REPEAT = r"(ab,){10}"
CHOICES = ["alpha", "beta", "gamma"]

# Repetitive prompts: prompt lookup finds the continuation, so proposals are kept.
PROMPTS = {
    "json": 'JSON: {"color":"green","n":5} {"color":"green","n":5} {"color":"green","n":5}',
    "regex": "Dates: 2024-01-02, 2024-01-02, 2024-01-02, ",
    "repeat": "ab,ab,ab,ab,ab,ab,",
    "choice": "Pick one of alpha, beta, gamma: beta beta beta",
    "guidance": 'JSON: {"color":"red","n":1} {"color":"red","n":1}',
}


def _constraint(kind: str) -> StructuredOutputsParams:
    return {
        "json": StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
        "regex": StructuredOutputsParams(regex=DATE),
        "repeat": StructuredOutputsParams(regex=REPEAT),
        "choice": StructuredOutputsParams(choice=CHOICES),
        "guidance": StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True, backend="guidance"),
    }[kind]


def _check(kind: str, text: str) -> None:
    if kind in ("json", "guidance"):
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "choice":
        assert text in CHOICES
    else:
        assert re.fullmatch(DATE if kind == "regex" else REPEAT, text), text


def _batch() -> tuple[list[str], list[SamplingParams]]:
    """Every constraint greedy, then an unconstrained request, one with logprobs, one constrained with logprobs."""
    prompts = list(PROMPTS.values())
    params = [SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=_constraint(k)) for k in PROMPTS]
    prompts += ["ab,ab,ab,ab,", "The quick brown fox. The quick brown fox.", PROMPTS["regex"]]
    params += [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
               SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3),
               SamplingParams(temperature=0.0, max_tokens=48, logprobs=2, structured_outputs=_constraint("regex"))]
    return prompts, params


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    target = save_tiny_model(tmp_path_factory.mktemp("target"), "llama")
    draft = save_tiny_model(tmp_path_factory.mktemp("draft"), "qwen2", seed=7)
    plain = LLM(model=str(target), dtype="float32", device="cpu", max_model_len=128)
    prompts, params = _batch()
    return target, draft, plain.generate(prompts, params, use_tqdm=False), plain


def _assert_same_logprobs(got: list[dict], want: list[dict]) -> None:
    """Same chosen token and top alternatives in order, ranks and values; alternatives a grammar masked (-inf,
    tied in any order) only as many."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g_finite = {t: x for t, x in g.items() if x.logprob > float("-inf")}
        w_finite = {t: x for t, x in w.items() if x.logprob > float("-inf")}
        assert list(g_finite) == list(w_finite) and len(g) == len(w)
        assert [x.rank for x in g_finite.values()] == [x.rank for x in w_finite.values()]
        np.testing.assert_allclose([x.logprob for x in g_finite.values()],
                                   [x.logprob for x in w_finite.values()], atol=1e-4)


SPEC_CONFIGS = {
    "ngram_prefix_caching": dict(spec=NGRAM),
    "ngram_chunked_budget_16": dict(spec=NGRAM, max_num_batched_tokens=16),
    "ngram_forced_preemption": dict(spec=NGRAM, num_kv_blocks=28, block_size=4, max_num_batched_tokens=32),
    "draft_model_chunked_preemption": dict(spec="draft", num_kv_blocks=28, block_size=4, max_num_batched_tokens=16),
    "target_as_draft": dict(spec="self", max_num_batched_tokens=32),
    "always_wrong": dict(spec=NGRAM, proposer=WrongProposer, max_num_batched_tokens=16),
}


@pytest.mark.parametrize("config_name", list(SPEC_CONFIGS))
def test_constrained_and_logprobs_requests_speculate_with_the_output_of_plain_decoding(models, config_name):
    target, draft, expected, _ = models
    llm = _engine(target, draft, **SPEC_CONFIGS[config_name])
    prompts, params = _batch()
    for _ in range(2):  # the second round hits the prefix cache where it is on
        outputs = llm.generate(prompts, params, use_tqdm=False)
        for output, want in zip(outputs, expected):
            got, ref = output.outputs[0], want.outputs[0]
            assert got.token_ids == ref.token_ids, (output.prompt, got.text, ref.text)
            assert got.finish_reason == ref.finish_reason
            if ref.logprobs is not None:
                _assert_same_logprobs(got.logprobs, ref.logprobs)
        for kind, output in zip(PROMPTS, outputs):
            assert output.outputs[0].finish_reason == "stop", output.outputs[0].text
            _check(kind, output.outputs[0].text)
        assert_no_leaked_blocks(llm)
        assert llm.llm_engine.core.structured_output.num_active == 0
    stats = llm.llm_engine.core.make_stats()
    spec = stats.spec_decoding
    assert spec is not None and spec.num_drafts > 0
    if config_name == "always_wrong":
        assert spec.num_accepted_tokens < spec.num_draft_tokens
    else:
        assert spec.num_accepted_tokens > 0
    if "preemption" in config_name:
        assert stats.num_preemptions > 0


def _accepted(llm: LLM) -> int:
    spec = llm.llm_engine.core.make_stats().spec_decoding
    return 0 if spec is None else spec.num_accepted_tokens


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_constrained_requests_alone_keep_proposals(models, spec):
    target, draft, expected, _ = models
    llm = _engine(target, draft, NGRAM if spec == "ngram" else "draft")
    prompts, params = _batch()
    outputs = llm.generate(prompts[:len(PROMPTS)], params[:len(PROMPTS)], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected[:len(PROMPTS)]]
    assert _accepted(llm) > 0  # so they really speculate
    assert_no_leaked_blocks(llm)


@pytest.mark.parametrize("spec", ["ngram", "self"])
def test_logprobs_with_speculation_equal_logprobs_without(models, spec):
    target, draft, _, plain = models
    llm = _engine(target, draft, NGRAM if spec == "ngram" else spec)
    prompts = ["ab,ab,ab,ab,ab,", "The quick brown fox. The quick brown fox.", "x y z x y z x y z"]
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=k, prompt_logprobs=k)
              for k in (0, 2, 5)]
    want = plain.generate(prompts, params, use_tqdm=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        _assert_same_logprobs(g.outputs[0].logprobs, w.outputs[0].logprobs)
        assert g.prompt_logprobs[0] is None and w.prompt_logprobs[0] is None
        _assert_same_logprobs(g.prompt_logprobs[1:], w.prompt_logprobs[1:])
    assert _accepted(llm) > 0  # several tokens per step, each with its own logprobs
    assert_no_leaked_blocks(llm)


def test_sampled_constrained_requests_follow_their_constraint(models):
    target, draft, _, _ = models
    llm = _engine(target, draft, "draft")
    kinds = list(PROMPTS)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=48, structured_outputs=_constraint(k))
              for i, k in enumerate(kinds)]
    for kind, output in zip(kinds, llm.generate(list(PROMPTS.values()), params, use_tqdm=False)):
        assert output.outputs[0].finish_reason == "stop", output.outputs[0].text
        _check(kind, output.outputs[0].text)
    assert_no_leaked_blocks(llm)


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_verification_rows_carry_the_mask_after_each_proposal_and_leave_the_matcher_as_it_was(backend):
    from sluice.structured_output.backends import BACKENDS
    from sluice.structured_output.manager import GrammarBitmask
    tokenizer, vocab = build_tokenizer(), 384
    grammar_backend = BACKENDS[backend](tokenizer, vocab)
    compiled = grammar_backend.compile("regex", REPEAT, True)
    matcher, reference = grammar_backend.matcher(compiled), grammar_backend.matcher(compiled)
    ids = tokenizer.encode("ab,ab,", add_special_tokens=False)
    bad = tokenizer.encode("z", add_special_tokens=False)[0]
    assert matcher.num_valid_tokens(ids + [bad] + ids) == len(ids)
    filled = GrammarBitmask({"c": matcher}, vocab).fill(["u", "c"], [[7, 7], ids])
    rows, bitmask = filled
    assert rows == list(range(3, 3 + len(ids) + 1))  # "u" (unconstrained, 3 rows) stays all-allowed
    assert (bitmask[:3] == -1).all()
    import xgrammar as xgr
    row = xgr.allocate_token_bitmask(1, vocab)
    for j in range(len(ids) + 1):
        reference.fill_bitmask(row, 0)
        assert torch.equal(bitmask[3 + j], row[0]), j
        if j < len(ids):
            assert reference.accept_token(ids[j])
    matcher.fill_bitmask(row, 0)  # rolled back: the mask before the first proposal again
    assert torch.equal(row[0], bitmask[3])
    assert matcher.accept_token(ids[0]) and not matcher.accept_token(bad) and matcher.accept_token(ids[1])


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_a_stop_token_ends_the_proposals_and_the_matcher_terminates_on_it(backend):
    from sluice.structured_output.backends import BACKENDS
    from sluice.structured_output.manager import GrammarBitmask
    tokenizer, vocab = build_tokenizer(), 384
    grammar_backend = BACKENDS[backend](tokenizer, vocab)
    matcher = grammar_backend.matcher(grammar_backend.compile("regex", "(ab,){2}", True))
    ids, eos = tokenizer.encode("ab,ab,", add_special_tokens=False), tokenizer.eos_token_id
    # xgrammar keeps the stop token (the request ends on it); llguidance's proposals stop short of it.
    assert matcher.num_valid_tokens(ids + [eos, 5]) == len(ids) + (backend == "xgrammar")
    proposals = ids + [eos] if backend == "xgrammar" else ids
    rows, bitmask = GrammarBitmask({"c": matcher}, vocab).fill(["c"], [proposals])
    assert (bitmask[len(ids)] != -1).any() and (bitmask[len(ids) + 1:] == -1).all()  # past the stop: unread
    for token_id in ids:
        assert matcher.accept_token(token_id) and not matcher.is_terminated()
    assert matcher.accept_token(eos) and matcher.is_terminated()


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
@pytest.mark.parametrize("num_threads", [1, 3])
def test_the_batch_fill_on_any_number_of_threads_equals_the_row_by_row_fill(backend, num_threads, monkeypatch):
    """A step's rows filled with one batch call of the grammar library, on the threads the FillCost grants: the
    same bits as each matcher filling its own row, and every other row all-allowed."""
    from sluice.structured_output import backends
    from sluice.structured_output.manager import FillCost, GrammarBitmask
    tokenizer, vocab = build_tokenizer(), 384
    grammar_backend = backends.BACKENDS[backend](tokenizer, vocab)
    compiled = grammar_backend.compile("regex", REPEAT, True)
    ids = tokenizer.encode("ab,ab,", add_special_tokens=False)
    matchers = {}
    for i in range(64):
        if i % 5:
            matchers[f"c{i}"] = grammar_backend.matcher(compiled)
            for token_id in ids[:i % len(ids)]:  # each at another point of the pattern
                assert matchers[f"c{i}"].accept_token(token_id)
    req_ids = [f"c{i}" if i % 5 else f"u{i}" for i in range(64)]
    reference = torch.full((64, (vocab + 31) // 32), -1, dtype=torch.int32)
    for i, req_id in enumerate(req_ids):
        if req_id in matchers:
            matchers[req_id].fill_bitmask(reference, i)
    library_threads = []
    for name in ("_xgrammar_batch", "_guidance_executor"):
        made = getattr(backends, name)
        monkeypatch.setattr(backends, name, lambda n, made=made: library_threads.append(n) or made(n))
    cost = FillCost(max_threads=num_threads)
    cost.seconds_per_row = 1.0  # as if each row were slow: the step gets every thread there is
    rows, bitmask = GrammarBitmask(matchers, vocab, cost).fill(req_ids)
    assert rows == [i for i in range(64) if i % 5]
    assert torch.equal(bitmask, reference)
    assert (bitmask[rows] != -1).any() and (bitmask[::5] == -1).all()
    # xgrammar's batch call always (one thread or more); llguidance's parallel fill only on several threads.
    assert library_threads == ([num_threads] if backend == "xgrammar" or num_threads > 1 else [])
    assert 0 < cost.seconds_per_row < 1.0  # the measured fill moved the estimate


def test_a_step_gets_one_fill_thread_per_half_millisecond_of_expected_work():
    from sluice.structured_output.manager import FILL_SECONDS_PER_THREAD, FillCost
    cost = FillCost(max_threads=8)
    assert cost.threads_for(4096) == 1  # nothing measured yet
    cost.record(seconds=2e-3, num_rows=100, num_threads=1)  # 20 us a row, a fifth of the way there
    assert cost.seconds_per_row == pytest.approx(4e-6)
    assert cost.threads_for(256) == int(256 * 4e-6 / FILL_SECONDS_PER_THREAD) == 2
    for _ in range(100):
        cost.record(seconds=1e-3, num_rows=200, num_threads=4)  # wall x threads: 20 us of work a row
    assert cost.seconds_per_row == pytest.approx(2e-5)
    assert cost.threads_for(10) == 1 and cost.threads_for(110) == 4 and cost.threads_for(10_000) == 8


def test_a_step_mixing_grammar_libraries_fills_each_row_with_its_own():
    """Requests of one step may use either library (auto falls back per request) or another Grammar: each
    library's rows go to its own batch call, the others row by row."""
    from sluice.structured_output import backends
    from sluice.structured_output.manager import FillCost, GrammarBitmask
    tokenizer, vocab = build_tokenizer(), 384

    class OnlyEven:
        def fill_bitmask(self, bitmask, row):
            bitmask[row] = 0x55555555

    grammars = {}
    for name in ("xgrammar", "guidance"):
        grammar_backend = backends.BACKENDS[name](tokenizer, vocab)
        compiled = grammar_backend.compile("regex", REPEAT, True)
        for i in range(3):
            grammars[f"{name}{i}"] = grammar_backend.matcher(compiled)
    grammars["even"] = OnlyEven()
    req_ids = ["xgrammar0", "guidance0", "u", "even", "xgrammar1", "guidance1", "guidance2", "xgrammar2"]
    reference = torch.full((len(req_ids), (vocab + 31) // 32), -1, dtype=torch.int32)
    for i, req_id in enumerate(req_ids):
        if req_id in grammars:
            grammars[req_id].fill_bitmask(reference, i)
    cost = FillCost(max_threads=2)
    cost.seconds_per_row = 1.0
    rows, bitmask = GrammarBitmask(grammars, vocab, cost).fill(req_ids)
    assert rows == [0, 1, 3, 4, 5, 6, 7]
    assert torch.equal(bitmask, reference) and (bitmask[3] == 0x55555555).all() and (bitmask[2] == -1).all()

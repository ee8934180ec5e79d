"""Speculative decoding end to end (float32, CPU): greedy output with proposals equals greedy output without
them and transformers' generate, token for token, whatever the proposals (prompt lookup, a draft model of
another shape, the target itself as its own draft: every proposal kept, a proposer that is always wrong: every
proposal rejected), under chunked prefill, prefix caching and forced preemption. After every run, every KV
block is back in the pool."""
from __future__ import annotations

import random

import numpy as np
import pytest

from sluice import LLM, SamplingParams
from tests.engine.test_hf_equivalence import assert_no_leaked_blocks
from tests.tiny_models import hf_greedy, save_tiny_model

MAX_NEW_TOKENS = 16


def _prompts(seed: int = 0) -> list[list[int]]:
    """Random prompts, some with a repeated span (prompt lookup finds them), three sharing a prefix."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, 384) for _ in range(n)] for n in (1, 5, 17, 33)]
    for n in (6, 9):
        span = [rng.randrange(4, 384) for _ in range(n)]
        prompts.append(span * 3 + span[:2])
    shared = [rng.randrange(4, 384) for _ in range(40)]
    return prompts + [shared + [rng.randrange(4, 384) for _ in range(k)] for k in (1, 9)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    target = save_tiny_model(tmp_path_factory.mktemp("target"), "llama")
    # Another family and shape (6 heads of 16, 3 KV heads, width 96), the same vocabulary.
    draft = save_tiny_model(tmp_path_factory.mktemp("draft"), "qwen2", seed=7)
    prompts = _prompts()
    return target, draft, prompts, hf_greedy(target, prompts, MAX_NEW_TOKENS)


class WrongProposer:
    """Proposes the last token with its lowest bit flipped, three times: the test asserts none was ever kept
    (every proposal rejected), and the output is still the target's."""
    num_speculative_tokens = 3
    kv_bytes_per_block = 0
    keeps_up_in_forward = False  # the Proposer protocol's flag; False: every step verifies (it always proposes)

    def after_forward(self, runner, inputs, hidden) -> None:
        return None

    def propose(self, runner, req_ids, rows):
        batch = runner.input_batch
        return {r: [int(batch.token_ids[row, batch.num_tokens[row] - 1]) ^ 1] * 3 for r, row in zip(req_ids, rows)}


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
SPEC_CONFIGS = {
    "ngram_prefix_caching": dict(spec=NGRAM),
    "ngram_chunked_budget_16": dict(spec=NGRAM, max_num_batched_tokens=16),
    "ngram_forced_preemption": dict(spec=NGRAM, num_kv_blocks=28, block_size=4, max_num_batched_tokens=32),
    "draft_model": dict(spec="draft"),
    "draft_model_chunked_preemption": dict(spec="draft", num_kv_blocks=28, block_size=4, max_num_batched_tokens=16),
    "target_as_draft_all_kept": dict(spec="self", max_num_batched_tokens=16),
    "target_as_draft_preemption_no_prefix_cache": dict(spec="self", num_kv_blocks=28, block_size=4,
                                                       enable_prefix_caching=False),
    "always_wrong_all_rejected": dict(spec=NGRAM, proposer=WrongProposer, max_num_batched_tokens=16),
}


def _engine(target, draft, spec, proposer=None, **kwargs) -> LLM:
    if spec == "draft":
        spec = {"model": str(draft), "num_speculative_tokens": 4}
    elif spec == "self":
        spec = {"model": str(target), "num_speculative_tokens": 4}
    llm = LLM(model=str(target), dtype="float32", device="cpu", max_model_len=128, speculative_config=spec, **kwargs)
    if proposer is not None:
        llm.llm_engine.core.runner.proposer = proposer()
    return llm


@pytest.mark.parametrize("config_name", list(SPEC_CONFIGS))
def test_greedy_with_proposals_matches_transformers(models, config_name):
    target, draft, prompts, expected = models
    llm = _engine(target, draft, **SPEC_CONFIGS[config_name])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    for _ in range(2):  # the second round hits the prefix cache where it is on
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for prompt, output, want in zip(prompts, outputs, expected):
            assert output.outputs[0].token_ids == want, f"prompt of {len(prompt)} tokens diverged"
            assert output.outputs[0].finish_reason == "length"
        assert_no_leaked_blocks(llm)
    stats = llm.llm_engine.core.make_stats()
    spec = stats.spec_decoding
    assert spec is not None and spec.num_drafts > 0 and spec.num_draft_tokens >= spec.num_drafts
    if config_name.startswith("target_as_draft"):
        assert spec.num_accepted_tokens == spec.num_draft_tokens
    if config_name == "always_wrong_all_rejected":
        assert spec.num_accepted_tokens == 0
    if config_name.startswith("ngram"):
        assert spec.num_accepted_tokens > 0  # the repeated spans pay
    if "preemption" in config_name:
        assert stats.num_preemptions > 0
    if config_name in ("ngram_prefix_caching", "draft_model"):
        assert stats.prefix_cache_hits > 0


def test_several_tokens_per_step_stop_at_max_tokens_and_stop_ids(models):
    target, draft, prompts, expected = models
    llm = _engine(target, draft, "self")
    prompt, want = prompts[2], expected[2]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == want[:6] and out.finish_reason == "length"
    stop_id = want[4]
    first = want.index(stop_id)
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True,
                                      stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == want[:first + 1] and out.finish_reason == "stop"
    assert_no_leaked_blocks(llm)


def test_stop_strings_end_text_as_without_speculation(models):
    target, draft, prompts, _ = models
    plain = LLM(model=str(target), dtype="float32", device="cpu", max_model_len=128)
    spec = _engine(target, draft, "self")
    texts = plain.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    # A stop string from the middle of each greedy output: both engines cut the text at the same place.
    for prompt, full in zip(prompts, texts):
        text = full.outputs[0].text
        if len(text) < 6:
            continue
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, stop=[text[3:5]])
        want = plain.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
        got = spec.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
        assert (got.text, got.finish_reason, got.stop_reason) == (want.text, want.finish_reason, want.stop_reason)
    assert_no_leaked_blocks(spec)


def test_n_greater_than_one_and_seeded_requests_repeat(models):
    target, draft, prompts, _ = models
    llm = _engine(target, draft, "draft")
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=10, ignore_eos=True, n=3, seed=1234)
    first = llm.generate([{"prompt_token_ids": prompts[4]}], params, use_tqdm=False)[0]
    assert len(first.outputs) == 3 and all(len(c.token_ids) == 10 for c in first.outputs)
    # The same seeded request again, now among others: the same tokens.
    others = [{"prompt_token_ids": p} for p in prompts[:3]]
    again = llm.generate(others + [{"prompt_token_ids": prompts[4]}],
                         [SamplingParams(temperature=1.0, max_tokens=10)] * 3 + [params], use_tqdm=False)[-1]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in first.outputs]
    assert_no_leaked_blocks(llm)


@pytest.mark.parametrize("spec", ["self", "ngram"])
def test_penalties_min_tokens_and_bad_words_speculate_and_match_the_plain_engine(models, spec):
    """Requests with per-step sampling state are verified like the rest: row j of a request sees proposals
    0..j-1 as output (penalty counts, bad-word prefixes, the min_tokens count), so greedy output equals the
    engine without speculation, and their proposals are kept where the penalized argmax agrees."""
    target, draft, prompts, expected = models
    llm = _engine(target, draft, NGRAM if spec == "ngram" else "self")
    plain = LLM(model=str(target), dtype="float32", device="cpu", max_model_len=128)
    tokenizer = plain.get_tokenizer()
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    with_logprobs = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, logprobs=2)
    penalized = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, repetition_penalty=1.5,
                               frequency_penalty=0.5)
    presence = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, presence_penalty=1.2, min_tokens=12,
                              stop_token_ids=[int(expected[5][4])])
    banned = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True,
                            bad_words=[tokenizer.decode(expected[4][2:4])])
    params = [greedy, with_logprobs, penalized, presence, banned, penalized]
    batch = [{"prompt_token_ids": p} for p in prompts[:6]]
    outputs = llm.generate(batch, params, use_tqdm=False)
    want = plain.generate(batch, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in want]
    assert outputs[0].outputs[0].token_ids == expected[0] and outputs[1].outputs[0].token_ids == expected[1]
    assert outputs[2].outputs[0].token_ids != expected[2]  # the penalties changed the output
    assert len(outputs[3].outputs[0].token_ids) >= 12
    assert len(outputs[1].outputs[0].logprobs) == MAX_NEW_TOKENS
    assert llm.llm_engine.core.make_stats().spec_decoding.num_accepted_tokens > 0
    assert_no_leaked_blocks(llm)


def test_a_penalized_request_keeps_proposals_its_own_rows_agree_with():
    """verify_proposals on hand-made logits: a frequency-penalized request's row 1 counts proposal 0, so a
    proposal repeating it is rejected there (the unpenalized argmax would keep it)."""
    import torch
    from sluice.sample.metadata import RequestSamplingState
    from sluice.spec_decode.verify import verify_proposals
    vocab = 8
    logits = torch.zeros(3, vocab)
    logits[:, 5] = 2.0
    logits[:, 6] = 1.5  # second best
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0, max_tokens=8)
    state = RequestSamplingState.create(params, [1, 2], [])
    out = verify_proposals(logits, [state], np.array([2]), [[5, 5]], width=2)
    assert out.tolist() == [[5, 6, -1]]  # 5 kept; after it, 5 costs 1.0 and 6 wins: the second 5 is rejected
    plain = RequestSamplingState.create(SamplingParams(temperature=0.0, max_tokens=8), [1, 2], [])
    assert verify_proposals(logits, [plain], np.array([2]), [[5, 5]], width=2).tolist() == [[5, 5, 5]]


@pytest.fixture(scope="module")
def small_vocab_models(tmp_path_factory):
    target = save_tiny_model(tmp_path_factory.mktemp("v16_target"), "llama", tokenizer=False, vocab_size=12)
    draft = save_tiny_model(tmp_path_factory.mktemp("v16_draft"), "llama", seed=5, tokenizer=False, vocab_size=12)
    return target, draft


def test_sampled_pairs_follow_the_target_distribution(small_vocab_models):
    """The first two sampled tokens of a 12-token vocabulary, drawn 2,000 times with a draft model proposing
    (the second token goes through verification: kept or drawn from the residual), against the target's
    exact joint distribution p(t1) p(t2 | t1) from transformers."""
    import torch
    from transformers import AutoModelForCausalLM
    target, draft = small_vocab_models
    prompt = [3, 7, 2, 9]
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        p1 = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1], -1)
        contexts = torch.tensor([prompt + [t] for t in range(12)])
        p2 = torch.softmax(hf(contexts).logits[:, -1], -1)
    joint = (p1[:, None] * p2).flatten().double()
    llm = LLM(model=str(target), dtype="float32", device="cpu", max_model_len=32, skip_tokenizer_init=True,
              speculative_config={"model": str(draft), "num_speculative_tokens": 2}, max_num_seqs=256)
    num_samples = 2000
    # max_tokens 3: after the first token there is room for one proposal, which verification keeps or replaces.
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": prompt}] * num_samples, params, use_tqdm=False)
    pairs = torch.tensor([o.outputs[0].token_ids[0] * 12 + o.outputs[0].token_ids[1] for o in outputs])
    counts = torch.bincount(pairs, minlength=144).double()
    expected = joint * num_samples
    # Cells expected below 5 are pooled into one, as the chi-square test asks.
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    want = torch.cat([expected[~small], expected[small].sum()[None]])
    from scipy.stats import chi2
    statistic = float(((observed - want) ** 2 / want).sum())
    assert chi2.sf(statistic, len(want) - 1) > 1e-4, statistic
    assert llm.llm_engine.core.make_stats().spec_decoding.num_draft_tokens > 0
    assert_no_leaked_blocks(llm)


@pytest.mark.parametrize("spec, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown keys"),
    ("{not json", "JSON"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
])
def test_bad_speculative_configs_fail_at_start_up(models, spec, message):
    target = models[0]
    with pytest.raises(ValueError, match=message):
        LLM(model=str(target), dtype="float32", device="cpu", max_model_len=64, speculative_config=spec)


def test_a_draft_model_of_another_vocabulary_fails_at_start_up(models, small_vocab_models):
    with pytest.raises(ValueError, match="vocab_size"):
        LLM(model=str(models[0]), dtype="float32", device="cpu", max_model_len=64,
            speculative_config={"model": str(small_vocab_models[1]), "num_speculative_tokens": 2})


def test_the_speculative_config_flag_takes_json(models):
    import argparse

    from sluice.config import EngineArgs, create_engine_config
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["--model", str(models[0]), "--device", "cpu", "--speculative-config",
         '{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3, "disable_by_batch_size": 8}']))
    config = create_engine_config(args)
    assert config.speculative.num_speculative_tokens == 5 and config.speculative.prompt_lookup_max == 3
    assert config.speculative.disable_by_batch_size == 8
    assert not config.scheduler.async_scheduling


def test_spec_decode_counters_reach_prometheus(models):
    from sluice.metrics import PrometheusStatLogger
    from sluice.stats import IterationStats
    target, draft, prompts, _ = models
    llm = _engine(target, draft, "self")
    metrics = PrometheusStatLogger("tiny")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:3]], params, use_tqdm=False)
    metrics.record(llm.llm_engine.core.make_stats(), IterationStats())
    llm.generate([{"prompt_token_ids": p} for p in prompts[3:5]], params, use_tqdm=False)
    stats = llm.llm_engine.core.make_stats()
    metrics.record(stats, IterationStats())
    text = metrics.render().decode()
    spec = stats.spec_decoding

    def value(series: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(series)))
    assert value('sluice:spec_decode_num_drafts_total{model_name="tiny"}') == spec.num_drafts
    assert value('sluice:spec_decode_num_draft_tokens_total{model_name="tiny"}') == spec.num_draft_tokens
    assert value('sluice:spec_decode_num_accepted_tokens_total{model_name="tiny"}') == spec.num_accepted_tokens
    assert value('sluice:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"}') == \
        spec.num_accepted_tokens_per_pos[0] > 0


def test_disable_by_batch_size_stops_proposals_for_large_batches(models):
    target, draft, prompts, expected = models
    llm = _engine(target, draft, {**NGRAM, "disable_by_batch_size": 2})
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts[4:6]], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected[4:6]
    assert llm.llm_engine.core.make_stats().spec_decoding is None  # two running: no proposal ever
    outputs = llm.generate([{"prompt_token_ids": prompts[4]}], params, use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == expected[4]
    assert llm.llm_engine.core.make_stats().spec_decoding.num_drafts > 0


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_async_scheduling_runs_the_steps_without_speculation_asynchronously(models, spec):
    """With async scheduling, the steps in which disable_by_batch_size turns speculation off launch before the
    previous step is collected; the speculating ones run in turn. Requests of different lengths take the batch
    across the threshold both ways; greedy output equals transformers, penalized output the plain engine's."""
    target, draft, prompts, expected = models
    config = dict(NGRAM, disable_by_batch_size=4) if spec == "ngram" else \
        {"model": str(draft), "num_speculative_tokens": 3, "disable_by_batch_size": 4}
    llm = LLM(model=str(target), dtype="float32", device="cpu", max_model_len=128, speculative_config=config,
              async_scheduling=True, max_num_batched_tokens=64)
    runner = llm.llm_engine.core.runner
    in_flight, launched_behind = [0], []  # steps launched and not collected; launches made behind one
    launch, collect = runner.launch, runner.collect

    def spy_launch(scheduler_output, *args):
        if in_flight[0] and scheduler_output.total_num_scheduled_tokens:
            launched_behind.append(len(scheduler_output.num_scheduled_tokens))
        in_flight[0] += 1
        return launch(scheduler_output, *args)

    def spy_collect(step):
        in_flight[0] -= 1
        return collect(step)

    runner.launch, runner.collect = spy_launch, spy_collect
    lengths = [4, 6, 8, 10, 12, 14, 16, 16]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for output, want, n in zip(outputs, expected, lengths):
        assert output.outputs[0].token_ids == want[:n]
    # Steps of 4 requests or more launched while the previous one ran; none of fewer (they speculate).
    assert len(launched_behind) >= 5 and min(launched_behind) >= 4
    assert llm.llm_engine.core.make_stats().spec_decoding.num_drafts > 0  # and speculation below 4 requests
    assert_no_leaked_blocks(llm)
    penalized = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, frequency_penalty=0.7,
                               presence_penalty=0.3)
    batch = [{"prompt_token_ids": p} for p in prompts[:6]]
    plain = LLM(model=str(target), dtype="float32", device="cpu", max_model_len=128)
    assert ([o.outputs[0].token_ids for o in llm.generate(batch, penalized, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in plain.generate(batch, penalized, use_tqdm=False)])
    assert_no_leaked_blocks(llm)

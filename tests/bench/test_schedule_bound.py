"""Step-level schedule bound: the simulated schedule against hand counts, the time models against each other."""
from __future__ import annotations

import math

import pytest

from sluice.bench.roofline import ModelShape
from sluice.bench.schedule_bound import (
    ORDERS, TIME_MODELS, StepWork, bound_grid, bound_schedule, decode_bucket, l8_shape, order_requests,
    scheduled_step_work, simulate_schedule, step_kinds, step_seconds, workload_lengths,
)

# 1 layer, hidden 2, 1 head of dim 2, vocab 3, 1-byte weights: 28 body parameters + 6 in the LM head,
# 34 weight bytes per step, 4 KV bytes per token.
TINY = ModelShape(num_layers=1, hidden_size=2, num_heads=1, num_kv_heads=1, head_dim=2, intermediate_size=1,
                  vocab_size=3, tie_word_embeddings=False, dtype_bytes=1)
LIMITS = [(1024, 16384), (128, 8192), (16, 512)]


@pytest.fixture(scope="module")
def w1_lengths() -> list[tuple[int, int]]:
    return workload_lengths("W1", num_prompts=200)


@pytest.mark.parametrize("prompt_len,output_len,budget", [(10, 5, 4), (4, 1, 4), (1, 3, 8), (9, 2, 3)])
def test_single_request_prefills_in_ceil_p_over_budget_steps_then_decodes(prompt_len, output_len, budget):
    schedule = simulate_schedule([(prompt_len, output_len)], max_num_seqs=8, max_num_batched_tokens=budget)
    prefill_steps = math.ceil(prompt_len / budget)
    assert sum(1 for step in schedule.steps if step.num_prefill_tokens) == prefill_steps
    assert sum(step.num_sampling_rows for step in schedule.steps) == output_len
    assert len(schedule.steps) == prefill_steps + output_len - 1
    # Chunking does not change what the prompt attends to: token i sees i tokens.
    prefill_context = sum(step.context_tokens for step in schedule.steps if step.num_prefill_tokens)
    assert prefill_context == prompt_len * (prompt_len + 1) // 2


def test_two_requests_by_hand():
    # Budget 4: step 1 prefills all of A (3 tokens, samples) and 1 token of B; step 2 decodes A (context 3 + 1)
    # and finishes B's prompt (tokens 2 and 3, reading its 3-token prefix once), which samples B's only output.
    schedule = simulate_schedule([(3, 2), (3, 1)], max_num_seqs=2, max_num_batched_tokens=4)
    assert schedule.steps == (
        StepWork(num_decode_tokens=0, num_prefill_tokens=4, num_sampling_rows=1, context_tokens=6 + 1, kv_tokens=3 + 1),
        StepWork(num_decode_tokens=1, num_prefill_tokens=2, num_sampling_rows=2, context_tokens=4 + 5, kv_tokens=4 + 3),
    )
    step = schedule.steps[1]
    # matmul 2 * (28 * 3 + 6 * 2) = 192 FLOPs, attention 4 * 2 * 9 = 72 FLOPs, weights 34 B, KV 4 * 7 = 28 B.
    assert step_seconds(TINY, step, "serial", hbm_bytes_per_s=10, peak_flops=100) == pytest.approx(
        max(3.4, 1.92) + 2.8 + 0.72)
    assert step_seconds(TINY, step, "overlapped", hbm_bytes_per_s=10, peak_flops=100) == pytest.approx(
        max(3.4 + 2.8, 1.92 + 0.72))


def test_max_num_seqs_caps_running_requests_and_budget_caps_tokens(w1_lengths):
    schedule = simulate_schedule(w1_lengths, max_num_seqs=16, max_num_batched_tokens=512)
    assert all(step.num_tokens <= 512 for step in schedule.steps)
    assert all(step.num_sampling_rows <= 16 for step in schedule.steps)
    assert max(step.num_decode_tokens for step in schedule.steps) == 16


@pytest.mark.parametrize("order", ORDERS)
def test_every_prompt_token_is_computed_once_and_every_output_token_sampled_once(w1_lengths, order):
    queue = order_requests(w1_lengths, order)
    schedule = simulate_schedule(queue, max_num_seqs=128, max_num_batched_tokens=2048)
    prompts, outputs = sum(p for p, _ in w1_lengths), sum(o for _, o in w1_lengths)
    assert sum(step.num_prefill_tokens for step in schedule.steps) == prompts == schedule.prompt_tokens
    assert sum(step.num_sampling_rows for step in schedule.steps) == outputs == schedule.output_tokens
    # The last output of a request is sampled, never fed back: the model sees prompts + outputs - requests tokens.
    fed = sum(step.num_tokens for step in schedule.steps)
    assert fed == prompts + outputs - len(w1_lengths)


def test_serial_is_never_faster_than_overlapped_in_any_step(w1_lengths):
    shape = l8_shape()
    for max_num_seqs, budget in LIMITS:
        for step in simulate_schedule(w1_lengths, max_num_seqs, budget).steps:
            assert step_seconds(shape, step, "serial") >= step_seconds(shape, step, "overlapped")


def test_chain_bound_never_exceeds_the_total_and_no_schedule_beats_the_longest_output(w1_lengths):
    results = bound_grid(l8_shape(), w1_lengths, ORDERS, LIMITS, TIME_MODELS)
    assert len(results) == len(ORDERS) * len(LIMITS) * len(TIME_MODELS)
    longest = max(o for _, o in w1_lengths)
    for result in results:
        assert result.chain_bound_s <= result.total_s
        assert result.steps >= longest
    # Every request fits in the widest batch, so the oracle order finishes in exactly the longest output's steps.
    widest = [r for r in results if r.order == "longest_output_first" and r.max_num_seqs == 1024]
    assert all(r.steps == longest for r in widest)


def test_breakdown_sums_to_the_total_and_throughputs_divide_by_it(w1_lengths):
    schedule = simulate_schedule(w1_lengths, max_num_seqs=128, max_num_batched_tokens=8192)
    result = bound_schedule(l8_shape(), schedule, "fcfs", 128, 8192, "overlapped")
    assert list(result.breakdown) == step_kinds()
    assert sum(entry["steps"] for entry in result.breakdown.values()) == result.steps == len(schedule.steps)
    assert sum(entry["seconds"] for entry in result.breakdown.values()) == pytest.approx(result.total_s)
    assert result.output_tokens_per_s == pytest.approx(schedule.output_tokens / result.total_s)
    all_tokens = schedule.prompt_tokens + schedule.output_tokens
    assert result.total_tokens_per_s == pytest.approx(all_tokens / result.total_s)
    assert result.breakdown["decode_257-512"]["steps"] == 0  # never more than 128 running


def test_longest_output_first_is_a_stable_sort_by_output_length():
    assert order_requests([(1, 5), (2, 9), (3, 5), (4, 7)], "longest_output_first") == [(2, 9), (4, 7), (1, 5), (3, 5)]
    assert order_requests([(1, 5), (2, 9)], "fcfs") == [(1, 5), (2, 9)]
    with pytest.raises(ValueError, match="order"):
        order_requests([(1, 5)], "shortest_first")


@pytest.mark.parametrize("batch_size,kind", [(1, "decode_1-8"), (8, "decode_1-8"), (9, "decode_9-32"),
                                             (256, "decode_129-256"), (1024, "decode_513-1024"),
                                             (1025, "decode_1025+")])
def test_decode_steps_are_bucketed_by_batch_size(batch_size, kind):
    assert decode_bucket(batch_size) == kind


def test_l8_shape_matches_benchmarks_md():
    shape = l8_shape()
    assert shape.num_params == pytest.approx(8.03e9, rel=1e-3)
    assert shape.kv_bytes_per_token == 128 * 1024


@pytest.mark.parametrize("max_num_seqs,budget", [(4, 16), (16, 64), (3, 7)])
def test_simulated_schedule_is_the_schedulers_schedule(max_num_seqs, budget):
    """The simulator replays sluice's scheduler: driven by the real Scheduler (fake runner, KV ample), the
    StepWork read back from each planned step equals the simulated one, step for step."""
    from tests.core.fakes import FakeRunner, make_request, make_scheduler, run_step

    lengths = [(13, 5), (2, 9), (30, 1), (7, 3), (1, 12), (20, 4), (5, 5), (9, 2)]
    scheduler = make_scheduler(num_blocks=512, block_size=4, max_num_batched_tokens=budget,
                               max_num_seqs=max_num_seqs, max_model_len=64, enable_prefix_caching=False)
    runner = FakeRunner.for_scheduler(scheduler)
    for i, (prompt_len, output_len) in enumerate(lengths):
        prompt = [(i * 37 + j) % 997 for j in range(prompt_len)]
        scheduler.add_request(make_request(str(i), prompt, max_tokens=output_len, ignore_eos=True))
    observed = []
    original = scheduler.schedule

    def schedule():
        out = original()
        observed.append(scheduled_step_work(scheduler.requests, out.num_scheduled_tokens))
        return out

    scheduler.schedule = schedule
    while scheduler.has_unfinished_requests():
        run_step(scheduler, runner)
    assert observed == list(simulate_schedule(lengths, max_num_seqs, budget).steps)

"""The scheduler's side of speculative decoding: proposals are tokens beyond num_tokens in the step's budget,
rejected ones roll num_computed_tokens back, no block holding an unverified token reaches the prefix cache, and
a request outputs several tokens per step with stops checked token by token."""
from __future__ import annotations

from sluice.core.interface import ModelRunnerOutput
from tests.core.fakes import make_request, make_scheduler


def _decode_ready(scheduler, prompt, **kwargs):
    """A request whose prompt ran and sampled token 50; it then proposes [60, 61, 62]."""
    request = make_request("r", prompt, **kwargs)
    scheduler.add_request(request)
    first = scheduler.schedule()
    scheduler.update_from_output(first, ModelRunnerOutput(["r"], {"r": [50]}, spec_token_ids={"r": [60, 61, 62]}))
    return request


def test_proposals_are_scheduled_beyond_num_tokens_and_rejections_roll_back():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64)
    request = _decode_ready(scheduler, list(range(10, 17)))  # 7 prompt tokens + 1 sampled = 8
    assert request.spec_token_ids == [60, 61, 62]
    step = scheduler.schedule()
    assert step.num_scheduled_tokens == {"r": 4}  # its last token + 3 proposals
    assert step.scheduled_spec_token_ids == {"r": [60, 61, 62]}
    assert request.num_computed_tokens == 11 and request.spec_token_ids == []
    # The runner kept 60 and 61, rejected 62, and sampled 70 after 61.
    [out] = scheduler.update_from_output(step, ModelRunnerOutput(["r"], {"r": [60, 61, 70]}))
    assert out.new_token_ids == [60, 61, 70]
    assert request.num_tokens == 11 and request.num_computed_tokens == 10  # 62's slot is written again later
    stats = scheduler.make_stats().spec_decoding
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 3, 2)
    assert stats.num_accepted_tokens_per_pos == [1, 1, 0]


def test_a_short_budget_keeps_a_prefix_of_the_proposals():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=3)
    _decode_ready(scheduler, [1, 2])
    step = scheduler.schedule()
    assert step.num_scheduled_tokens == {"r": 3} and step.scheduled_spec_token_ids == {"r": [60, 61]}


def test_blocks_holding_unverified_tokens_are_not_cached():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=64)
    request = _decode_ready(scheduler, [1, 2, 3])  # 3 prompt + 1 sampled: block 0 full; proposals fill block 1
    scheduler.schedule()
    manager = scheduler.kv_cache_manager
    assert manager.num_cached_blocks["r"] == 1  # block 1 holds only proposals: unpublished
    assert len(request.block_hashes) == 1


def test_several_tokens_per_step_stop_at_the_first_stop_token_and_at_max_tokens():
    scheduler = make_scheduler(block_size=4)
    request = _decode_ready(scheduler, [1, 2, 3], max_tokens=16, stop_token_ids=[61])
    step = scheduler.schedule()
    [out] = scheduler.update_from_output(step, ModelRunnerOutput(["r"], {"r": [60, 61, 62, 63]}))
    assert out.new_token_ids == [60, 61] and out.finish_reason == "stop" and out.stop_reason == 61
    assert not scheduler.has_unfinished_requests()
    # max_tokens: proposals are capped to the room left, and output stops at the limit.
    scheduler = make_scheduler(block_size=4)
    request = _decode_ready(scheduler, [1, 2, 3], max_tokens=3)
    assert request.spec_token_ids == [60]  # 1 output, 3 allowed: one proposal + the token after it
    step = scheduler.schedule()
    [out] = scheduler.update_from_output(step, ModelRunnerOutput(["r"], {"r": [60, 71]}))
    assert out.new_token_ids == [60, 71] and out.finish_reason == "length"
    assert not scheduler.has_unfinished_requests()
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks


def test_preemption_drops_proposals():
    scheduler = make_scheduler(block_size=4)
    request = _decode_ready(scheduler, [1, 2, 3])
    from sluice.core.scheduler import _StepPlan
    scheduler._preempt(request, _StepPlan(token_budget=8))
    assert request.spec_token_ids == [] and request.num_computed_tokens == 0


def test_constrained_requests_keep_their_proposals_up_to_the_first_one_their_grammar_refuses():
    scheduler = make_scheduler(block_size=4)
    request = make_request("r", [1, 2, 3])
    request.structured_output = _GrammarBelow(62)
    scheduler.add_request(request)
    step = scheduler.schedule()
    scheduler.update_from_output(step, ModelRunnerOutput(["r"], {"r": [50]}, spec_token_ids={"r": [60, 61, 62, 60]}))
    assert request.spec_token_ids == [60, 61]


class _GrammarBelow:
    """A ready grammar that accepts any token below ``limit``."""
    error = None

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def is_ready(self) -> bool:
        return True

    def advance(self, token_id: int) -> bool:
        return False

    def valid_proposals(self, proposals: list[int]) -> list[int]:
        refused = [i for i, t in enumerate(proposals) if t >= self.limit]
        return proposals[:refused[0]] if refused else proposals

    def free(self) -> None:
        return None

"""When a request stops: eos, stop_token_ids, min_tokens, max_tokens, ignore_eos, max_model_len."""
from __future__ import annotations

from sluice.core.interface import LogprobsLists, ModelRunnerOutput
from sluice.core.request import RequestStatus
from tests.core.fakes import FakeRunner, RunResult, make_request, make_scheduler, run_to_completion

EOS = 2


def _run_scripted(script: list[int], *, max_model_len: int = 64, prompt: list[int] | None = None,
                  **request_kwargs) -> tuple[RunResult, str]:
    """Runs one request whose 'model' emits ``script`` in order, whatever the context."""
    prompt = prompt or [100]
    scheduler = make_scheduler(max_model_len=max_model_len)
    runner = FakeRunner.for_scheduler(scheduler, next_token=lambda _, context: script[len(context) - len(prompt)])
    request_kwargs.setdefault("max_tokens", len(script))
    scheduler.add_request(make_request("r", prompt, eos_token_id=EOS, **request_kwargs))
    return run_to_completion(scheduler, runner), "r"


def test_eos_stops_the_request_and_is_kept_as_its_last_token():
    result, r = _run_scripted([5, 6, EOS, 7])
    assert result.tokens[r] == [5, 6, EOS]
    assert (result.finish_reasons[r], result.stop_reasons[r]) == ("stop", None)


def test_a_stop_token_id_stops_the_request_and_becomes_the_stop_reason():
    result, r = _run_scripted([5, 6, 7], stop_token_ids=[6])
    assert result.tokens[r] == [5, 6]
    assert (result.finish_reasons[r], result.stop_reasons[r]) == ("stop", 6)


def test_end_of_turn_ids_added_by_the_front_end_stop_like_stop_token_ids():
    scheduler = make_scheduler()
    runner = FakeRunner.for_scheduler(scheduler, next_token=lambda _, context: [5, 9, 7][len(context) - 1])
    request = make_request("r", [100], max_tokens=3)
    request.sampling_params.update_from_tokenizer(eos_token_id=None, extra_stop_ids=[9])
    scheduler.add_request(request)
    result = run_to_completion(scheduler, runner)
    assert (result.tokens["r"], result.stop_reasons["r"]) == ([5, 9], 9)


def test_min_tokens_suppresses_eos_and_stop_token_ids_until_enough_outputs_exist():
    result, r = _run_scripted([EOS, 6, 5, EOS, 8], min_tokens=3, stop_token_ids=[6])
    assert result.tokens[r] == [EOS, 6, 5, EOS]
    assert result.finish_reasons[r] == "stop"


def test_max_tokens_caps_the_output_with_finish_reason_length():
    result, r = _run_scripted([5, 6, 7, 8], max_tokens=3)
    assert result.tokens[r] == [5, 6, 7]
    assert (result.finish_reasons[r], result.stop_reasons[r]) == ("length", None)


def test_ignore_eos_generates_through_eos_until_max_tokens():
    result, r = _run_scripted([EOS, EOS, 5], ignore_eos=True)
    assert result.tokens[r] == [EOS, EOS, 5]
    assert result.finish_reasons[r] == "length"


def test_a_stop_token_that_is_also_the_last_allowed_token_reports_stop():
    result, r = _run_scripted([5, EOS], max_tokens=2)
    assert result.finish_reasons[r] == "stop"


def test_reaching_max_model_len_caps_the_request():
    result, r = _run_scripted([5, 6, 7, 8], prompt=[100] * 6, max_model_len=8, max_tokens=None)
    assert result.tokens[r] == [5, 6]
    assert result.finish_reasons[r] == "length"


def test_tokens_sampled_after_a_stop_in_the_same_step_are_dropped():
    scheduler = make_scheduler()
    request = make_request("r", [100, 101], max_tokens=8, eos_token_id=EOS)
    scheduler.add_request(request)
    output = scheduler.schedule()
    logprobs = LogprobsLists(token_ids=[[5], [EOS], [9]], logprobs=[[-0.1], [-0.2], [-0.3]], ranks=[1, 1, 1])
    [out] = scheduler.update_from_output(output, ModelRunnerOutput(
        req_ids=["r"], sampled_token_ids={"r": [5, EOS, 9]}, logprobs={"r": logprobs}))
    assert out.new_token_ids == [5, EOS] and request.output_token_ids == [5, EOS]
    assert out.new_logprobs.token_ids == [[5], [EOS]] and out.new_logprobs.ranks == [1, 1]
    assert out.finish_reason == "stop"
    assert scheduler.schedule().finished_req_ids == {"r"}
    scheduler.kv_cache_manager.block_pool.check_all_free()


def test_a_stop_string_seen_by_the_front_end_finishes_the_request_as_stopped():
    scheduler = make_scheduler()
    request = make_request("r", [100, 101])
    scheduler.add_request(request)
    output = scheduler.schedule()
    scheduler.update_from_output(output, ModelRunnerOutput(req_ids=["r"], sampled_token_ids={"r": [5]}))
    scheduler.finish_requests(["r"], RequestStatus.FINISHED_STOPPED)
    assert request.get_finish_reason() == "stop"
    assert not scheduler.has_unfinished_requests()
    assert scheduler.schedule().finished_req_ids == {"r"}
    scheduler.kv_cache_manager.block_pool.check_all_free()


def test_a_request_aborted_between_schedule_and_update_gets_no_output():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", [100, 101]))
    output = scheduler.schedule()
    scheduler.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.update_from_output(output, ModelRunnerOutput(req_ids=["r"], sampled_token_ids={"r": [5]})) == []
    scheduler.kv_cache_manager.block_pool.check_all_free()

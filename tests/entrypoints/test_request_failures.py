"""One request's failure stays that request's (issue #25, defect 1), below the HTTP server: AsyncLLM over a
scripted engine, the engine-core process's input loop over real zmq sockets, and the ServerGuard's body
timeout. No model: these take well under a second each."""
from __future__ import annotations

import asyncio
import pickle
import time
from types import SimpleNamespace

import msgspec
import pytest
import zmq
from fastapi.testclient import TestClient

from sluice.core.interface import FINISH_REASON_ERROR
from sluice.engine.async_engine import AsyncLLM, RequestFailedError
from sluice.engine.core_proc import AddRequest, ClientRouter, CoreInput, _apply_queued
from sluice.entrypoints.openai.api_server import build_app
from sluice.entrypoints.openai.middleware import ServerGuard
from sluice.entrypoints.openai.sampling import ServingLimits
from sluice.entrypoints.openai.serving_engine import ServingConfig
from sluice.metrics import PrometheusStatLogger
from sluice.sampling_params import SamplingParams
from tests.entrypoints.test_async_engine import FakeEngine, params


class PickyEngine(FakeEngine):
    """Fails while adding a request whose prompt starts with 666 (a TypeError, as a tokenizer raises), and
    counts the engine turns (steps) in which requests were added."""

    def __init__(self) -> None:
        super().__init__()
        self.config.scheduler.max_num_seqs = 8
        self.adds_before_first_step: int | None = None

    def add_request(self, request_id, prompt, params, priority=0, lora_request=None):
        token_ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else prompt
        if token_ids[0] == 666:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
        super().add_request(request_id, prompt, params, priority)

    def step(self):
        if self.adds_before_first_step is None:
            self.adds_before_first_step = len(self.remaining)
        return super().step()


def test_an_exception_while_adding_one_request_fails_only_that_request():
    async def main():
        engine = PickyEngine()
        llm = AsyncLLM(engine)
        running = await llm.add_request("ok", [1], params(50))
        with pytest.raises(RequestFailedError):
            await llm.add_request("bad", [666], params(5))
        assert llm.is_healthy
        outputs = [o async for o in running]
        llm.shutdown()
        return outputs

    assert asyncio.run(main())[-1].finished


def test_a_request_that_fails_in_a_batch_aborts_the_ones_added_with_it():
    async def main():
        engine = PickyEngine()
        llm = AsyncLLM(engine)
        with pytest.raises(RequestFailedError):
            await llm.add_requests([("p0", [1], params(50)), ("p1", [666], params(5)), ("p2", [1], params(50))])
        await asyncio.sleep(0.05)
        llm.shutdown()
        return engine

    engine = asyncio.run(main())
    assert sorted(engine.aborted) == ["p0", "p2"] and not engine.remaining


def test_a_request_prompts_enter_the_engine_in_one_turn():
    async def main():
        engine = PickyEngine()
        llm = AsyncLLM(engine)
        streams = await llm.add_requests([(f"p{i}", [1], params(2)) for i in range(6)])
        for stream in streams:
            [_ async for _ in stream]
        llm.shutdown()
        return engine

    assert asyncio.run(main()).adds_before_first_step == 6


def test_a_finish_reason_error_from_the_core_raises_request_failed():
    async def main():
        llm = AsyncLLM(FakeEngine())
        stream = await llm.add_request("r", [1], params(1))
        from sluice.outputs import CompletionOutput, RequestOutput
        stream.put(RequestOutput("r", None, [1], [CompletionOutput(0, "", [], finish_reason=FINISH_REASON_ERROR)],
                                 finished=True))
        with pytest.raises(RequestFailedError):
            async for _ in stream:
                pass
        llm.shutdown()

    asyncio.run(main())


def _app(engine, **kwargs):
    llm = AsyncLLM(engine, **kwargs)
    config = ServingConfig(["fake"], ServingLimits(max_model_len=64, vocab_size=100))
    return build_app(llm, config, PrometheusStatLogger("fake"))[1]


def test_an_internal_error_is_a_generic_500_and_the_queue_full_503_says_when_to_retry():
    engine = PickyEngine()
    with TestClient(_app(engine)) as client:
        r = client.post("/v1/completions", json={"prompt": [666, 1], "max_tokens": 2})
        message = r.json()["error"]["message"]
        assert r.status_code == 500 and "error id" in message and "TextEncodeInput" not in message
        assert client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}).status_code == 200
        assert client.get("/health").status_code == 200
    engine = PickyEngine()
    engine.step = lambda: time.sleep(0.002) or []  # nothing ever finishes
    engine.config.scheduler.max_num_seqs = 0  # and nothing runs: everything waits
    with TestClient(_app(engine, max_num_queued_reqs=0)) as client:
        r = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"


def test_the_core_finishes_a_request_it_cannot_add_with_an_error_and_keeps_going():
    context = zmq.Context()
    push, pull = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    pull.bind("inproc://core-input")
    push.connect("inproc://core-input")
    added, aborted = [], []
    core = SimpleNamespace(add_request=lambda request: added.append(request.request_id),
                           abort_requests=lambda ids: aborted.extend(ids))
    encoder = msgspec.msgpack.Encoder()
    good = pickle.dumps(SamplingParams(max_tokens=2))
    for request_id, sampling_params in (("bad", b"not a pickle"), ("good", good)):
        push.send(encoder.encode(AddRequest(request_id, [1, 2], sampling_params, None, 0, 0.0, None)))
    time.sleep(0.05)
    failed = []
    try:
        assert _apply_queued(core, ClientRouter(1), 0, pull, msgspec.msgpack.Decoder(CoreInput), failed) == 2
    finally:
        context.destroy(linger=0)
    assert added == ["good"] and aborted == ["bad"]
    assert [(o.req_id, o.finish_reason) for o in failed] == [("bad", FINISH_REASON_ERROR)]


def test_a_stalled_body_gets_408_and_a_drain_does_not_wait_for_it():
    async def run(draining: bool) -> list[dict]:
        async def app(scope, receive, send):
            raise AssertionError("a body that never arrived must not reach the app")

        sent: list[dict] = []

        async def receive():
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        guard = ServerGuard(app, None, 1000, is_draining=lambda: draining, body_timeout_s=0.3)
        await guard({"type": "http", "path": "/v1/completions", "headers": []}, receive, send)
        return sent

    assert asyncio.run(run(draining=False))[0]["status"] == 408
    started = time.monotonic()
    assert asyncio.run(run(draining=True))[0]["status"] == 503
    assert time.monotonic() - started < 2

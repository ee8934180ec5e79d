"""AsyncLLM against a scripted fake engine: routing, aborts, failures, admission control, and the
/health and 503 behaviour of the app built on it. No model, so these run in well under a second each."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from sluice.engine.async_engine import AsyncLLM, EngineDeadError, QueueFullError, RequestAbortedError
from sluice.engine.stats import IterationStats, SchedulerStats
from sluice.entrypoints.openai.api_server import build_app
from sluice.entrypoints.openai.sampling import ServingLimits
from sluice.entrypoints.openai.serving_engine import ServingConfig
from sluice.metrics import PrometheusStatLogger
from sluice.outputs import CompletionOutput, RequestOutput
from sluice.sampling_params import SamplingParams


class FakeEngine:
    """One token per request per step; ``max_tokens`` from the params; ``crash`` makes step() raise.

    Records the thread of every call, so tests can check that only the engine thread touches it."""

    def __init__(self, stat_loggers: list | None = None) -> None:
        self.model_config = SimpleNamespace(model="fake", served_model_name="fake", max_model_len=64, vocab_size=100)
        self.config = SimpleNamespace(model=self.model_config, scheduler=SimpleNamespace(max_num_seqs=0))
        self.tokenizer = None
        self.remaining: dict[str, int] = {}
        self.aborted: list[str] = []
        self.crash = False
        self.threads: set[str] = set()
        self.stat_loggers = stat_loggers or []
        self.tracer = None  # LLMEngine's RequestTracer, None without --otlp-traces-endpoint

    def _touch(self) -> None:
        self.threads.add(threading.current_thread().name)

    def add_request(self, request_id, prompt, params, priority=0, lora_request=None):
        self._touch()
        if len(prompt) > 10:
            raise ValueError(f"the prompt is {len(prompt)} tokens long, but max_model_len is 10")
        self.remaining[request_id] = params.max_tokens

    def abort_request(self, request_ids):
        self._touch()
        for request_id in request_ids:
            if self.remaining.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        self._touch()
        return bool(self.remaining)

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def step(self) -> list[RequestOutput]:
        self._touch()
        time.sleep(0.002)
        if self.crash:
            raise RuntimeError("CUDA error: device-side assert triggered")
        outputs = []
        for request_id in list(self.remaining):
            self.remaining[request_id] -= 1
            finished = self.remaining[request_id] == 0
            if finished:
                del self.remaining[request_id]
            outputs.append(RequestOutput(request_id, None, [1], [CompletionOutput(
                0, "x", [7], finish_reason="length" if finished else None)], finished=finished))
        for stat_logger in self.stat_loggers:
            stat_logger.record(SchedulerStats(num_running_reqs=len(self.remaining)), IterationStats())
        return outputs


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens)


async def collect(llm: AsyncLLM, request_id: str, max_tokens: int) -> list[RequestOutput]:
    return [out async for out in llm.generate([1, 2], params(max_tokens), request_id)]


def test_each_request_streams_its_own_outputs_and_only_the_engine_thread_touches_the_engine():
    async def main():
        engine = FakeEngine()
        llm = AsyncLLM(engine)
        a, b = await asyncio.gather(collect(llm, "a", 3), collect(llm, "b", 5))
        llm.shutdown()
        return engine, a, b

    engine, a, b = asyncio.run(main())
    assert [o.request_id for o in a] == ["a"] * 3 and a[-1].finished
    assert [o.request_id for o in b] == ["b"] * 5 and b[-1].outputs[0].finish_reason == "length"
    assert engine.threads == {"sluice-engine"}


def test_leaving_a_stream_early_aborts_the_request():
    async def main():
        engine = FakeEngine()
        llm = AsyncLLM(engine)
        async for _ in llm.generate([1], params(1000), "quitter"):
            break
        await asyncio.sleep(0.05)
        llm.shutdown()
        return engine, llm

    engine, llm = asyncio.run(main())
    assert engine.aborted == ["quitter"] and not engine.remaining and llm.num_in_flight == 0


def test_cancelling_the_consumer_task_aborts_the_request():
    async def main():
        engine = FakeEngine()
        llm = AsyncLLM(engine)
        task = asyncio.create_task(collect(llm, "cancelled", 1000))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        llm.shutdown()
        return engine

    assert asyncio.run(main()).aborted == ["cancelled"]


def test_engine_value_error_reaches_the_caller_and_leaves_nothing_in_flight():
    async def main():
        llm = AsyncLLM(FakeEngine())
        with pytest.raises(ValueError, match="max_model_len"):
            await llm.add_request("long", list(range(20)), params(3))
        assert llm.num_in_flight == 0
        assert len(await collect(llm, "next", 2)) == 2  # the engine is still fine
        llm.shutdown()

    asyncio.run(main())


def test_engine_crash_fails_every_stream_and_marks_the_engine_unhealthy():
    async def main():
        engine = FakeEngine()
        llm = AsyncLLM(engine)
        streams = [await llm.add_request(f"r{i}", [1], params(1000)) for i in range(3)]
        assert llm.is_healthy
        engine.crash = True
        for stream in streams:
            with pytest.raises(EngineDeadError, match="device-side assert"):
                async for _ in stream:
                    pass
        assert not llm.is_healthy and llm.errored
        with pytest.raises(EngineDeadError):
            await llm.add_request("late", [1], params(1))

    asyncio.run(main())


def test_admission_control_refuses_beyond_max_num_queued_reqs():
    async def main():
        engine = FakeEngine()
        engine.step = lambda: time.sleep(0.002) or []  # nothing ever runs: everything queues
        llm = AsyncLLM(engine, max_num_queued_reqs=2)
        await llm.add_request("q0", [1], params(5))
        await llm.add_request("q1", [1], params(5))
        with pytest.raises(QueueFullError, match="--max-num-queued-reqs 2"):
            await llm.add_request("q2", [1], params(5))
        llm.shutdown()

    asyncio.run(main())


def test_abort_all_ends_every_stream_with_request_aborted_error():
    async def main():
        engine = FakeEngine()
        llm = AsyncLLM(engine)
        stream = await llm.add_request("slow", [1], params(1000))
        assert llm.abort_all("the server is shutting down") == 1
        with pytest.raises(RequestAbortedError, match="shutting down"):
            async for _ in stream:
                pass
        await asyncio.sleep(0.05)
        llm.shutdown()
        return engine

    assert asyncio.run(main()).aborted == ["slow"]


def test_health_is_503_once_the_engine_died_and_requests_get_openai_errors():
    engine = FakeEngine()
    llm = AsyncLLM(engine)
    config = ServingConfig(["fake"], ServingLimits(max_model_len=64, vocab_size=100))
    _, guard, _ = build_app(llm, config, PrometheusStatLogger("fake"))
    with TestClient(guard) as client:
        assert client.get("/health").status_code == 200
        engine.crash = True
        r = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 5})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert client.get("/health").status_code == 503

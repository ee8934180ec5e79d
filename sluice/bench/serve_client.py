"""The client side of `sluice bench serve`: one streamed completion, arrival schedules, and the metrics of a run
(definitions: serve.py's docstring). Shared by W5 (serve.py) and W8 (multiturn.py).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

_METRICS = ("ttft", "tpot", "itl", "e2e")
_SLO_NAMES = ("ttft", "tpot", "e2e")
DEFAULT_GOODPUT = ["ttft:500", "tpot:50"]  # docs/benchmarks.md W5's SLO


@dataclass(frozen=True, slots=True)
class ServeRequest:
    prompt: list[int] | str
    prompt_len: int
    output_len: int
    is_long: bool = False  # one of the long-prompt mix's
    json_schema: dict | None = None  # --structured-fraction: sent as response_format json_schema
    model: str | None = None  # the model field (a LoRA adapter's name, --lora-mix); None: the run's model


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it (seconds, perf_counter clock)."""
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True, slots=True)
class ServeMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    goodput_requests_per_s: float | None
    latency_ms: dict[str, float]  # "<metric>_ms_<stat>": mean, std, p50, p90, p99 of ttft, tpot, itl, e2e

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("latency_ms"))
        return out


# ---- one request ---------------------------------------------------------------------------------------
async def send_completion(client: Any, url: str, model: str, request: ServeRequest, headers: dict[str, str],
                          extra_body: dict[str, Any] | None = None,
                          token_ids_out: list[int] | None = None) -> RequestResult:
    """Streams one completion; never raises (a failure is a result with ``success`` False). ``token_ids_out``
    collects the generated ids the stream carries (with ``return_token_ids`` in ``extra_body``)."""
    payload = {"model": request.model or model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 1.0,
               "top_p": 1.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
               **(extra_body or {})}
    if request.json_schema is not None:
        payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "w7", "schema": request.json_schema}}
    result = RequestResult(prompt_len=request.prompt_len)
    num_chunks = 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if token_ids_out is not None:
                        token_ids_out.extend(chunk["choices"][0].get("token_ids") or [])
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    num_chunks += 1
                    last = now
                if chunk.get("usage"):
                    result.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
        result.latency = last - start
        # A server without usage in streams: with ignore_eos each content chunk is one token.
        result.output_tokens = result.output_tokens or num_chunks
        result.success = num_chunks > 0
        if not result.success:
            result.error = "the stream carried no tokens"
    except Exception as e:  # noqa: BLE001 - the benchmark reports failures, it does not stop on them
        result.error = f"{type(e).__name__}: {e}"
    return result


# ---- arrivals and the run --------------------------------------------------------------------------------
def arrival_gaps(num_requests: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: Gamma(burstiness, 1 / (rate * burstiness)); zeros at rate inf."""
    if request_rate == float("inf"):
        return [0.0] * num_requests
    theta = 1.0 / (request_rate * burstiness)
    return np.random.default_rng(seed).gamma(shape=burstiness, scale=theta, size=num_requests).tolist()


async def run_requests(base_url: str, endpoint: str, model: str, requests: list[ServeRequest], gaps: list[float],
                       max_concurrency: int | None, headers: dict[str, str], show_progress: bool = True,
                       timeout_s: float = 6 * 3600) -> tuple[list[RequestResult], float]:
    """Sends every request on its arrival schedule; returns the results (request order) and the wall time."""
    import httpx
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=max_concurrency or len(requests), max_keepalive_connections=None)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    url = base_url.rstrip("/") + endpoint
    progress = tqdm(total=len(requests), disable=not show_progress, desc="requests")
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def one(request: ServeRequest) -> RequestResult:
            if semaphore is None:
                result = await send_completion(client, url, model, request, headers)
            else:
                async with semaphore:
                    result = await send_completion(client, url, model, request, headers)
            progress.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for request, gap in zip(requests, gaps):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    progress.close()
    return list(results), duration


# ---- metrics --------------------------------------------------------------------------------------------------
def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in _SLO_NAMES:
            raise ValueError(f"goodput: SLO name must be one of {', '.join(_SLO_NAMES)}, got {item!r}")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput: {item!r} needs a number of milliseconds, e.g. {name}:500") from None
        if slos[name] <= 0:
            raise ValueError(f"goodput: the {name} SLO must be positive, got {value}")
    return slos


def _tpot(result: RequestResult) -> float | None:
    if result.output_tokens <= 1:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def calculate_metrics(results: list[RequestResult], duration_s: float, slos_ms: dict[str, float],
                      percentiles: tuple[int, ...] = (50, 90, 99)) -> ServeMetrics:
    """vLLM's definitions over the successful requests; latency statistics in milliseconds."""
    good = [r for r in results if r.success]
    series = {"ttft": [r.ttft for r in good], "tpot": [t for r in good if (t := _tpot(r)) is not None],
              "itl": [gap for r in good for gap in r.itl], "e2e": [r.latency for r in good]}
    latency_ms: dict[str, float] = {}
    for name in _METRICS:
        values = np.asarray(series[name] or [0.0]) * 1000.0
        latency_ms[f"{name}_ms_mean"] = float(values.mean())
        latency_ms[f"{name}_ms_std"] = float(values.std())
        for p in percentiles:
            latency_ms[f"{name}_ms_p{p}"] = float(np.percentile(values, p))
    goodput = None
    if slos_ms:
        def meets_slos(r: RequestResult) -> bool:
            observed = {"ttft": r.ttft, "tpot": _tpot(r) or 0.0, "e2e": r.latency}
            return all(observed[name] * 1000.0 <= slo for name, slo in slos_ms.items())
        goodput = sum(meets_slos(r) for r in good) / duration_s
    total_in = sum(r.prompt_len for r in good)
    total_out = sum(r.output_tokens for r in good)
    return ServeMetrics(
        completed=len(good), failed=len(results) - len(good), duration_s=duration_s, total_input_tokens=total_in,
        total_output_tokens=total_out, requests_per_s=len(good) / duration_s,
        output_tokens_per_s=total_out / duration_s, total_tokens_per_s=(total_in + total_out) / duration_s,
        goodput_requests_per_s=goodput, latency_ms=latency_ms)

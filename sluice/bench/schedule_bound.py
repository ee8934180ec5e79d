"""Step-level lower bound of an offline workload under one scheduling policy.

``roofline.py`` bounds a run from its average batch; this module replays the schedule step by step, the way
sluice's scheduler (``sluice/core/scheduler.py``) builds it, and bounds each step by the bytes it must read and
the FLOPs it must do. The sum is what any engine could reach on that schedule, on that device.

Schedule (continuous batching, chunked prefill, no preemption: the KV cache is taken to be large enough)::

    each step, token budget B = max_num_batched_tokens:
      1. every running request whose prompt is computed decodes 1 token
      2. running requests still in their prompt take a chunk of min(prompt left, budget left) tokens
      3. waiting requests, in order, are admitted with a chunk while budget is left and running < max_num_seqs
    a prompt completes in the step that computes its last token; that step samples its first output token
    a request leaves after its output_len-th output token: a request alone takes ceil(p / B) + o - 1 steps

Orders of the waiting queue: ``fcfs`` (dataset order) and ``longest_output_first``, an ORACLE that knows every
output length in advance: no engine can ship it, it only shows what ordering alone could buy.

Work of one step (``StepWork``)::

    context(token)   = tokens it attends to: a decode token p + outputs so far,
                       prompt token i (1-based) of a chunk: i (its prefix and itself)
    matmul_flops     = 2 * body_params * tokens + 2 * lm_head_params * sampling_rows
                       (body: every layer and the final norm; only rows that sample need the LM head)
    attention_flops  = 4 * num_heads * head_dim * num_layers * sum over tokens of context(token)
    weight_bytes     = shape.decode_weight_bytes                        (every weight, read once per step)
    kv_bytes         = kv_bytes_per_token * kv_tokens
                       kv_tokens = sum over decode tokens of context(token)
                                 + sum over prompt chunks of the prompt prefix up to the chunk's end
                       (a chunk's queries share one read of their request's KV, as tiled attention does; counting
                       a read per query would add about 1.7 s to W1 at 3.0 TB/s, time that no kernel has to spend)

Time of one step, two models (bw = HBM bytes/s, peak = matmul FLOP/s; defaults from roofline.py)::

    serial      = max(weight_bytes / bw, matmul_flops / peak) + kv_bytes / bw + attention_flops / peak
                  (matmuls, then attention, each at its own roofline: an engine that does not overlap them)
    overlapped  = max((weight_bytes + kv_bytes) / bw, (matmul_flops + attention_flops) / peak)
                  (everything overlapped: a true lower bound for that schedule)

Chain bound: the longest request needs at least output_len steps, each reading every weight once, so
``chain_s = max output_len * weight_bytes / bw`` bounds every schedule, however wide its batches.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sluice.bench.datasets import generate_workload
from sluice.bench.roofline import H100_HBM_BYTES_PER_S, H100_PEAK_FLOPS, ModelShape

ORDERS = ("fcfs", "longest_output_first")
TIME_MODELS = ("serial", "overlapped")
# Decode-only steps are reported by batch size (decode tokens in the step); steps with a prompt chunk apart.
# Upper edges of the buckets 1-8, 9-32, ..., 513-1024; larger batches fall in one open bucket.
DECODE_BUCKET_EDGES = (8, 32, 128, 256, 512, 1024)
PREFILL_KIND = "with_prefill"


def l8_shape() -> ModelShape:
    """docs/benchmarks.md's L8 (Llama-3.1-8B shape, bf16), without a HF config."""
    return ModelShape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, dtype_bytes=2)


def workload_lengths(workload: str, num_prompts: int | None = None,
                     vocab_size: int = 128256) -> list[tuple[int, int]]:
    """(prompt_len, output_len) of each request of ``workload`` (seed 0), in dataset order."""
    return [(len(prompt), output_len)
            for prompt, output_len in generate_workload(workload, vocab_size, num_prompts, seed=0)]


# ---- the schedule ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StepWork:
    """What one step computes: its tokens, the rows that sample, and the context they attend to."""
    num_decode_tokens: int
    num_prefill_tokens: int
    num_sampling_rows: int  # decode tokens + chunks that complete their prompt
    context_tokens: int  # sum over the step's tokens of the tokens each attends to (attention FLOPs)
    kv_tokens: int  # KV entries read: per decode token its context, per chunk its prompt prefix (module doc)

    @property
    def num_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    @property
    def kind(self) -> str:
        if self.num_prefill_tokens:
            return PREFILL_KIND
        return decode_bucket(self.num_decode_tokens)


@dataclass(frozen=True, slots=True)
class Schedule:
    steps: tuple[StepWork, ...]
    prompt_tokens: int
    output_tokens: int
    longest_output: int


@dataclass(slots=True)
class _SimRequest:
    prompt_len: int
    output_len: int
    num_computed_prompt: int = 0
    num_output: int = 0

    @property
    def prompt_done(self) -> bool:
        return self.num_computed_prompt == self.prompt_len


@dataclass(slots=True)
class _StepTally:
    token_budget: int
    decode_tokens: int = 0
    prefill_tokens: int = 0
    sampling_rows: int = 0
    context_tokens: int = 0
    kv_tokens: int = 0
    samplers: list[_SimRequest] = field(default_factory=list)

    def decode(self, request: _SimRequest) -> None:
        context = request.prompt_len + request.num_output
        self.token_budget -= 1
        self.decode_tokens += 1
        self.context_tokens += context
        self.kv_tokens += context
        self.samplers.append(request)

    def prefill_chunk(self, request: _SimRequest) -> None:
        start = request.num_computed_prompt
        end = min(request.prompt_len, start + self.token_budget)
        self.token_budget -= end - start
        self.prefill_tokens += end - start
        # Prompt token i (1-based) attends to i tokens: sum of start+1 .. end.
        self.context_tokens += (end * (end + 1) - start * (start + 1)) // 2
        self.kv_tokens += end
        request.num_computed_prompt = end
        if request.prompt_done:
            self.samplers.append(request)

    def work(self) -> StepWork:
        return StepWork(self.decode_tokens, self.prefill_tokens, len(self.samplers), self.context_tokens,
                        self.kv_tokens)


def scheduled_step_work(requests: Mapping[str, Any], num_scheduled_tokens: Mapping[str, int]) -> StepWork:
    """The StepWork of a step sluice's scheduler has just planned (``Scheduler.schedule()`` advances each
    scheduled request's ``num_computed_tokens`` past the step), so a real run can be bounded step by step.

    ``requests``: request id -> object with ``num_computed_tokens`` and ``num_prompt_tokens``.
    """
    decode = prefill = sampling = context = kv = 0
    for req_id, n in num_scheduled_tokens.items():
        request = requests[req_id]
        end = request.num_computed_tokens  # the step's last token of this request attends to `end` tokens
        start = end - n
        context += (end * (end + 1) - start * (start + 1)) // 2
        kv += end
        if n == 1 and start >= request.num_prompt_tokens:
            decode += 1
            sampling += 1
        else:
            prefill += n
            sampling += end >= request.num_prompt_tokens  # the chunk that completes the prompt samples
    return StepWork(decode, prefill, sampling, context, kv)


def order_requests(lengths: Sequence[tuple[int, int]], order: str) -> list[tuple[int, int]]:
    """The waiting queue: dataset order (fcfs), or the oracle's longest output first (ties in dataset order)."""
    if order == "fcfs":
        return list(lengths)
    if order == "longest_output_first":
        return sorted(lengths, key=lambda pair: -pair[1])
    raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")


def simulate_schedule(lengths: Sequence[tuple[int, int]], max_num_seqs: int,
                      max_num_batched_tokens: int) -> Schedule:
    """Replays continuous batching over ``lengths`` (already in queue order) until every request is done."""
    if max_num_seqs < 1 or max_num_batched_tokens < 1:
        raise ValueError(f"max_num_seqs and max_num_batched_tokens must be at least 1, got {max_num_seqs}, "
                         f"{max_num_batched_tokens}")
    if any(p < 1 or o < 1 for p, o in lengths):
        raise ValueError("every request needs at least 1 prompt token and 1 output token")
    waiting = [_SimRequest(p, o) for p, o in reversed(lengths)]  # popped from the end: first request first
    running: list[_SimRequest] = []
    steps: list[StepWork] = []
    while waiting or running:
        tally = _StepTally(token_budget=max_num_batched_tokens)
        _schedule_step(tally, running, waiting, max_num_seqs)
        for request in tally.samplers:
            request.num_output += 1
        running = [request for request in running if request.num_output < request.output_len]
        steps.append(tally.work())
    return Schedule(tuple(steps), prompt_tokens=sum(p for p, _ in lengths),
                    output_tokens=sum(o for _, o in lengths), longest_output=max((o for _, o in lengths), default=0))


def _schedule_step(tally: _StepTally, running: list[_SimRequest], waiting: list[_SimRequest],
                   max_num_seqs: int) -> None:
    for request in running:
        if request.prompt_done and tally.token_budget > 0:
            tally.decode(request)
    for request in running:
        if not request.prompt_done and tally.token_budget > 0:
            tally.prefill_chunk(request)
    while waiting and tally.token_budget > 0 and len(running) < max_num_seqs:
        request = waiting.pop()
        running.append(request)
        tally.prefill_chunk(request)


def decode_bucket(batch_size: int) -> str:
    """The kind of a decode-only step of ``batch_size`` tokens: "decode_1-8" .. "decode_513-1024", "decode_1025+"."""
    if batch_size < 1:
        raise ValueError(f"a decode step has at least 1 token, got {batch_size}")
    low = 1
    for high in DECODE_BUCKET_EDGES:
        if batch_size <= high:
            return f"decode_{low}-{high}"
        low = high + 1
    return f"decode_{low}+"


def step_kinds() -> list[str]:
    """Every kind a step can have, in report order."""
    lows = [1] + [high + 1 for high in DECODE_BUCKET_EDGES]
    return [PREFILL_KIND] + [decode_bucket(low) for low in lows]


# ---- the time model -------------------------------------------------------------------------------------------
def step_seconds(shape: ModelShape, step: StepWork, time_model: str,
                 hbm_bytes_per_s: float = H100_HBM_BYTES_PER_S, peak_flops: float = H100_PEAK_FLOPS) -> float:
    """Lower bound of one step's time under ``time_model`` (formulas: module doc)."""
    lm_head_params = shape.vocab_size * shape.hidden_size
    body_params = shape.matmul_params - lm_head_params
    matmul_flops = 2 * (body_params * step.num_tokens + lm_head_params * step.num_sampling_rows)
    attention_flops = 4 * shape.num_heads * shape.head_dim * shape.num_layers * step.context_tokens
    weight_bytes = shape.decode_weight_bytes
    kv_bytes = shape.kv_bytes_per_token * step.kv_tokens
    if time_model == "serial":
        return (max(weight_bytes / hbm_bytes_per_s, matmul_flops / peak_flops)
                + kv_bytes / hbm_bytes_per_s + attention_flops / peak_flops)
    if time_model == "overlapped":
        return max((weight_bytes + kv_bytes) / hbm_bytes_per_s, (matmul_flops + attention_flops) / peak_flops)
    raise ValueError(f"time_model must be one of {', '.join(TIME_MODELS)}, got {time_model!r}")


@dataclass(frozen=True, slots=True)
class ScheduleBound:
    order: str
    max_num_seqs: int
    max_num_batched_tokens: int
    time_model: str
    steps: int
    total_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    chain_bound_s: float
    # kind -> {"steps": n, "seconds": s} for every kind of ``step_kinds()``
    breakdown: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bound_schedule(shape: ModelShape, schedule: Schedule, order: str, max_num_seqs: int,
                   max_num_batched_tokens: int, time_model: str, hbm_bytes_per_s: float = H100_HBM_BYTES_PER_S,
                   peak_flops: float = H100_PEAK_FLOPS) -> ScheduleBound:
    """Times every step of ``schedule`` and sums them (the arguments besides it only label the result)."""
    if hbm_bytes_per_s <= 0 or peak_flops <= 0:
        raise ValueError("hbm_bytes_per_s and peak_flops must be positive")
    breakdown: dict[str, dict[str, float]] = {kind: {"steps": 0, "seconds": 0.0} for kind in step_kinds()}
    for step in schedule.steps:
        entry = breakdown[step.kind]
        entry["steps"] += 1
        entry["seconds"] += step_seconds(shape, step, time_model, hbm_bytes_per_s, peak_flops)
    total_s = sum(entry["seconds"] for entry in breakdown.values())
    per_s = 1.0 / total_s if total_s > 0 else 0.0
    return ScheduleBound(
        order=order, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        time_model=time_model, steps=len(schedule.steps), total_s=total_s,
        output_tokens_per_s=schedule.output_tokens * per_s,
        total_tokens_per_s=(schedule.prompt_tokens + schedule.output_tokens) * per_s,
        chain_bound_s=schedule.longest_output * shape.decode_weight_bytes / hbm_bytes_per_s,
        breakdown=breakdown)


def bound_grid(shape: ModelShape, lengths: Sequence[tuple[int, int]], orders: Iterable[str],
               limits: Iterable[tuple[int, int]], time_models: Iterable[str] = TIME_MODELS,
               hbm_bytes_per_s: float = H100_HBM_BYTES_PER_S,
               peak_flops: float = H100_PEAK_FLOPS) -> list[ScheduleBound]:
    """One bound per (order, (max_num_seqs, max_num_batched_tokens), time model); each schedule simulated once."""
    time_models = list(time_models)
    results = []
    for order in orders:
        queue = order_requests(lengths, order)
        for max_num_seqs, max_num_batched_tokens in limits:
            schedule = simulate_schedule(queue, max_num_seqs, max_num_batched_tokens)
            results.extend(bound_schedule(shape, schedule, order, max_num_seqs, max_num_batched_tokens, model,
                                          hbm_bytes_per_s, peak_flops) for model in time_models)
    return results

"""Seeded synthetic workloads W1-W4 of docs/benchmarks.md: lists of (prompt_token_ids, output_len).

    W1 chat-like   1000 requests, prompt clip(round(lognormal(ln 150, 0.9)), 4, 1024),
                   output clip(round(lognormal(ln 140, 0.9)), 4, 2048 - prompt)
    W2 prefill     1000 requests, 1024 prompt tokens, 128 output tokens
    W3 decode      256 requests, prompt and output lengths uniform in [100, 1024]
    W4 prefix      1000 requests, one shared 2048-token prefix + 128 unique tokens, 128 output tokens
    W7 structured  W1's requests, each constrained by one of the six JSON schemas of STRUCTURED_SCHEMAS

``structured_fraction`` (``--structured-fraction``) constrains that fraction of any workload's requests the same
way (W7: 1.0 unless given); which requests and which schema come from their own generator (``seed`` + 7), so
the lengths stay those of the workload without constraints.

Token ids are uniform over ``[FIRST_TOKEN_ID, vocab_size)`` so that the low ids, where tokenizers keep their
special tokens (bos, eos, pad), never appear in a prompt. Everything comes from one ``numpy`` generator seeded
with ``seed``: the same arguments give the same requests on every machine.

Small models: ``length_scale`` multiplies every nominal length (W1's lognormal medians and clip bounds too),
and ``max_model_len`` fits each request into the model's context (see ``fit_to_context``), so the shape of a
workload survives on a model with a 512-token context.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIRST_TOKEN_ID = 10  # ids below this are left out: special tokens live there in most vocabularies


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int
    json_schema: dict | None = None  # structured outputs: the JSON schema its output must follow

    def __iter__(self):  # unpacks like the (prompt_token_ids, output_len) pair it is
        return iter((self.prompt_token_ids, self.output_len))


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    name: str
    default_num_prompts: int
    description: str


WORKLOADS: dict[str, WorkloadSpec] = {
    "W1": WorkloadSpec("W1", 1000, "chat-like: lognormal prompt (median 150) and output (median 140) lengths"),
    "W2": WorkloadSpec("W2", 1000, "prefill-heavy: 1024 prompt tokens, 128 output tokens"),
    "W3": WorkloadSpec("W3", 256, "decode-heavy: prompt and output lengths uniform in [100, 1024]"),
    "W4": WorkloadSpec("W4", 1000, "shared prefix: 2048-token prefix + 128 unique tokens, 128 output tokens"),
    "W7": WorkloadSpec("W7", 1000, "structured outputs: W1's lengths, every output constrained by one of six "
                                   "JSON schemas"),
}

# W7's schemas: nested objects, arrays, enums, numbers, strings with bounds.
STRUCTURED_SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                      "email": {"type": "string"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"order_id": {"type": "string"}, "items": {"type": "array", "items": {
        "type": "object", "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
                                         "price": {"type": "number"}}, "required": ["sku", "quantity"]}},
        "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]}}, "required": ["order_id", "items"]},
    {"type": "object", "properties": {"location": {"type": "object", "properties": {
        "lat": {"type": "number", "minimum": -90, "maximum": 90},
        "lon": {"type": "number", "minimum": -180, "maximum": 180}}, "required": ["lat", "lon"]},
        "forecast": {"type": "array", "items": {"type": "object", "properties": {
            "day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}, "high": {"type": "number"},
            "low": {"type": "number"}}, "required": ["day", "high", "low"]}, "maxItems": 7}},
     "required": ["location", "forecast"]},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "neutral", "negative"]},
                                      "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                                      "keywords": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
     "required": ["sentiment", "confidence"]},
    {"type": "object", "properties": {"title": {"type": "string"}, "authors": {"type": "array", "items": {
        "type": "object", "properties": {"first": {"type": "string"}, "last": {"type": "string"}},
        "required": ["last"]}}, "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["title", "authors", "year"]},
    {"type": "object", "properties": {"function": {"enum": ["search", "lookup", "calculate"]}, "arguments": {
        "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"},
                                         "exact": {"type": "boolean"}}, "required": ["query"]}},
     "required": ["function", "arguments"]},
]


def fit_to_context(prompt_len: int, output_len: int, max_model_len: int) -> tuple[int, int]:
    """Shrinks a request that does not fit ``max_model_len``: the prompt first (down to half the context),
    then the output. Requests that fit come back unchanged."""
    excess = prompt_len + output_len - max_model_len
    if excess <= 0:
        return prompt_len, output_len
    prompt_len = max(prompt_len - excess, min(prompt_len, max_model_len // 2))
    return prompt_len, min(output_len, max_model_len - prompt_len)


def generate_workload(workload: str, vocab_size: int, num_prompts: int | None = None, seed: int = 0,
                      max_model_len: int | None = None, length_scale: float = 1.0,
                      structured_fraction: float | None = None) -> list[BenchRequest]:
    """The requests of ``workload``; ``num_prompts`` defaults to the workload's own count. ``structured_fraction``
    of them (W7: all, unless given) carry a JSON schema from STRUCTURED_SCHEMAS."""
    if structured_fraction is None:
        structured_fraction = 1.0 if workload == "W7" else 0.0
    if not 0.0 <= structured_fraction <= 1.0:
        raise ValueError(f"structured_fraction must be in [0, 1], got {structured_fraction}")
    requests = _unconstrained_workload("W1" if workload == "W7" else workload, vocab_size, num_prompts, seed,
                                       max_model_len, length_scale, WORKLOADS.get(workload))
    if structured_fraction:
        rng = np.random.default_rng(seed + 7)
        chosen = rng.random(len(requests)) < structured_fraction
        schemas = rng.integers(0, len(STRUCTURED_SCHEMAS), size=len(requests))
        requests = [BenchRequest(r.prompt_token_ids, r.output_len, STRUCTURED_SCHEMAS[int(k)]) if c else r
                    for r, c, k in zip(requests, chosen.tolist(), schemas)]
    return requests


def _unconstrained_workload(workload: str, vocab_size: int, num_prompts: int | None, seed: int,
                            max_model_len: int | None, length_scale: float,
                            spec: WorkloadSpec | None) -> list[BenchRequest]:
    if spec is None:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    num_prompts = spec.default_num_prompts if num_prompts is None else num_prompts
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}")
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size must be larger than {FIRST_TOKEN_ID}, got {vocab_size}")
    if not length_scale > 0:
        raise ValueError(f"length_scale must be positive, got {length_scale}")
    if max_model_len is not None and max_model_len < 8:
        raise ValueError(f"max_model_len must be at least 8 to hold a benchmark request, got {max_model_len}")
    rng = np.random.default_rng(seed)
    context = max_model_len or 1 << 62
    if workload == "W4":
        return _shared_prefix(rng, vocab_size, num_prompts, context, length_scale)
    lengths = _LENGTHS[workload](rng, num_prompts, length_scale)
    requests = []
    for prompt_len, output_len in lengths:
        prompt_len, output_len = fit_to_context(prompt_len, output_len, context)
        requests.append(BenchRequest(_token_ids(rng, vocab_size, prompt_len), output_len))
    return requests


def _scaled(length: float, scale: float) -> int:
    return max(1, round(length * scale))


def _token_ids(rng: np.random.Generator, vocab_size: int, n: int) -> list[int]:
    return rng.integers(FIRST_TOKEN_ID, vocab_size, size=n).tolist()


def _chat_like(rng: np.random.Generator, n: int, scale: float) -> list[tuple[int, int]]:
    # docs/benchmarks.md: prompt clip(round(lognormal(ln 150, 0.9)), 4, 1024); output clip(..., 4, 2048 - prompt).
    # With a scale, the medians and the bounds 1024 / 2048 scale together; the floor of 4 stays.
    prompts = rng.lognormal(np.log(150 * scale), 0.9, size=n)
    outputs = rng.lognormal(np.log(140 * scale), 0.9, size=n)
    prompt_max, total_max = _scaled(1024, scale), _scaled(2048, scale)
    lengths = []
    for p, o in zip(prompts, outputs):
        prompt_len = int(np.clip(round(p), 4, max(4, prompt_max)))
        output_len = int(np.clip(round(o), 4, max(4, total_max - prompt_len)))
        lengths.append((prompt_len, output_len))
    return lengths


def _prefill_heavy(rng: np.random.Generator, n: int, scale: float) -> list[tuple[int, int]]:
    return [(_scaled(1024, scale), _scaled(128, scale))] * n


def _decode_heavy(rng: np.random.Generator, n: int, scale: float) -> list[tuple[int, int]]:
    low, high = _scaled(100, scale), _scaled(1024, scale)
    prompts = rng.integers(low, high + 1, size=n)
    outputs = rng.integers(low, high + 1, size=n)
    return [(int(p), int(o)) for p, o in zip(prompts, outputs)]


_LENGTHS = {"W1": _chat_like, "W2": _prefill_heavy, "W3": _decode_heavy}


def _shared_prefix(rng: np.random.Generator, vocab_size: int, n: int, context: int,
                   scale: float) -> list[BenchRequest]:
    # The prefix, not the unique part, gives way to a short context: every prompt must stay distinct.
    unique_len, output_len = _scaled(128, scale), _scaled(128, scale)
    prefix_len = min(_scaled(2048, scale), context - unique_len - output_len)
    if prefix_len < 1:
        raise ValueError(f"max_model_len {context} is too short for W4 ({unique_len} unique + {output_len} output "
                         "tokens after the prefix); lower --length-scale")
    prefix = _token_ids(rng, vocab_size, prefix_len)
    return [BenchRequest(prefix + _token_ids(rng, vocab_size, unique_len), output_len) for _ in range(n)]


def shared_prefix_len(requests: list[BenchRequest]) -> int:
    """Length of the prefix every prompt starts with (W4's system prefix)."""
    first = requests[0].prompt_token_ids
    length = len(first)
    for request in requests[1:]:
        ids = request.prompt_token_ids
        length = min(length, len(ids))
        mismatch = next((i for i in range(length) if ids[i] != first[i]), length)
        length = mismatch
    return length


# ---- the long-prompt mix of `bench serve` ---------------------------------------------------------------------
def long_prompt_requests(vocab_size: int, num_prompts: int, prompt_len: int, output_len: int,
                         seed: int = 0) -> list[BenchRequest]:
    """``num_prompts`` prompts of exactly ``prompt_len`` token ids, for the stall check of the server: do short
    requests keep streaming while a long prompt is prefilled? Drawn from their own generator (``seed`` + 1), so
    the short requests beside them are the same as in a run without them."""
    if num_prompts < 1 or prompt_len < 1 or output_len < 1:
        raise ValueError(f"long prompts: count, length and output length must be at least 1, got {num_prompts}, "
                         f"{prompt_len}, {output_len}")
    rng = np.random.default_rng(seed + 1)
    return [BenchRequest(_token_ids(rng, vocab_size, prompt_len), output_len) for _ in range(num_prompts)]


def spread_evenly(requests: list, extra: list) -> list[tuple[object, bool]]:
    """``requests`` in order with ``extra`` placed at even intervals among them, as (item, is_extra) pairs. With
    Poisson arrivals over the list, the extras arrive spread over the run."""
    positions = [max(1, round((j + 1) * len(requests) / (len(extra) + 1))) for j in range(len(extra))]
    mixed: list[tuple[object, bool]] = []
    next_extra = 0
    for index, request in enumerate(requests):
        while next_extra < len(extra) and positions[next_extra] <= index:
            mixed.append((extra[next_extra], True))
            next_extra += 1
        mixed.append((request, False))
    mixed.extend((item, True) for item in extra[next_extra:])
    return mixed

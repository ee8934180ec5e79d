"""Workload W8, multi-turn chat (docs/benchmarks.md), for ``sluice bench serve --workload W8``.

    conversation c:  context (~2,000 tokens)  + user_1 (~300) -> output_1 (~150)
                     history_1 + user_2                        -> output_2
                     ...                                          (4-8 turns)

Each turn's prompt is the whole conversation so far: the previous prompt, the tokens the server generated for it
and the next user message. Conversations start as a W5 stream (Gamma/Poisson gaps at ``--request-rate``); a
conversation's next turn is sent after the user's think time (``--think-time``: exponential gaps with that mean,
seeded; 0 sends it as soon as the previous turn finished). Think time is what makes the workload a test of KV
tiers: while one user thinks, the others' turns fill the GPU's pool, and the next turn finds its history in the
server's prefix cache only if the server kept it (on the device, or in a host tier). The generated tokens travel back as ids (``return_token_ids``, which
sluice and vLLM answer); a server that does not send them gets random ids in their place (``history`` is then
``"synthetic"`` in the report, and its hits stop at the previous prompt).

The report adds, beside W5's metrics over every turn: TTFT of first turns and of later turns (the multi-turn
figure: a later turn should cost only its new tokens), and the server's prefix-cache counters over the run (every
``*prefix_cache*`` counter of its /metrics, differenced, with the hit rate of each hits/queries pair: the GPU tier,
and the host tier where the server has one).
"""
from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sluice.bench.datasets import FIRST_TOKEN_ID

NUM_CONVERSATIONS = 200
TURNS = (4, 8)  # inclusive
CONTEXT_TOKENS = 2000
USER_TOKENS = 300
OUTPUT_TOKENS = 150
JITTER = 0.2  # each length is drawn uniformly within +-20% of its nominal value
THINK_TIME_S = 10.0  # mean pause between an answer and the user's next message


@dataclass(frozen=True, slots=True)
class Conversation:
    context: list[int]
    user_turns: list[list[int]]  # one user message per turn
    output_lens: list[int]  # tokens asked of the server per turn
    think_times: list[float]  # seconds before each turn after the first (len(user_turns) - 1 of them)


def generate_conversations(vocab_size: int, num_conversations: int = NUM_CONVERSATIONS, seed: int = 0,
                           length_scale: float = 1.0, max_model_len: int | None = None,
                           think_time_s: float = THINK_TIME_S) -> list[Conversation]:
    """W8's conversations: seeded, reproducible; turns that would not fit ``max_model_len`` are dropped (every
    conversation keeps at least its first turn, whose context is shortened if need be). Think times are drawn
    from their own generator, so the token ids do not depend on them."""
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_TOKEN_ID}, got {vocab_size}")
    if think_time_s < 0:
        raise ValueError(f"think_time_s must be at least 0, got {think_time_s}")
    rng = np.random.default_rng(seed)
    think_rng = np.random.default_rng([seed, 1])

    def length(nominal: int) -> int:
        scaled = max(1, round(nominal * length_scale))
        return int(rng.integers(max(1, round(scaled * (1 - JITTER))), round(scaled * (1 + JITTER)) + 1))

    def tokens(n: int) -> list[int]:
        return rng.integers(FIRST_TOKEN_ID, vocab_size, size=n).tolist()

    conversations = []
    for _ in range(num_conversations):
        num_turns = int(rng.integers(TURNS[0], TURNS[1] + 1))
        context = tokens(length(CONTEXT_TOKENS))
        users = [tokens(length(USER_TOKENS)) for _ in range(num_turns)]
        outputs = [length(OUTPUT_TOKENS) for _ in range(num_turns)]
        if max_model_len is not None:
            total, kept = len(context), 0
            for user, out in zip(users, outputs):
                if total + len(user) + out > max_model_len:
                    break
                total += len(user) + out
                kept += 1
            if kept == 0:  # the context alone is too long: shorten it to fit one turn
                context = context[:max(1, max_model_len - len(users[0]) - outputs[0])]
                kept = 1
            users, outputs = users[:kept], outputs[:kept]
        thinks = think_rng.exponential(think_time_s, size=len(users) - 1).tolist() if think_time_s > 0 \
            else [0.0] * (len(users) - 1)
        conversations.append(Conversation(context, users, outputs, thinks))
    return conversations


@dataclass(slots=True)
class TurnResult:
    conversation: int
    turn: int
    result: Any  # serve.RequestResult
    history: str  # "ids" (the server's own tokens) or "synthetic"


async def run_conversations(base_url: str, model: str, conversations: Sequence[Conversation], gaps: Sequence[float],
                            headers: dict[str, str], vocab_size: int, show_progress: bool = True,
                            timeout_s: float = 6 * 3600) -> tuple[list[TurnResult], float]:
    """Every conversation, its turns in order, each after its think time; conversations start on their arrival
    schedule."""
    import httpx
    from tqdm import tqdm

    from sluice.bench.serve_client import ServeRequest, send_completion

    url = base_url.rstrip("/") + "/v1/completions"
    total_turns = sum(len(c.user_turns) for c in conversations)
    progress = tqdm(total=total_turns, disable=not show_progress, desc="turns")
    rng = np.random.default_rng(1)
    limits = httpx.Limits(max_connections=len(conversations), max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:
        async def one(index: int, conversation: Conversation) -> list[TurnResult]:
            history = list(conversation.context)
            results = []
            for turn, (user, output_len) in enumerate(zip(conversation.user_turns, conversation.output_lens)):
                if turn and conversation.think_times[turn - 1] > 0:
                    await asyncio.sleep(conversation.think_times[turn - 1])
                prompt = history + user
                generated: list[int] = []
                result = await send_completion(client, url, model, ServeRequest(prompt, len(prompt), output_len),
                                               headers, {"return_token_ids": True}, generated)
                kind = "ids" if len(generated) == output_len else "synthetic"
                if kind == "synthetic":
                    generated = rng.integers(FIRST_TOKEN_ID, vocab_size, size=output_len).tolist()
                results.append(TurnResult(index, turn, result, kind))
                progress.update(1)
                if not result.success:
                    break  # the rest of this conversation has no history to build on
                history = prompt + generated
            return results

        start = time.perf_counter()
        tasks = []
        for index, (conversation, gap) in enumerate(zip(conversations, gaps)):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(index, conversation)))
        per_conversation = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    progress.close()
    return [t for turns in per_conversation for t in turns], duration


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN|[+-]Inf)$")


def prefix_cache_counters(metrics_text: str) -> dict[str, float]:
    """Every ``*prefix_cache*`` sample of a Prometheus text page (name and labels -> value), counters'
    ``_created`` stamps left out."""
    out: dict[str, float] = {}
    for line in metrics_text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match and "prefix_cache" in match.group(1) and not match.group(1).endswith("_created"):
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Each counter's growth over the run, and the hit rate of each ``..hits..`` / ``..queries..`` pair."""
    deltas = {name: after[name] - before.get(name, 0.0) for name in after}
    rates = {}
    for name, hits in deltas.items():
        if "hits" in name:
            queries = deltas.get(name.replace("hits", "queries"))
            if queries:
                rates[name.replace("_total", "").replace("hits", "hit_rate")] = hits / queries
    return {"counters": deltas, "hit_rates": rates}


def turn_metrics(turns: Sequence[TurnResult], duration_s: float, slos: dict[str, float]) -> dict[str, Any]:
    """TTFT and the rest of W5's metrics for first turns and for later turns, and how histories travelled."""
    from sluice.bench.serve_client import calculate_metrics

    first = [t.result for t in turns if t.turn == 0]
    later = [t.result for t in turns if t.turn > 0]
    out: dict[str, Any] = {"num_turns": len(turns), "num_conversations": len({t.conversation for t in turns}),
                           "history": "synthetic" if any(t.history == "synthetic" for t in turns) else "ids"}
    for name, results in (("first_turns", first), ("later_turns", later)):
        if results:
            metrics = calculate_metrics(results, duration_s, slos).to_dict()
            out[name] = {k: v for k, v in metrics.items() if k.startswith(("ttft", "e2e")) or k in
                         ("completed", "failed", "total_input_tokens")}
    return out

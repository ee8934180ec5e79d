"""`sluice bench serve`: workload W5 against any OpenAI-compatible server (sluice, vLLM, SGLang ...).

    sluice bench serve --base-url http://127.0.0.1:8000 --model NAME [--tokenizer PATH | --vocab-size V]
                       [--request-rate 16 | inf] [--burstiness 1] [--max-concurrency N] [--num-prompts 1000]
                       [--goodput ttft:500 tpot:50] [--output-json FILE]

Requests are W1's shapes (sluice/bench/datasets.py), sent as streaming ``/v1/completions`` with
``ignore_eos`` and ``max_tokens`` = the request's output length. Arrivals: gaps drawn from
Gamma(shape=burstiness, scale=1 / (rate * burstiness)), i.e. Poisson at burstiness 1, burstier below it.

Metric definitions follow vLLM's ``bench serve`` (``calculate_metrics``):

    TTFT  send -> first chunk with choices             per request
    TPOT  (E2E - TTFT) / (output_tokens - 1)           per request with more than one output token
    ITL   gap between consecutive chunks               every gap of every request
    E2E   send -> last chunk                           per request
    goodput  requests meeting every SLO / duration     (SLO values in ms, metric <= SLO)

Prompts are token ids (sluice and vLLM accept them); ``--prompt-format text`` decodes them with the
tokenizer first, for servers that want strings (then the server's own count of prompt tokens may differ).

Long-prompt mix (``--long-prompt-len 32768 --num-long-prompts 4``): that many long prompts join the W1 requests,
at even intervals of the arrival order, so they arrive while short requests stream. The report then has the
short requests' own latencies under ``engine.short_requests`` (``itl_ms_p50``, ``itl_ms_p99`` and
``itl_p99_over_p50``: does a long prefill stall the decodes?) and the long ones' under ``engine.long_requests``.

LoRA mix (``--lora-mix noisy:8 lora-1:1 ... lora-7:1``, adapters the server serves, e.g. from ``sluice bench
make-loras``): each request goes to one adapter, drawn in proportion to its weight (sluice/bench/lora.py); the
report adds ``engine.per_adapter`` (each adapter's metrics) and ``engine.light_adapters`` (every adapter but the
heaviest, together).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import resource
import subprocess
from typing import Any

from sluice.bench.report import default_output_path, write_report
from sluice.bench.serve_client import (_METRICS, DEFAULT_GOODPUT, RequestResult, ServeMetrics, ServeRequest,
                                       arrival_gaps, calculate_metrics, parse_goodput, run_requests)


def format_table(report: dict[str, Any]) -> str:
    """vLLM's result block, so numbers can be compared side by side."""
    e = report["engine"]
    rate = report["request_rate"]
    lines = [f"{' Serving Benchmark Result (W5) ':=^56}",
             f"{'Server / model:':<40}{report['base_url']} {report['model']}",
             f"{'Request rate (req/s) / burstiness:':<40}{rate} / {report['burstiness']}",
             f"{'Max concurrency:':<40}{report['max_concurrency'] or '-'}",
             f"{'Successful requests:':<40}{e['completed']}", f"{'Failed requests:':<40}{e['failed']}",
             f"{'Benchmark duration (s):':<40}{e['duration_s']:.2f}",
             f"{'Total input tokens:':<40}{e['total_input_tokens']}",
             f"{'Total generated tokens:':<40}{e['total_output_tokens']}",
             f"{'Request throughput (req/s):':<40}{e['requests_per_s']:.2f}",
             f"{'Output token throughput (tok/s):':<40}{e['output_tokens_per_s']:.2f}",
             f"{'Total token throughput (tok/s):':<40}{e['total_tokens_per_s']:.2f}"]
    if e["goodput_requests_per_s"] is not None:
        slo = " ".join(f"{k}<={v:g}ms" for k, v in report["goodput_slo_ms"].items())
        lines.append(f"{'Goodput (req/s):':<40}{e['goodput_requests_per_s']:.2f}  ({slo})")
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2e": "End-to-end Latency"}
    for name in _METRICS:
        lines.append(f"{' ' + titles[name] + ' ':-^56}")
        for stat, label in (("mean", "Mean"), ("p50", "Median"), ("p99", "P99")):
            lines.append(f"{f'{label} {name.upper()} (ms):':<40}{e[f'{name}_ms_{stat}']:.2f}")
    if "short_requests" in e:
        short, long = e["short_requests"], e["long_requests"]
        title = f" Short requests among {report['num_long_prompts']} long prompts "
        lines.append(f"{title:-^56}")
        lines += [f"{'Long prompt length (tokens):':<40}{report['long_prompt_len']}",
                  f"{'Median ITL, short requests (ms):':<40}{short['itl_ms_p50']:.2f}",
                  f"{'P99 ITL, short requests (ms):':<40}{short['itl_ms_p99']:.2f}",
                  f"{'P99 / median ITL, short requests:':<40}{short['itl_p99_over_p50'] or float('nan'):.2f}",
                  f"{'Median TTFT, short requests (ms):':<40}{short['ttft_ms_p50']:.2f}",
                  f"{'Mean TTFT, long prompts (ms):':<40}{long['ttft_ms_mean']:.2f}"]
    if "per_adapter" in e:
        from sluice.bench.lora import format_lora_lines
        lines += format_lora_lines(e)
    lines.append("=" * 56)
    return "\n".join(lines)


# ---- the command ------------------------------------------------------------------------------------------------
def add_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = bench_subparsers.add_parser(
        "serve", help="online serving benchmark (W5, W8) against an OpenAI-compatible server",
        description="Workloads of docs/benchmarks.md: W5, W1 requests streamed with Poisson/Gamma arrivals; W8, "
                    "multi-turn conversations starting on such arrivals, each turn resending the whole history.")
    parser.add_argument("--workload", default="W5", choices=["W5", "W8"])
    parser.add_argument("--num-conversations", type=int, default=None,
                        help="W8: conversations (default 200; --num-prompts is W5's)")
    parser.add_argument("--think-time", type=float, default=None,
                        help="W8: mean seconds between an answer and the user's next turn (exponential; default 10; "
                             "0: at once)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    parser.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions"])
    parser.add_argument("--model", required=True, help="the served model name (also the tokenizer, if a path)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or .gguf: vocab size and text prompts")
    parser.add_argument("--vocab-size", type=int, default=None, help="token id range of prompts (no tokenizer)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="fit requests into this context (default: the server's /v1/models max_model_len)")
    parser.add_argument("--prompt-format", default="token-ids", choices=["token-ids", "text"])
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--length-scale", type=float, default=1.0, help="multiply W1's lengths (small models)")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests per second, or inf")
    parser.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape: 1 is Poisson, < 1 burstier")
    parser.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    parser.add_argument("--goodput", nargs="*", default=DEFAULT_GOODPUT, metavar="NAME:MS",
                        help="SLOs for goodput, names ttft, tpot, e2e (default: ttft:500 tpot:50)")
    parser.add_argument("--long-prompt-len", type=int, default=0,
                        help="tokens of each long prompt mixed among the W1 requests (0: none)")
    parser.add_argument("--num-long-prompts", type=int, default=4, help="how many long prompts, spread evenly")
    parser.add_argument("--long-prompt-output-len", type=int, default=16, help="output tokens of a long prompt")
    parser.add_argument("--seed", type=int, default=0, help="seeds the workload and the arrival times")
    parser.add_argument("--structured-fraction", type=float, default=0.0,
                        help="fraction of requests sent with a response_format JSON schema (W7's schemas)")
    parser.add_argument("--lora-mix", nargs="*", default=None, metavar="NAME:WEIGHT",
                        help="send each request to one of these served LoRA adapters (model names), drawn in "
                             "proportion to the weights; per-adapter TTFT percentiles in the report")
    parser.add_argument("--api-key", default=os.environ.get("SLUICE_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--num-warmup-prompts", type=int, default=1, help="untimed requests first (also a check)")
    parser.add_argument("--device-name", default=None, help="the server's device for the report (default: local)")
    parser.add_argument("--output-json", default=None, help="result file (default: benchmarks/results/serve_...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_serve_command)
    return parser


def _validate(args: argparse.Namespace) -> None:
    if args.num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {args.num_prompts}")
    if not args.request_rate > 0:
        raise ValueError(f"request_rate must be positive (or inf), got {args.request_rate}")
    if not args.burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {args.burstiness}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {args.max_concurrency}")
    if args.num_warmup_prompts < 0:
        raise ValueError(f"num_warmup_prompts must not be negative, got {args.num_warmup_prompts}")
    if args.long_prompt_len < 0 or (args.long_prompt_len and args.num_long_prompts < 1):
        raise ValueError("long_prompt_len must not be negative, and num_long_prompts must be at least 1 with it")


def _raise_open_files_limit(needed: int) -> None:
    """A connection per request in flight: at rate inf that is every request, past a common default of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def build_requests(args: argparse.Namespace, headers: dict[str, str]) -> list[ServeRequest]:
    """W1 shapes for the server's vocabulary and context; text prompts when asked."""
    from sluice.bench.datasets import generate_workload, spread_evenly

    tokenizer = _tokenizer(args)
    if args.prompt_format == "text" and tokenizer is None:
        raise ValueError("tokenizer: --prompt-format text needs --tokenizer")
    vocab_size, max_model_len = _vocab_and_context(args, headers, tokenizer)
    workload = generate_workload("W1", vocab_size, args.num_prompts, args.seed, max_model_len, args.length_scale,
                                 args.structured_fraction)
    mixed = [(r, False) for r in workload]
    if args.long_prompt_len:
        mixed = spread_evenly(workload, _long_prompts(args, vocab_size, max_model_len))
    models = _request_models(args, len(mixed))
    return [ServeRequest(tokenizer.decode(r.prompt_token_ids) if args.prompt_format == "text" else r.prompt_token_ids,
                         len(r.prompt_token_ids), r.output_len, is_long, getattr(r, "json_schema", None), model)
            for (r, is_long), model in zip(mixed, models)]


def _request_models(args: argparse.Namespace, num_requests: int) -> list[str | None]:
    """Each request's model field: an adapter of --lora-mix, or None (the run's --model)."""
    from sluice.bench.lora import assign_adapters, parse_lora_mix

    mix = parse_lora_mix(getattr(args, "lora_mix", None))
    return assign_adapters(num_requests, mix, args.seed) if mix else [None] * num_requests


def _tokenizer(args: argparse.Namespace) -> Any:
    tokenizer_path = args.tokenizer or (args.model if os.path.exists(args.model) else None)
    if not tokenizer_path:
        return None
    from sluice.tokenizer import get_tokenizer
    return get_tokenizer(tokenizer_path)


def _vocab_and_context(args: argparse.Namespace, headers: dict[str, str], tokenizer: Any = None,
                       ) -> tuple[int, int | None]:
    """The prompt token id range (--vocab-size or the tokenizer's) and the server's context (--max-model-len or
    its /v1/models entry)."""
    import httpx

    if tokenizer is None and not args.vocab_size:
        tokenizer = _tokenizer(args)
    vocab_size = args.vocab_size or (len(tokenizer) if tokenizer is not None else None)
    if vocab_size is None:
        raise ValueError("vocab_size: give --vocab-size or --tokenizer so that prompt token ids are valid")
    max_model_len = args.max_model_len
    if max_model_len is None:
        models = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()
        max_model_len = next((m.get("max_model_len") for m in models.get("data", []) if m["id"] == args.model), None)
    return vocab_size, max_model_len


def _long_prompts(args: argparse.Namespace, vocab_size: int, max_model_len: int | None) -> list:
    from sluice.bench.datasets import long_prompt_requests

    needed = args.long_prompt_len + args.long_prompt_output_len
    if max_model_len is not None and needed > max_model_len:
        raise ValueError(f"long_prompt_len: {args.long_prompt_len} prompt + {args.long_prompt_output_len} output "
                         f"tokens do not fit the server's max_model_len {max_model_len}")
    return long_prompt_requests(vocab_size, args.num_long_prompts, args.long_prompt_len,
                                args.long_prompt_output_len, args.seed)


def run_serve_command(args: argparse.Namespace) -> int:
    _validate(args)
    if args.workload == "W8":
        return run_multiturn(args)
    _raise_open_files_limit(args.num_prompts + args.num_long_prompts + 64)
    slos = parse_goodput(args.goodput)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    requests = build_requests(args, headers)
    if args.num_warmup_prompts:
        short = [r for r in requests if not r.is_long]
        warmup = [ServeRequest(r.prompt, r.prompt_len, min(r.output_len, 4)) for r in short[:args.num_warmup_prompts]]
        results, _ = asyncio.run(run_requests(args.base_url, args.endpoint, args.model, warmup, [0.0] * len(warmup),
                                              None, headers, show_progress=False))
        if not all(r.success for r in results):
            raise ValueError(f"base_url: the warmup request failed: {next(r.error for r in results if not r.success)}")
    gaps = arrival_gaps(len(requests), args.request_rate, args.burstiness, args.seed)
    results, duration = asyncio.run(run_requests(args.base_url, args.endpoint, args.model, requests, gaps,
                                                 args.max_concurrency, headers, not args.no_progress))
    report = build_report(args, calculate_metrics(results, duration, slos), slos, results)
    if args.long_prompt_len:
        report["engine"].update(long_prompt_metrics(requests, results, duration, slos))
    if args.lora_mix:
        from sluice.bench.lora import parse_lora_mix, per_adapter_metrics

        mix = parse_lora_mix(args.lora_mix)
        report["lora_mix"] = mix
        report["engine"].update(per_adapter_metrics([r.model for r in requests], results, mix, duration, slos))
    print(format_table(report))
    write_report(report, args.output_json or default_output_path("serve", report, f"rate-{report['request_rate']}"))
    return 0 if report["engine"]["failed"] == 0 else 1


def run_multiturn(args: argparse.Namespace) -> int:
    """W8 (multiturn.py): conversations on W5 arrivals; per-turn metrics and the server's prefix-cache counters."""
    import httpx

    from sluice.bench.multiturn import (NUM_CONVERSATIONS, THINK_TIME_S, counter_deltas, generate_conversations,
                                        prefix_cache_counters, run_conversations, turn_metrics)

    num_conversations = args.num_conversations or NUM_CONVERSATIONS
    think_time_s = THINK_TIME_S if args.think_time is None else args.think_time
    if num_conversations < 1:
        raise ValueError(f"num_conversations must be at least 1, got {num_conversations}")
    if args.prompt_format != "token-ids":
        raise ValueError("prompt_format: W8 sends token ids (its histories hold the server's own tokens)")
    _raise_open_files_limit(num_conversations + 64)
    slos = parse_goodput(args.goodput)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    vocab_size, max_model_len = _vocab_and_context(args, headers)
    conversations = generate_conversations(vocab_size, num_conversations, args.seed, args.length_scale, max_model_len,
                                           think_time_s)

    def scrape() -> dict[str, float]:
        response = httpx.get(args.base_url.rstrip("/") + "/metrics", headers=headers, timeout=30)
        return prefix_cache_counters(response.text) if response.status_code == 200 else {}

    before = scrape()
    gaps = arrival_gaps(len(conversations), args.request_rate, args.burstiness, args.seed)
    turns, duration = asyncio.run(run_conversations(args.base_url, args.model, conversations, gaps, headers,
                                                    vocab_size, not args.no_progress))
    results = [t.result for t in turns]
    report = build_report(args, calculate_metrics(results, duration, slos), slos, results)
    report["workload"] = "W8"
    report["think_time_s"] = think_time_s
    report["num_prompts"] = len(turns)
    report["engine"].update(turn_metrics(turns, duration, slos))
    report["engine"]["prefix_cache"] = counter_deltas(before, scrape())
    print(format_table(report))
    write_report(report, args.output_json or default_output_path("serve", report, f"W8-rate-{report['request_rate']}"))
    return 0 if report["engine"]["failed"] == 0 else 1


def long_prompt_metrics(requests: list[ServeRequest], results: list[RequestResult], duration_s: float,
                        slos: dict[str, float]) -> dict[str, Any]:
    """The short and the long requests of the long-prompt mix, each measured on its own."""
    split: dict[bool, list[RequestResult]] = {False: [], True: []}
    for request, result in zip(requests, results):
        split[request.is_long].append(result)
    short = calculate_metrics(split[False], duration_s, slos).to_dict()
    short["itl_p99_over_p50"] = short["itl_ms_p99"] / short["itl_ms_p50"] if short["itl_ms_p50"] else None
    return {"short_requests": short, "long_requests": calculate_metrics(split[True], duration_s, slos).to_dict()}


def build_report(args: argparse.Namespace, metrics: ServeMetrics, slos: dict[str, float],
                 results: list[RequestResult]) -> dict[str, Any]:
    """docs/benchmarks.md's fields; the server under test is ``engine`` (W5 has no in-run peers)."""
    from sluice.bench.cli import git_commit

    errors = sorted({r.error for r in results if not r.success})
    rate = args.request_rate
    return {
        "workload": "W5", "device": args.device_name or _local_device_name(), "model": args.model,
        "sluice_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_url": args.base_url, "endpoint": args.endpoint, "num_prompts": args.num_prompts,
        "request_rate": "inf" if rate == float("inf") else rate, "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency, "seed": args.seed, "length_scale": args.length_scale,
        "long_prompt_len": args.long_prompt_len,
        "num_long_prompts": args.num_long_prompts if args.long_prompt_len else 0,
        "long_prompt_output_len": args.long_prompt_output_len if args.long_prompt_len else 0,
        "prompt_format": args.prompt_format, "goodput_slo_ms": slos,
        "engine": {"name": args.base_url, **metrics.to_dict(), "errors": errors[:10]},
        "peers": {}, "ratios": {}, "roofline_fraction": None,
    }


def _local_device_name() -> str:
    """The first GPU's name as torch gives it, asked of nvidia-smi: importing torch here would open a CUDA
    context (~0.5 GB) on the GPU the server under test is using. "cpu" without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    names = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return names[0].strip() if names else "cpu"



"""`sluice bench latency`: the end-to-end latency of one batch, as vLLM's ``benchmark_latency`` measures it.

    sluice bench latency --batch-sizes 1,8,32 --input-len 32 --output-len 128 [--prompt-echo]
                         [--speculative-config '{"method": "ngram", "num_speculative_tokens": 4}'] [engine flags]

For each batch size: ``--num-iters-warmup`` untimed runs, then ``--num-iters`` timed runs of one
``LLM.generate`` over that many requests of exactly ``--input-len`` prompt tokens and ``--output-len`` output
tokens (ignore_eos, greedy unless ``--temperature``); it reports the average and the 10/25/50/75/90/99th
percentile latency per batch, and with speculative decoding the acceptance it saw. Prompts are random token ids
by default, one per request (vLLM's dummy prompts). ``--prompt-echo`` asks the model instead to repeat a passage
word for word (through its chat template when it has one; the passage is cut or repeated to fill
``--input-len``), the case where prompt lookup (``"method": "ngram"``) pays.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from typing import Any

import numpy as np

from sluice.config import EngineArgs

PERCENTILES = (10, 25, 50, 75, 90, 99)
ECHO_INSTRUCTION = "Repeat the following text exactly, word for word, and nothing else.\n\n"
ECHO_PASSAGE = (
    "The river rose slowly through the night, and by morning the lower fields were under water. The farmers "
    "moved their animals to the hill behind the church, where the ground stayed dry, and the children carried "
    "bread and blankets up the narrow path. Nobody in the village could remember a flood like it. The old miller "
    "said that his father had spoken of one, many years before, when the bridge was still made of wood and the "
    "road to the town was only a track between the trees. In the afternoon the rain stopped and the sun came out "
    "over the valley, and the water began to fall again, leaving mud and broken branches across the fields. "
)


def add_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = bench_subparsers.add_parser(
        "latency", help="end-to-end latency of one batch per batch size (vLLM's benchmark_latency)",
        description="Latency of one LLM.generate over a batch of fixed-length requests, per batch size; with "
                    "--speculative-config, speculative decoding's acceptance too.")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    bench.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    bench.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    bench.add_argument("--num-iters-warmup", type=int, default=3, help="untimed runs per batch size")
    bench.add_argument("--num-iters", type=int, default=10, help="timed runs per batch size")
    bench.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    bench.add_argument("--prompt-echo", action="store_true",
                       help="prompts ask the model to repeat a passage word for word (prompt lookup pays)")
    bench.add_argument("--output-json", default=None, help="write the report here")
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run_latency_command)
    return parser


def run_latency_command(args: argparse.Namespace) -> int:
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    for name, value in (("input_len", args.input_len), ("output_len", args.output_len),
                        ("num_iters", args.num_iters), *(("batch_sizes", b) for b in batch_sizes)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    report = run_latency_benchmark(args, EngineArgs.from_cli_args(args), batch_sizes)
    print(format_table(report))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.output_json}")
    return 0


def run_latency_benchmark(args: argparse.Namespace, engine_args: EngineArgs, batch_sizes: list[int]) -> dict[str, Any]:
    from sluice import LLM, SamplingParams

    engine_args = dataclasses.replace(engine_args, max_num_seqs=engine_args.max_num_seqs or max(batch_sizes))
    kwargs = {f.name: getattr(engine_args, f.name) for f in dataclasses.fields(EngineArgs)
              if not f.name.startswith("_") and f.name != "model"}
    llm = LLM(engine_args.model, **kwargs)
    # One prompt per request of the largest batch (random ids differ per request, as vLLM's dummy prompts do;
    # echo requests share their passage); every iteration repeats them, so after warm-up their prefill is a
    # prefix-cache hit in both engines and the figure is decode time.
    largest = max(batch_sizes)
    prompts = ([make_prompt(llm, args.input_len, True, engine_args.seed)] * largest if args.prompt_echo else
               [make_prompt(llm, args.input_len, False, engine_args.seed + i) for i in range(largest)])
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len,
                            ignore_eos=True, seed=engine_args.seed if args.temperature > 0 else None)
    results = []
    for batch_size in batch_sizes:
        requests = [{"prompt_token_ids": prompt} for prompt in prompts[:batch_size]]
        for _ in range(args.num_iters_warmup):
            llm.generate(requests, params, use_tqdm=False)
        before = _spec_stats(llm)
        latencies = []
        for _ in range(args.num_iters):
            start = time.perf_counter()
            llm.generate(requests, params, use_tqdm=False)
            latencies.append(time.perf_counter() - start)
        results.append(_batch_result(batch_size, args.output_len, latencies, before, _spec_stats(llm)))
    from sluice.bench.cli import git_commit
    config = llm.llm_engine.config
    return {
        "benchmark": "latency", "sluice_commit": git_commit(), "model": engine_args.model or "default",
        "device": config.device.type,
        "device_name": config.device.name, "input_len": args.input_len, "output_len": args.output_len,
        "prompt_echo": args.prompt_echo, "temperature": args.temperature,
        "speculative_config": engine_args.speculative_config, "num_iters": args.num_iters, "results": results,
    }


def make_prompt(llm: Any, input_len: int, echo: bool, seed: int) -> list[int]:
    """``input_len`` token ids: random ones, or an echo request (chat template where the model has one)."""
    tokenizer = llm.get_tokenizer()
    if not echo:
        vocab = llm.llm_engine.config.model.vocab_size
        rng = random.Random(seed)
        return [rng.randrange(vocab) for _ in range(input_len)]
    if tokenizer is None:
        raise ValueError("--prompt-echo needs a tokenizer (drop --skip-tokenizer-init)")
    passage_ids = tokenizer.encode(ECHO_PASSAGE, add_special_tokens=False)
    frame = _echo_ids(llm, "")
    room = max(1, input_len - len(frame))
    passage_ids = (passage_ids * (room // len(passage_ids) + 1))[:room]
    ids = _echo_ids(llm, tokenizer.decode(passage_ids))
    return ids[:input_len] if len(ids) > input_len else ids


def _echo_ids(llm: Any, passage: str) -> list[int]:
    engine = llm.llm_engine
    message = ECHO_INSTRUCTION + passage
    if engine.chat_template is not None or getattr(engine.tokenizer, "chat_template", None):
        return engine.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
    return engine.tokenizer.encode(message)


def _spec_stats(llm: Any):
    core = getattr(llm.llm_engine, "core", None)
    return core.make_stats().spec_decoding if core is not None else None


def _batch_result(batch_size: int, output_len: int, latencies: list[float], before, after) -> dict[str, Any]:
    values = np.array(latencies)
    result = {
        "batch_size": batch_size,
        "avg_latency_s": float(values.mean()),
        "percentiles_s": {str(p): float(np.percentile(values, p)) for p in PERCENTILES},
        "output_tokens_per_s": batch_size * output_len / float(values.mean()),
        "latencies_s": latencies,
    }
    if after is not None:
        drafts = after.num_drafts - (before.num_drafts if before is not None else 0)
        draft_tokens = after.num_draft_tokens - (before.num_draft_tokens if before is not None else 0)
        accepted = after.num_accepted_tokens - (before.num_accepted_tokens if before is not None else 0)
        result["spec_decode"] = {
            "num_drafts": drafts, "num_draft_tokens": draft_tokens, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else 1.0,
        }
    return result


def format_table(report: dict[str, Any]) -> str:
    spec = report["speculative_config"]
    lines = [f"latency: {report['model']} on {report['device_name'] or report['device']}, input {report['input_len']}, "
             f"output {report['output_len']} tokens{', prompt echo' if report['prompt_echo'] else ''}"
             f"{', speculative ' + (spec if isinstance(spec, str) else json.dumps(spec)) if spec else ''}",
             f"{'batch':>6} {'avg s':>9} " + " ".join(f"{'p' + str(p):>8}" for p in PERCENTILES)
             + f" {'tok/s':>9} {'accept':>7} {'mean len':>8}"]
    for r in report["results"]:
        spec_result = r.get("spec_decode")
        accept = f"{100 * spec_result['acceptance_rate']:6.1f}%" if spec_result else f"{'-':>7}"
        mean_len = f"{spec_result['mean_acceptance_length']:8.2f}" if spec_result else f"{'-':>8}"
        lines.append(f"{r['batch_size']:>6} {r['avg_latency_s']:9.4f} "
                     + " ".join(f"{r['percentiles_s'][str(p)]:8.4f}" for p in PERCENTILES)
                     + f" {r['output_tokens_per_s']:9.1f} {accept} {mean_len}")
    return "\n".join(lines)

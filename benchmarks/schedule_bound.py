"""Step-level lower bound of an offline workload on L8 with the H100 constants (sluice/bench/schedule_bound.py).

    python benchmarks/schedule_bound.py [--workload W1] [--num-prompts N] [--hbm-tbps 3.0] [--peak-tflops 800]
                                        [--out bound.json]

Simulates the schedule of every (order, max_num_seqs, max_num_batched_tokens) of the grid once, bounds it with
both time models, prints a table (seconds per step kind on the right) and writes the results as JSON. CPU only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sluice.bench.cli import git_commit  # noqa: E402
from sluice.bench.schedule_bound import (  # noqa: E402
    ORDERS, TIME_MODELS, ScheduleBound, bound_grid, l8_shape, step_kinds, workload_lengths,
)

DEFAULT_LIMITS = ((1024, 16384), (256, 8192), (224, 8192), (128, 8192))  # (max_num_seqs, max_num_batched_tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="W1", choices=("W1", "W2", "W3"))
    parser.add_argument("--num-prompts", type=int, default=None, help="default: the workload's own count")
    parser.add_argument("--hbm-tbps", type=float, default=3.0, help="HBM bandwidth, TB/s (H100 copy: 3.0)")
    parser.add_argument("--peak-tflops", type=float, default=800.0, help="bf16 matmul peak, TFLOP/s (H100: 800)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def format_table(results: list[ScheduleBound]) -> str:
    kinds = [kind for kind in step_kinds() if any(r.breakdown[kind]["steps"] for r in results)]
    header = (f"{'order':<21} {'seqs':>5} {'budget':>6} {'model':<10} {'steps':>6} {'total_s':>8} "
              f"{'out_tok/s':>9} {'tot_tok/s':>9} {'chain_s':>7} | seconds: " + " ".join(f"{k:>16}" for k in kinds))
    lines = [header, "-" * len(header)]
    for r in results:
        seconds = " ".join(f"{r.breakdown[k]['seconds']:>9.2f} ({r.breakdown[k]['steps']:>4})" for k in kinds)
        lines.append(f"{r.order:<21} {r.max_num_seqs:>5} {r.max_num_batched_tokens:>6} {r.time_model:<10} "
                     f"{r.steps:>6} {r.total_s:>8.2f} {r.output_tokens_per_s:>9.0f} {r.total_tokens_per_s:>9.0f} "
                     f"{r.chain_bound_s:>7.2f} |          {seconds}")
    lines.append("(n) = steps of that kind; longest_output_first is an oracle that knows output lengths")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hbm_bytes_per_s, peak_flops = args.hbm_tbps * 1e12, args.peak_tflops * 1e12
    shape = l8_shape()
    lengths = workload_lengths(args.workload, args.num_prompts, shape.vocab_size)
    results = bound_grid(shape, lengths, ORDERS, DEFAULT_LIMITS, TIME_MODELS, hbm_bytes_per_s, peak_flops)
    print(f"{args.workload}, {len(lengths)} requests, L8, HBM {args.hbm_tbps} TB/s, peak {args.peak_tflops} TFLOP/s")
    print(format_table(results))
    if args.out:
        report = {
            "workload": args.workload, "model": "L8", "device": "model: H100 constants",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sluice_commit": git_commit(), "num_prompts": len(lengths),
            "hbm_bytes_per_s": hbm_bytes_per_s, "peak_flops": peak_flops,
            "results": [r.to_dict() for r in results],
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

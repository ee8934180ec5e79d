"""Where an offline run's time goes, step by step (W1..W4 of BENCHMARKS.md on L8).

    python benchmarks/step_profile.py --out w1_steps.json [--workload W1] [--num-prompts 1000] [engine flags]

Runs the workload through ``LLMEngine.step()`` and records, for every step, the wall time
and what the scheduler put in it (decode tokens, prefill tokens, requests). With async
scheduling a step's wall time is the GPU time of the step it waited for whenever the host
keeps up, so grouping steps by kind and batch size shows which part of the run is far from
its roofline: the prefill-heavy start, the big decode batches, or the long tail of a few
requests, where each step still reads all 16 GB of weights (5.35 ms at 3 TB/s).

It also lists every Triton kernel compiled (or loaded from Triton's disk cache) while the
workload runs, with the step it stalled and its seconds: a kernel variant that start-up did not
build stops the whole batch the first time a step needs it. Point ``TRITON_CACHE_DIR`` at an empty
folder to see what a first run on a machine pays.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sluice import SamplingParams  # noqa: E402
from sluice.bench.cli import device_name, git_commit, write_l8_config  # noqa: E402
from sluice.bench.compile_log import CompileLog  # noqa: E402
from sluice.bench.datasets import generate_workload  # noqa: E402
from sluice.config import EngineArgs  # noqa: E402
from sluice.engine.llm_engine import LLMEngine  # noqa: E402

BUCKETS = [(1, 8), (9, 32), (33, 128), (129, 256), (257, 512), (513, 1024)]


def run(args: argparse.Namespace, engine_args: EngineArgs, compiles: CompileLog) -> list[dict]:
    engine = LLMEngine.from_engine_args(engine_args)
    requests = generate_workload(args.workload, engine.core.model_config.hf_config.vocab_size, args.num_prompts,
                                 max_model_len=engine.core.model_config.max_model_len)
    for i, req in enumerate(requests):
        params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=req.output_len, ignore_eos=True,
                                detokenize=False)
        engine.add_request(str(i), {"prompt_token_ids": req.prompt_token_ids}, params)
    scheduler = engine.core.scheduler
    original = scheduler.schedule
    records: list[dict] = []

    def schedule():
        out = original()
        num_decode = sum(1 for n in out.num_scheduled_tokens.values() if n == 1)
        records.append({"tokens": out.total_num_scheduled_tokens, "reqs": len(out.num_scheduled_tokens),
                        "decode_reqs": num_decode, "prefill_tokens": out.total_num_scheduled_tokens - num_decode})
        return out

    scheduler.schedule = schedule
    start = time.perf_counter()
    last = start
    while engine.has_unfinished_requests():
        compiles.step = len(records)
        engine.step()
        now = time.perf_counter()
        records[-1]["wall_ms"] = 1e3 * (now - last)  # this call: launch of this step + wait for the previous one
        last = now
    print(f"{len(requests)} requests, {len(records)} steps, {time.perf_counter() - start:.2f} s")
    return records


def summarize(records: list[dict]) -> dict:
    summary = {}
    mixed = [r for r in records if r["prefill_tokens"] > 0]
    summary["prefill_or_mixed"] = _group(mixed)
    for lo, hi in BUCKETS:
        group = [r for r in records if r["prefill_tokens"] == 0 and lo <= r["reqs"] <= hi]
        summary[f"decode_{lo}_{hi}"] = _group(group)
    summary["total_s"] = sum(r.get("wall_ms", 0.0) for r in records) / 1e3
    return summary


def _group(records: list[dict]) -> dict:
    walls = [r.get("wall_ms", 0.0) for r in records]
    return {"steps": len(records), "total_s": sum(walls) / 1e3,
            "ms_per_step_median": float(np.median(walls)) if walls else None,
            "tokens_per_step_mean": float(np.mean([r["tokens"] for r in records])) if records else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workload", default="W1")
    parser.add_argument("--num-prompts", type=int, default=None)
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args()
    engine_args = EngineArgs.from_cli_args(args)
    engine_args.model = write_l8_config(tempfile.mkdtemp(prefix="sluice-steps-"))
    engine_args.load_format, engine_args.dtype = "dummy", "bfloat16"
    with CompileLog() as compiles:
        records = run(args, engine_args, compiles)
    summary = summarize(records)
    during_run = compiles.during_run
    summary["compiles_at_startup"] = CompileLog.totals([e for e in compiles.events if e["step"] < 0])
    summary["compiles_during_run"] = CompileLog.totals(during_run)
    with open(args.out, "w") as f:
        json.dump({"workload": args.workload, "model": "L8", "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
                   "sluice_commit": git_commit(), "date": datetime.date.today().isoformat(),
                   "summary": summary, "compiles": compiles.events, "steps": records}, f)
    for name, group in summary.items():
        print(name, group)
    for event in during_run:
        print(f"compile at step {event['step']}: {event['kernel']} {event['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

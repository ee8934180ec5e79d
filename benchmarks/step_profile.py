"""Where an offline run's time goes, step by step (W1..W4 of docs/benchmarks.md on L8).

    python benchmarks/step_profile.py --out w1_steps.json [--workload W1] [--num-prompts 1000] [engine flags]

Runs the workload through ``LLMEngine.step()`` and records, for every step, the wall time
and what the scheduler put in it (decode tokens, prefill tokens, requests). With async
scheduling a step's wall time is the GPU time of the step it waited for whenever the host
keeps up, so grouping steps by kind and batch size shows which part of the run is far from
its roofline: the prefill-heavy start, the big decode batches, or the long tail of a few
requests, where each step still reads all 16 GB of weights (5.35 ms at 3 TB/s).

Each step also gets its GPU time, from CUDA events recorded on the stream after each launch (exact
attribution, unlike the wall time, which with async scheduling can absorb a neighbour's GPU time),
and its step-level lower bound (``sluice/bench/schedule_bound.py``'s serial model, from the tokens
and contexts the scheduler actually put in it), so each kind of step shows how close it runs to
its bound. ``--profile-steps 0:13 900:910`` adds torch.profiler's top kernels for those step ranges, and each
range's kernel time against its wall time per step (``idle_fraction``: the GPU's idle share, at most; W7 with
``--structured-fraction 1`` gives it for constrained decoding). Steps with nothing scheduled are "empty".

It also logs Python's garbage collections by step (``gc_during_run``): LLM.generate steps with the
start-up heap frozen (``sluice/engine/gc_heap.py``); ``--no-freeze`` shows what a full collection of
that heap costs.

It also lists every Triton kernel compiled (or loaded from Triton's disk cache) while the
workload runs, with the step it stalled and its seconds: a kernel variant that start-up did not
build stops the whole batch the first time a step needs it. Point ``TRITON_CACHE_DIR`` at an empty
folder to see what a first run on a machine pays.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sluice.bench.cli import device_name, git_commit, write_l8_config  # noqa: E402
from sluice.bench.compile_log import CompileLog  # noqa: E402
from sluice.bench.profiling import GcLog, device_kernel_times  # noqa: E402
from sluice.bench.datasets import generate_workload  # noqa: E402
from sluice.bench.schedule_bound import l8_shape, scheduled_step_work, step_kinds, step_seconds  # noqa: E402
from sluice.config import EngineArgs  # noqa: E402
from sluice.engine.gc_heap import frozen_heap  # noqa: E402
from sluice.engine.llm_engine import LLMEngine  # noqa: E402
from sluice.bench.throughput import sampling_params_for  # noqa: E402
from tests.tiny_models import build_tokenizer  # noqa: E402

def run(args: argparse.Namespace, engine_args: EngineArgs, compiles: CompileLog,
        gc_log: GcLog) -> tuple[list[dict], list[dict]]:
    engine = LLMEngine.from_engine_args(engine_args)
    requests = generate_workload(args.workload, engine.model_config.vocab_size, args.num_prompts,
                                 max_model_len=engine.max_model_len, structured_fraction=args.structured_fraction)
    for i, (req, params) in enumerate(zip(requests, sampling_params_for(requests, detokenize=False))):
        engine.add_request(str(i), {"prompt_token_ids": req.prompt_token_ids}, params)
    scheduler = engine.core.scheduler
    original = scheduler.schedule
    records: list[dict] = []
    shape = l8_shape()

    def schedule():
        out = original()
        if not out.total_num_scheduled_tokens:  # nothing to run (the queue waits on a grammar, or drains)
            records.append({"kind": "empty", "tokens": 0, "reqs": 0, "decode_reqs": 0, "prefill_tokens": 0,
                            "kv_tokens": 0, "bound_ms": 0.0})
            return out
        work = scheduled_step_work(scheduler.requests, out.num_scheduled_tokens)
        records.append({"kind": work.kind, "tokens": out.total_num_scheduled_tokens,
                        "reqs": len(out.num_scheduled_tokens), "decode_reqs": work.num_decode_tokens, "prefill_tokens": work.num_prefill_tokens,
                        "kv_tokens": work.kv_tokens, "bound_ms": 1e3 * step_seconds(shape, work, "serial")})
        return out

    scheduler.schedule = schedule
    use_cuda = torch.cuda.is_available()
    events = []  # (number of steps launched so far, event recorded after them on the stream)
    if use_cuda:
        events.append((0, torch.cuda.Event(enable_timing=True)))
        events[0][1].record()
    windows = [tuple(int(x) for x in spec.split(":")) for spec in args.profile_steps]
    kernels: list[dict] = []
    profiled: set[int] = set()  # steps whose times the profiler distorts: left out of the summary
    profiler = None
    start = time.perf_counter()
    last = start
    heap = contextlib.nullcontext() if args.no_freeze else frozen_heap()  # as LLM.generate runs its steps
    with heap:
        while engine.has_unfinished_requests():
            compiles.step = gc_log.step = len(records)
            for lo, hi in windows:
                if profiler is None and len(records) == lo:
                    from torch.profiler import ProfilerActivity, profile
                    profiler = profile(activities=[ProfilerActivity.CUDA])
                    profiler.__enter__()
                    window = (lo, hi)
            engine.step()
            now = time.perf_counter()
            records[-1]["wall_ms"] = 1e3 * (now - last)  # this call: launch of this step + wait for the previous one
            last = now
            if use_cuda and events[-1][0] < len(records):  # a call that launched a step
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                events.append((len(records), event))
            if profiler is not None and len(records) >= window[1]:
                torch.cuda.synchronize()
                profiler.__exit__(None, None, None)
                n, in_window = window[1] - window[0], records[window[0]:window[1]]
                busy_ms, table = device_kernel_times(profiler, n)
                wall_ms = sum(r.get("wall_ms", 0.0) for r in in_window) / n
                # GPU idle per step: the share of a step's wall time with no kernel or copy on the device (the
                # profiler's own host overhead counts as idle, so this is an upper bound)
                kernels.append({"steps": list(window), "busy_ms_per_step": busy_ms, "wall_ms_per_step": wall_ms,
                                "idle_fraction": max(0.0, 1.0 - busy_ms / wall_ms) if wall_ms else None,
                                "reqs_per_step": sum(r["reqs"] for r in in_window) / n,
                                "top_kernels": table})
                profiler = None
                profiled.update(range(window[0], window[1] + 1))  # + the step launched after the drain
    if use_cuda:
        torch.cuda.synchronize()
        # The event after the call that launched step k completes when step k's work does (one stream).
        for (_, prev), (launched, event) in zip(events, events[1:]):
            records[launched - 1]["gpu_ms"] = prev.elapsed_time(event)
    for i in profiled:
        if i < len(records):
            records[i]["profiled"] = True
    print(f"{len(requests)} requests, {len(records)} steps, {time.perf_counter() - start:.2f} s")
    return records, kernels


def summarize(all_records: list[dict]) -> dict:
    """Totals per kind of step (steps run under the profiler left out)."""
    records = [r for r in all_records if not r.get("profiled")]
    summary = {kind: _group([r for r in records if r["kind"] == kind]) for kind in step_kinds()}
    summary["steps_left_out"] = sum(1 for r in all_records if r.get("profiled"))
    summary["empty_steps"] = sum(1 for r in records if r["kind"] == "empty")
    summary["total_s"] = sum(r.get("wall_ms", 0.0) for r in records) / 1e3
    summary["gpu_s"] = sum(r.get("gpu_ms", 0.0) for r in records) / 1e3
    summary["bound_s"] = sum(r["bound_ms"] for r in records) / 1e3
    return summary


def _group(records: list[dict]) -> dict:
    walls = [r.get("wall_ms", 0.0) for r in records]
    gpu_s = sum(r.get("gpu_ms", 0.0) for r in records) / 1e3
    bound_s = sum(r["bound_ms"] for r in records) / 1e3
    return {"steps": len(records), "total_s": sum(walls) / 1e3, "gpu_s": gpu_s, "bound_s": bound_s,
            "bound_fraction": bound_s / gpu_s if gpu_s else None,
            "ms_per_step_median": float(np.median(walls)) if walls else None,
            "tokens_per_step_mean": float(np.mean([r["tokens"] for r in records])) if records else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workload", default="W1")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--structured-fraction", type=float, default=None,
                        help="constrain this fraction of the requests with a JSON schema (W7: all by default)")
    parser.add_argument("--profile-steps", nargs="*", default=[], metavar="START:END",
                        help="step ranges to run under torch.profiler (top kernels per step in the JSON)")
    parser.add_argument("--no-freeze", action="store_true",
                        help="step without freezing the start-up heap (LLM.generate freezes it; for comparison)")
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args()
    engine_args = EngineArgs.from_cli_args(args)
    engine_args.model = write_l8_config(tempfile.mkdtemp(prefix="sluice-steps-"))
    build_tokenizer().save_pretrained(engine_args.model)  # the small test tokenizer: prompts are token ids
    engine_args.load_format, engine_args.dtype = "dummy", "bfloat16"
    with CompileLog() as compiles, GcLog() as gc_log:
        records, kernels = run(args, engine_args, compiles, gc_log)
    summary = summarize(records)
    summary["gc_during_run"] = gc_log.totals()
    during_run = compiles.during_run
    summary["compiles_at_startup"] = CompileLog.totals([e for e in compiles.events if e["step"] < 0])
    summary["compiles_during_run"] = CompileLog.totals(during_run)
    with open(args.out, "w") as f:
        json.dump({"workload": args.workload, "model": "L8", "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
                   "sluice_commit": git_commit(), "date": datetime.date.today().isoformat(),
                   "summary": summary, "compiles": compiles.events, "kernels": kernels, "gc": gc_log.events, "steps": records}, f)
    for name, group in summary.items():
        print(name, group)
    for window in kernels:
        print(f"steps {window['steps'][0]}-{window['steps'][1]}: {window['reqs_per_step']:.0f} requests a step, "
              f"kernels {window['busy_ms_per_step']:.2f} ms of {window['wall_ms_per_step']:.2f} ms a step "
              f"(idle at most {window['idle_fraction']:.1%})")
    for event in during_run:
        print(f"compile at step {event['step']}: {event['kernel']} {event['seconds']:.2f} s")
    for event in gc_log.events:
        if event["generation"] == 2:
            print(f"full collection at step {event['step']}: {event['seconds']:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

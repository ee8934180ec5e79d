"""W6 (docs/benchmarks.md): how long the GPU idles in a decode step of 256 running L8 requests.

    python benchmarks/step_overhead.py --out w6.json [--num-reqs 256] [--context 1024] [--steps 30]

Builds L8 as a config-only folder (dummy bf16 weights on the GPU, a tiny tokenizer: prompts
are token ids and nothing is detokenized), prefills ``--num-reqs`` prompts of ``--context``
tokens, then times decode steps: wall time per ``LLMEngine.step()`` (host clock; every step
ends by reading the sampled ids, so the GPU work is done), and GPU busy time per step (sum of
kernel and copy times under torch.profiler, taken on separate steps so that the profiler's host
overhead does not inflate the wall time, with the 25 kernels that took the most of it). GPU idle
fraction = 1 - busy / wall. Runs once with the decode CUDA graphs and once with them released
(eager), and splits the host time into the model runner's ``launch`` / ``collect`` and the rest
(scheduler, output processing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sluice import LLM, SamplingParams  # noqa: E402
from sluice.bench.cli import git_commit, write_l8_config  # noqa: E402
from sluice.bench.profiling import device_kernel_times  # noqa: E402


def build_llm(folder: str, args: argparse.Namespace) -> LLM:
    from tests.tiny_models import build_tokenizer

    build_tokenizer().save_pretrained(folder)  # only for the engine's start-up: nothing is detokenized
    return LLM(model=folder, tokenizer=folder, load_format="dummy", dtype="bfloat16", device="cuda",
               max_model_len=args.max_model_len, max_num_seqs=args.num_reqs,
               max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=0.9)


def fill_with_decodes(llm: LLM, args: argparse.Namespace) -> None:
    """Adds the requests and steps until every one of them has its prompt computed."""
    engine = llm.llm_engine
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.max_model_len - args.context,
                            ignore_eos=True, detokenize=False)
    for i in range(args.num_reqs):
        prompt = rng.integers(0, 128256, args.context).tolist()
        engine.add_request(f"w6-{i}", {"prompt_token_ids": prompt}, params)
    scheduler = engine.core.scheduler
    while scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        engine.step()
    for _ in range(5):  # warm-up decode steps
        engine.step()


def time_steps(llm: LLM, num_steps: int) -> dict[str, float]:
    """Wall time per step, and how much of it the runner's launch() and collect() took.

    With async scheduling (the default on CUDA) a step() launches step t+1 before it waits for
    step t, so the host's work overlaps the GPU's and the wall time is the GPU time whenever the
    host keeps up; collect() then holds the time the host waited for the GPU.
    """
    engine = llm.llm_engine
    runner = engine.core.runner
    timers = {"execute": 0.0, "launch": 0.0, "collect": 0.0}
    originals = {name: getattr(runner, name) for name in timers}

    def timed(name):
        def call(*a):
            start = time.perf_counter()
            try:
                return originals[name](*a)
            finally:
                timers[name] += time.perf_counter() - start
        return call

    for name in timers:
        setattr(runner, name, timed(name))
    walls = []
    try:
        for _ in range(num_steps):
            start = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - start)
    finally:
        for name in timers:
            delattr(runner, name)
    in_runner = timers["launch"] + timers["collect"] + timers["execute"]
    return {"step_ms_median": 1e3 * float(np.median(walls)), "step_ms_mean": 1e3 * float(np.mean(walls)),
            "async_scheduling": engine.config.scheduler.async_scheduling,
            "runner_launch_ms_mean": 1e3 * (timers["launch"] + timers["execute"]) / num_steps,
            "runner_collect_wait_ms_mean": 1e3 * timers["collect"] / num_steps,
            "host_outside_runner_ms_mean": 1e3 * (sum(walls) - in_runner) / num_steps}


def gpu_busy_per_step(llm: LLM, num_steps: int) -> tuple[float, list[dict[str, Any]]]:
    """Milliseconds of kernels and copies per step, from torch.profiler's device activity, and the
    kernels that took the most of it (microseconds and launches per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            llm.llm_engine.step()
        torch.cuda.synchronize()
    return device_kernel_times(prof, num_steps)


def graph_forward_ms(llm: LLM, repeats: int = 20) -> float | None:
    """Back-to-back replays of the largest decode graph (the forward alone, no host gaps), per replay."""
    graphs = llm.llm_engine.core.runner.decode_graphs
    if graphs is None:
        return None
    bucket = graphs.sizes[-1]
    graphs.run(bucket)  # replays over the last step's inputs: rewrites the same KV slots, harmless
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graphs.run(bucket)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def measure(llm: LLM, args: argparse.Namespace) -> dict[str, float]:
    result = time_steps(llm, args.steps)
    result["gpu_busy_ms_per_step"], result["top_kernels"] = gpu_busy_per_step(llm, args.profile_steps)
    result["gpu_idle_fraction"] = 1.0 - result["gpu_busy_ms_per_step"] / result["step_ms_median"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-reqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--profile-steps", type=int, default=10)
    args = parser.parse_args()

    folder = write_l8_config(tempfile.mkdtemp(prefix="sluice-w6-"))
    start = time.perf_counter()
    llm = build_llm(folder, args)
    runner = llm.llm_engine.core.runner
    graphs = runner.decode_graphs
    report: dict[str, Any] = {
        "workload": "W6", "model": "L8", "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(), "sluice_commit": git_commit(),
        "num_reqs": args.num_reqs, "context": args.context, "startup_s": time.perf_counter() - start,
        "num_cuda_graphs": graphs.num_graphs if graphs is not None else 0,
        "graph_capture_s": graphs.capture_seconds if graphs is not None else None,
        "num_kv_blocks": llm.llm_engine.config.cache.num_blocks,
    }
    fill_with_decodes(llm, args)
    report["cuda_graphs"] = measure(llm, args)
    report["cuda_graphs"]["graph_forward_ms"] = graph_forward_ms(llm)
    runner.release_cuda_graphs()
    for _ in range(3):  # eager warm-up (cuBLAS heuristics for these shapes)
        llm.llm_engine.step()
    report["eager"] = measure(llm, args)
    report["context_at_end"] = int(np.mean([r.num_tokens for r in llm.llm_engine.core.scheduler.running]))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    for mode in ("cuda_graphs", "eager"):
        r = report[mode]
        print(f"{mode:12s} step {r['step_ms_median']:.2f} ms  GPU busy {r['gpu_busy_ms_per_step']:.2f} ms  "
              f"idle {100 * r['gpu_idle_fraction']:.1f}%  runner launch {r['runner_launch_ms_mean']:.2f} ms  "
              f"collect (waiting) {r['runner_collect_wait_ms_mean']:.2f} ms  "
              f"host outside runner {r['host_outside_runner_ms_mean']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

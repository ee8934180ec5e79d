"""The engine's torch thread count on a busy CPU: offline LLM.generate with the default model, per setting.

    python benchmarks/cpu_contention.py [--out benchmarks/results/<date>_CPU_cpu_contention_<commit>.json]

For each thread setting (the default: --cpu-threads unset, which is the physical core count; 1; every logical
CPU) a fresh process loads the embedded default model, warms up, and times the same generate call twice: on a
quiet machine, and with one busy-looping process per logical CPU beside it (what an API server tokenizing,
another model or a build does to the cores). Reports the wall time and output tokens per second of each.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUSY_LOOP = "while True: pass"


def measure(cpu_threads: int | None, num_prompts: int, max_tokens: int) -> dict:
    """Runs in the child: quiet and contended timings of one generate call."""
    import torch

    from sluice import LLM, SamplingParams
    llm = LLM(cpu_threads=cpu_threads)
    prompts = [f"Tell me a story about the number {i}." for i in range(num_prompts)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up

    def timed() -> dict:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return {"seconds": round(seconds, 3), "output_tokens_per_s": round(tokens / seconds, 1)}

    result = {"torch_threads": torch.get_num_threads(), "quiet": timed()}
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        result["contended"] = timed()
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a thread setting, in the child
    args = parser.parse_args()
    if args.child is not None:
        threads = None if args.child == "default" else int(args.child)
        print(json.dumps(measure(threads, args.num_prompts, args.max_tokens)))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = args.out or REPO_ROOT / "benchmarks" / "results" / \
        f"{datetime.date.today().isoformat()}_CPU_cpu_contention_{commit}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("SLUICE_CPU_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    settings = {}
    for setting in ("default", "1", str(os.cpu_count() or 1)):
        child = subprocess.run([sys.executable, __file__, "--child", setting, "--num-prompts", str(args.num_prompts),
                                "--max-tokens", str(args.max_tokens)], env=env, capture_output=True, text=True,
                               check=True)
        settings[setting] = json.loads(child.stdout.strip().splitlines()[-1])
        print(setting, settings[setting], flush=True)
    result = {"commit": commit, "logical_cpus": os.cpu_count(), "model": "default (SmolLM2-135M-Instruct Q4_1)",
              "workload": {"num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                           "busy_processes": os.cpu_count()}, "settings": settings}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()

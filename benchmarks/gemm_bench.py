"""Times the matmuls of small L8 decode steps (cuBLAS through F.linear) against the weight-read floor.

    python benchmarks/gemm_bench.py --out gemm.json

A decode step of a few requests multiplies a handful of rows by every weight, so its matmuls can be
no faster than reading the weights from HBM. For each L8 projection (qkv, o, gate_up, down,
lm_head) and rows M it times one call the way a decode step runs it: replayed from a CUDA graph,
with the weight cold in L2. Each timed graph calls the op on enough distinct copies of the weight
(at least 256 MB in all) that no copy is still in the 50 MB L2 when its turn comes again. It
reports microseconds per call and the weight bytes read per second against the 3.0 TB/s copy
bandwidth, and adds the ops up over one forward (32 layers plus the LM head).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sluice.bench.cli import git_commit  # noqa: E402

HBM_COPY_TBPS = 3.0
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
PER_FORWARD = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}
ROWS = [1, 2, 4, 8, 16, 24, 32, 48, 64]
DTYPE = torch.bfloat16


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    count = max(2, -(-(256 << 20) // (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=DTYPE) / k ** 0.5 for _ in range(count)]


def time_per_call(fn, x: torch.Tensor, weights: list[torch.Tensor], replays: int = 20) -> float:
    """Microseconds per call of fn(x, w), each call on the next weight copy, from a CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in weights:  # compile and warm up outside the capture
            fn(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for w in weights:
            fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * len(weights))


def row_sweep(results: list[dict]) -> None:
    for (name, (n, k)), m in itertools.product(SHAPES.items(), ROWS):
        weights = weight_copies(n, k)
        x = torch.randn(m, k, device="cuda", dtype=DTYPE)
        us = time_per_call(F.linear, x, weights)
        tbps = n * k * 2 / us / 1e6
        results.append(dict(op=name, m=m, n=n, k=k, us=us, weight_tbps=tbps, fraction_of_copy=tbps / HBM_COPY_TBPS))
        print(f"{name:8s} M={m:3d} {us:8.1f} us  {tbps:.2f} TB/s ({100 * tbps / HBM_COPY_TBPS:.0f}% of copy)", flush=True)
        del weights


def per_forward(results: list[dict]) -> list[dict]:
    """Matmul time of one forward (32 layers and the LM head) per M, against its weight-read floor."""
    floor_ms = sum(n * k * 2 * PER_FORWARD[name] for name, (n, k) in SHAPES.items()) / (HBM_COPY_TBPS * 1e9)
    totals = []
    for m in ROWS:
        ms = sum(r["us"] * PER_FORWARD[r["op"]] for r in results if r["m"] == m) / 1000
        totals.append(dict(m=m, matmul_ms=ms, weight_floor_ms=floor_ms, fraction_of_floor=floor_ms / ms))
        print(f"forward matmuls M={m:3d}: {ms:.3f} ms (floor {floor_ms:.3f} ms, {100 * floor_ms / ms:.0f}%)")
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results: list[dict] = []
    report = dict(benchmark="gemm", model="L8", dtype="bfloat16", device=torch.cuda.get_device_name(),
                  torch=torch.__version__, sluice_commit=git_commit(), date=datetime.date.today().isoformat(),
                  reference_hbm_tbps=HBM_COPY_TBPS, results=results)
    try:
        row_sweep(results)
        report["per_forward"] = per_forward(results)
    finally:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

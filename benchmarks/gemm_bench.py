"""Times the matmuls of small L8 decode steps: cuBLAS (F.linear) against the skinny Triton kernel.

    python benchmarks/gemm_bench.py --out gemm.json [--sweep]

For each L8 projection (qkv, o, gate_up, down, lm_head) and rows M it times one call the way a
decode step runs it: replayed from a CUDA graph, with the weight cold in L2. Each timed graph calls
the op on enough distinct copies of the weight (at least 256 MB in all) that no copy is still in
the 50 MB L2 when its turn comes again. It reports microseconds per call and the weight bytes read
per second, and adds the ops up over one forward (32 layers plus the LM head). ``--sweep`` also
times a grid of tile configs at M = 1 and 16 per shape, to choose ``skinny_gemm.choose_config``.
Each skinny result is checked against F.linear first.
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
from sluice.layers import skinny_gemm  # noqa: E402

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


def check(x: torch.Tensor, w: torch.Tensor, config=None) -> float:
    expected = F.linear(x.float(), w.float())
    return (skinny_gemm.skinny_linear(x, w, config=config).float() - expected).abs().max().item()


def row_sweep(results: list[dict]) -> None:
    for (name, (n, k)), m in itertools.product(SHAPES.items(), ROWS):
        weights = weight_copies(n, k)
        x = torch.randn(m, k, device="cuda", dtype=DTYPE)
        cublas_us = time_per_call(F.linear, x, weights)
        config = skinny_gemm.choose_config(m, n, k)
        skinny_us = time_per_call(lambda a, b: skinny_gemm.skinny_linear(a, b, config=config), x, weights)
        gb = n * k * 2 / 1e9
        results.append(dict(kind="rows", op=name, m=m, n=n, k=k, cublas_us=cublas_us, skinny_us=skinny_us,
                            cublas_tbps=gb / cublas_us * 1e3, skinny_tbps=gb / skinny_us * 1e3,
                            config=config._asdict(), max_abs_diff=check(x, weights[0], config)))
        print(f"{name:8s} M={m:3d} cublas {cublas_us:8.1f} us ({results[-1]['cublas_tbps']:.2f} TB/s)  "
              f"skinny {skinny_us:8.1f} us ({results[-1]['skinny_tbps']:.2f} TB/s)", flush=True)
        del weights


def config_sweep(results: list[dict]) -> None:
    grid = list(itertools.product([16, 32, 64], [128, 256, 512], [4, 8], [3, 4, 6]))
    for name, (n, k) in SHAPES.items():
        weights = weight_copies(n, k)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            best = None
            for block_n, block_k, warps, stages in grid:
                config = skinny_gemm.SkinnyConfig(16, block_n, block_k, warps, stages)
                try:
                    us = time_per_call(lambda a, b: skinny_gemm.skinny_linear(a, b, config=config), x, weights,
                                       replays=10)
                    err = check(x, weights[0], config)
                except Exception as exc:  # a config the compiler rejects (shared memory) is skipped
                    results.append(dict(kind="config", op=name, m=m, config=config._asdict(), error=repr(exc)[:200]))
                    continue
                results.append(dict(kind="config", op=name, m=m, config=config._asdict(), us=us,
                                    tbps=n * k * 2 / us / 1e6, max_abs_diff=err))
                if best is None or us < best[0]:
                    best = (us, config)
            print(f"{name:8s} M={m:3d} best {best[0]:.1f} us {best[1]}", flush=True)
        del weights


def per_forward(results: list[dict]) -> list[dict]:
    totals = []
    for m in ROWS:
        rows = [r for r in results if r["kind"] == "rows" and r["m"] == m]
        cublas = sum(r["cublas_us"] * PER_FORWARD[r["op"]] for r in rows) / 1000
        skinny = sum(r["skinny_us"] * PER_FORWARD[r["op"]] for r in rows) / 1000
        best = sum(min(r["cublas_us"], r["skinny_us"]) * PER_FORWARD[r["op"]] for r in rows) / 1000
        totals.append(dict(m=m, cublas_ms=cublas, skinny_ms=skinny, best_ms=best))
        print(f"forward matmuls M={m:3d}: cublas {cublas:.3f} ms, skinny {skinny:.3f} ms, best of both {best:.3f} ms")
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tile configs")
    args = parser.parse_args()
    results: list[dict] = []
    report = dict(benchmark="gemm", model="L8", dtype="bfloat16", device=torch.cuda.get_device_name(),
                  torch=torch.__version__, sluice_commit=git_commit(), date=datetime.date.today().isoformat(),
                  reference_hbm_tbps=HBM_COPY_TBPS, results=results)
    try:
        row_sweep(results)
        report["per_forward"] = per_forward(results)
        if args.sweep:
            config_sweep(results)
    finally:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

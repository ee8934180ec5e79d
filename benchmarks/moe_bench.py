"""Times the decode MoE layer of the Q30A3 shape (Qwen3-30B-A3B) on the GPU against its HBM roofline.

    python benchmarks/moe_bench.py [--num-tokens 1 32 256] [--no-sweep] [--out FILE]

One layer: hidden 2048, 128 experts of width 768, 8 per token, renormalized, bf16, routed by a random
router (about uniform, as trained routers are on average). For each token count T (the running
requests of a decode step) it checks the fused kernels against the torch reference, then times, with
triton.testing.do_bench_cudagraph (replayed from a CUDA graph, as decode steps run):

    experts      fused_moe.fused_experts with the default tile config (and each config of the sweep)
    layer        the whole SparseMoeBlock: router matmul, softmax / top-k / renormalize, experts

The roofline of a step is the bytes it must read at 3.0 TB/s (docs/benchmarks.md's measured H100 copy):
the weights of the experts the step's tokens actually hit (3 x 2048 x 768 x 2 bytes each) plus the
router and the activations. ``fraction`` = roofline time / measured time (target: >= 0.6 at T = 256).
Results are written after each token count, so a failure part way keeps what was measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import traceback
from pathlib import Path

import torch
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sluice.bench.cli import git_commit  # noqa: E402
from sluice.layers import fused_moe  # noqa: E402
from sluice.layers.moe import SparseMoeBlock, experts_torch, select_experts  # noqa: E402

HBM_BYTES_PER_S = 3.0e12
Q30A3 = dict(hidden=2048, num_experts=128, top_k=8, intermediate=768, num_layers=48)
DTYPE, DEVICE = torch.bfloat16, "cuda"
C = fused_moe.MoEKernelConfig
SWEEP = [C(16, 32, 128, 4, 4), C(16, 64, 128, 4, 4), C(16, 64, 256, 4, 3), C(16, 64, 64, 4, 5),
         C(16, 128, 128, 4, 3), C(16, 128, 64, 4, 4), C(32, 64, 128, 4, 4), C(32, 128, 64, 4, 4),
         C(32, 128, 128, 8, 3), C(64, 64, 64, 4, 4), C(64, 128, 64, 8, 4), C(64, 128, 128, 8, 3)]


def make_layer(seed: int = 0) -> SparseMoeBlock:
    hidden, intermediate = Q30A3["hidden"], Q30A3["intermediate"]
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        layer = SparseMoeBlock(hidden, Q30A3["num_experts"], Q30A3["top_k"], intermediate, renormalize=True,
                               round_weights_to_dtype=True)
    with torch.no_grad():
        layer.gate.weight.normal_(0.0, hidden ** -0.5)
        layer.experts.w13_weight.normal_(0.0, hidden ** -0.5)
        layer.experts.w2_weight.normal_(0.0, intermediate ** -0.5)
    return layer.to(DTYPE).eval()


def step_bytes(layer: SparseMoeBlock, topk_ids: torch.Tensor, num_tokens: int) -> dict[str, int]:
    """Bytes a step must move: experts hit, router, activations in and out (intermediates excluded)."""
    experts_hit = int(torch.unique(topk_ids).numel())
    expert_bytes = (layer.experts.w13_weight[0].numel() + layer.experts.w2_weight[0].numel()) * 2
    router_bytes = layer.gate.weight.numel() * 2
    activation_bytes = 2 * num_tokens * Q30A3["hidden"] * 2
    return dict(experts_hit=experts_hit, expert_weight_bytes=experts_hit * expert_bytes,
                total_bytes=experts_hit * expert_bytes + router_bytes + activation_bytes)


def bench_ms(fn) -> float:
    fn()  # compile outside the graph
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=200))


def measure(num_tokens: int, sweep: bool) -> dict:
    layer = make_layer()
    x = torch.randn(num_tokens, Q30A3["hidden"], device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        weights, ids = select_experts(layer.gate(x), Q30A3["top_k"], True, DTYPE)
        w13, w2 = layer.experts.w13_weight, layer.experts.w2_weight
        reference = experts_torch(x, w13, w2, weights, ids).float()
        error = (fused_moe.fused_experts(x, w13, w2, weights, ids).float() - reference).abs().max().item()
    moved = step_bytes(layer, ids, num_tokens)
    roofline_ms = moved["total_bytes"] / HBM_BYTES_PER_S * 1e3
    default = fused_moe.default_config(num_tokens * Q30A3["top_k"], Q30A3["num_experts"])

    def timed(config: fused_moe.MoEKernelConfig | None) -> dict:
        with torch.no_grad():
            ms = bench_ms(lambda: fused_moe.fused_experts(x, w13, w2, weights, ids, config=config))
        return dict(config=dataclasses.asdict(config or default), ms=ms, fraction=roofline_ms / ms,
                    tbps=moved["total_bytes"] / ms / 1e9)

    result = dict(num_tokens=num_tokens, **moved, roofline_ms=roofline_ms,
                  max_abs_diff_vs_torch=error, reference_scale=reference.abs().max().item(), experts=timed(None))
    with torch.no_grad():
        layer_ms = bench_ms(lambda: layer(x))
    result["layer"] = dict(ms=layer_ms, fraction=roofline_ms / layer_ms,
                           per_forward_ms=layer_ms * Q30A3["num_layers"])
    if sweep:
        runs = []
        for config in SWEEP:
            try:
                runs.append(timed(config))
            except Exception as exc:  # a config that does not fit (shared memory) is reported, not fatal
                runs.append(dict(config=dataclasses.asdict(config), error=repr(exc)))
        result["sweep"] = runs
        timed_runs = [r for r in runs if "ms" in r]
        if timed_runs:
            result["best"] = min(timed_runs, key=lambda r: r["ms"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--no-sweep", action="store_true", help="time the default tile config only")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/moe_bench_<device>_<date>.json)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"moe_bench_{device.replace(' ', '_')}_{date:%Y-%m-%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(benchmark="moe_decode_layer", model="Q30A3", shape=Q30A3, dtype="bfloat16", device=device,
                  sluice_commit=git_commit(), date=date.isoformat(timespec="seconds"),
                  hbm_bytes_per_s=HBM_BYTES_PER_S, target_fraction_at_256=0.6, results=[])
    for num_tokens in args.num_tokens:
        try:
            result = measure(num_tokens, sweep=not args.no_sweep)
        except Exception:
            result = dict(num_tokens=num_tokens, error=traceback.format_exc())
        report["results"].append(result)
        out.write_text(json.dumps(report, indent=2))
        if "error" in result:
            print(result["error"], file=sys.stderr)
            continue
        best = result.get("best", {})
        print(f"T={num_tokens:5d} experts hit {result['experts_hit']:3d}  roofline {result['roofline_ms'] * 1e3:7.1f} us"
              f"  experts {result['experts']['ms'] * 1e3:7.1f} us ({result['experts']['fraction']:.2f})"
              f"  layer {result['layer']['ms'] * 1e3:7.1f} us ({result['layer']['fraction']:.2f})"
              + (f"  best {best['ms'] * 1e3:7.1f} us ({best['fraction']:.2f}) {best['config']}" if best else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

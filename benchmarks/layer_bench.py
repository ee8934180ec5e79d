"""Times the decoder layers' torch code against the fused Triton kernels on the GPU, at L8 shapes.

    python benchmarks/layer_bench.py --out layers.json

L8 (docs/benchmarks.md): hidden 4096, 32 heads and 8 KV heads of 128, intermediate 14336, bf16, llama3
rope. For T = 256 (a decode step of 256 requests) and T = 8192 (a prefill step) it times each op
two ways: ``eager`` (triton.testing.do_bench: one call per launch, L2 flushed, host launch cost
included) and ``graph`` (triton.testing.do_bench_cudagraph: calls replayed from a CUDA graph, the
way decode steps run, data left in L2). Each op's fused result is first checked against the torch
result; ``per_forward`` adds the ops up over L8's 32 layers. Results are written after every op,
so a failure part way keeps what was measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sluice.bench.cli import git_commit  # noqa: E402
from sluice.layers import fused_kernels  # noqa: E402
from sluice.layers.activation import SiluAndMul  # noqa: E402
from sluice.layers.norm import RMSNorm  # noqa: E402
from sluice.layers.rotary import RopeSettings, RotaryEmbedding  # noqa: E402

HBM_COPY_TBPS = 3.0  # docs/benchmarks.md: measured device-to-device copy on the H100
L8 = dict(hidden=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=14336, num_layers=32, eps=1e-5)
L8_ROPE = RopeSettings(rope_theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                       high_freq_factor=4.0, original_max_position_embeddings=8192)
DTYPE = torch.bfloat16
DEVICE = "cuda"


@dataclass
class Op:
    """One op at one size: both paths as zero-argument calls, and the bytes the op must move."""
    name: str
    num_tokens: int
    torch_fn: Callable[[], object]
    fused_fn: Callable[[], object]
    check: Callable[[], float]  # max |fused - torch| on fresh inputs
    min_bytes: int


@dataclass
class Result:
    op: str
    num_tokens: int
    mode: str
    torch_ms: float | None = None
    fused_ms: float | None = None
    speedup: float | None = None
    fused_tbps: float | None = None
    fused_fraction_of_hbm: float | None = None
    max_abs_diff: float | None = None
    min_bytes: int = 0
    error: str | None = None


def norm_ops(num_tokens: int) -> list[Op]:
    hidden = L8["hidden"]
    norm = RMSNorm(hidden, L8["eps"]).to(DEVICE, DTYPE)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(hidden, device=DEVICE))
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=DTYPE)
    residual = torch.randn(num_tokens, hidden, device=DEVICE, dtype=DTYPE)
    row_bytes = num_tokens * hidden * 2

    def check_plain() -> float:
        return (fused_kernels.rms_norm(x, norm.weight, norm.eps) - norm.forward_torch(x)).abs().max().item()

    def check_residual() -> float:
        (normed, new_residual), (ref_normed, ref_residual) = (
            fused_kernels.rms_norm(x, norm.weight, norm.eps, residual), norm.forward_torch(x, residual))
        return max((normed - ref_normed).abs().max().item(), (new_residual - ref_residual).abs().max().item())

    return [
        Op("rms_norm", num_tokens, lambda: norm.forward_torch(x),
           lambda: fused_kernels.rms_norm(x, norm.weight, norm.eps), check_plain, 2 * row_bytes),
        Op("add_rms_norm", num_tokens, lambda: norm.forward_torch(x, residual),
           lambda: fused_kernels.rms_norm(x, norm.weight, norm.eps, residual), check_residual, 4 * row_bytes),
    ]


def rotary_op(num_tokens: int) -> Op:
    head_dim, num_heads, num_kv_heads = L8["head_dim"], L8["num_heads"], L8["num_kv_heads"]
    rope = RotaryEmbedding(head_dim, L8_ROPE).to(DEVICE)
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(num_tokens, sum(sizes), device=DEVICE, dtype=DTYPE)
    q, k, _ = qkv.split(sizes, dim=-1)  # strided column slices, as LlamaAttention passes them
    high = 1024 if num_tokens <= 256 else num_tokens  # decode: contexts of up to 1k; prefill: 0..T-1
    positions = torch.randint(0, high, (num_tokens,), device=DEVICE)

    def check() -> float:
        q_ref, k_ref = rope.forward_torch(positions, q, k)
        q_in, k_in, _ = qkv.clone().split(sizes, dim=-1)
        fused_kernels.apply_rotary_(positions, q_in, k_in, rope.inv_freq, head_dim, rope.rotary_dim)
        return max((q_in - q_ref).abs().max().item(), (k_in - k_ref).abs().max().item())

    return Op("rotary", num_tokens, lambda: rope.forward_torch(positions, q, k),
              lambda: fused_kernels.apply_rotary_(positions, q, k, rope.inv_freq, head_dim, rope.rotary_dim),
              check, 2 * num_tokens * (sizes[0] + sizes[1]) * 2)


def qk_norm_op(num_tokens: int) -> Op:
    """Qwen3's per-head q norm on the strided [T, heads, head_dim] view of the qkv output (not in L8)."""
    head_dim, num_heads, num_kv_heads = L8["head_dim"], L8["num_heads"], L8["num_kv_heads"]
    norm = RMSNorm(head_dim, 1e-6).to(DEVICE, DTYPE)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE, dtype=DTYPE)
    q = qkv[:, :num_heads * head_dim].reshape(num_tokens, num_heads, head_dim)

    def check() -> float:
        return (fused_kernels.rms_norm(q, norm.weight, norm.eps) - norm.forward_torch(q)).abs().max().item()

    return Op("qwen3_q_norm", num_tokens, lambda: norm.forward_torch(q),
              lambda: fused_kernels.rms_norm(q, norm.weight, norm.eps), check, 2 * q.numel() * 2)


def silu_op(num_tokens: int) -> Op:
    width = L8["intermediate"]
    gate_up = torch.randn(num_tokens, 2 * width, device=DEVICE, dtype=DTYPE)
    act = SiluAndMul()

    def check() -> float:
        return (fused_kernels.silu_and_mul(gate_up) - act.forward_torch(gate_up)).abs().max().item()

    return Op("silu_and_mul", num_tokens, lambda: act.forward_torch(gate_up),
              lambda: fused_kernels.silu_and_mul(gate_up), check, 3 * num_tokens * width * 2)


def time_op(op: Op, mode: str, max_abs_diff: float | None) -> Result:
    result = Result(op.name, op.num_tokens, mode, max_abs_diff=max_abs_diff, min_bytes=op.min_bytes)
    try:
        if mode == "eager":
            bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
        else:
            bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")  # noqa: E731
        result.torch_ms = bench(op.torch_fn)
        result.fused_ms = bench(op.fused_fn)
        result.speedup = result.torch_ms / result.fused_ms
        result.fused_tbps = op.min_bytes / (result.fused_ms * 1e-3) / 1e12
        result.fused_fraction_of_hbm = result.fused_tbps / HBM_COPY_TBPS
    except Exception as exc:  # report and go on: the other ops still get measured
        result.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        traceback.print_exc()
    return result


def per_forward(results: list[Result]) -> list[dict]:
    """L8 forward: per layer two add+norms, one rope, one silu_and_mul; plus the final add+norm."""
    estimates = []
    counts = {"add_rms_norm": 2 * L8["num_layers"] + 1, "rotary": L8["num_layers"], "silu_and_mul": L8["num_layers"]}
    for num_tokens in sorted({r.num_tokens for r in results}):
        for mode in ("eager", "graph"):
            rows = {r.op: r for r in results if r.num_tokens == num_tokens and r.mode == mode and r.error is None}
            if not all(op in rows for op in counts):
                continue
            torch_ms = sum(rows[op].torch_ms * n for op, n in counts.items())
            fused_ms = sum(rows[op].fused_ms * n for op, n in counts.items())
            estimates.append(dict(num_tokens=num_tokens, mode=mode, torch_ms=torch_ms, fused_ms=fused_ms,
                                  saved_ms=torch_ms - fused_ms))
    return estimates


def write_report(path: Path, results: list[Result]) -> dict:
    report = dict(benchmark="layers", model="L8", dtype="bfloat16", device=torch.cuda.get_device_name(),
                  torch=torch.__version__, triton=triton.__version__, sluice_commit=git_commit(),
                  date=datetime.date.today().isoformat(), reference_hbm_tbps=HBM_COPY_TBPS,
                  results=[asdict(r) for r in results], per_forward=per_forward(results))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return report


def print_row(r: Result) -> None:
    if r.error:
        print(f"{r.op:14} {r.num_tokens:6} {r.mode:6} ERROR {r.error}", flush=True)
        return
    print(f"{r.op:14} {r.num_tokens:6} {r.mode:6} {r.torch_ms * 1e3:10.1f} {r.fused_ms * 1e3:10.1f} "
          f"{r.speedup:7.2f}x {r.fused_tbps:6.2f} {r.fused_fraction_of_hbm:6.1%} {r.max_abs_diff:9.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--num-tokens", type=int, nargs="+", default=[256, 8192])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("layer_bench needs a CUDA GPU")

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'op':14} {'T':>6} {'mode':6} {'torch us':>10} {'fused us':>10} {'speedup':>8} {'TB/s':>6} "
          f"{'of3.0':>6} {'max diff':>9}", flush=True)
    results: list[Result] = []
    torch.manual_seed(0)
    for num_tokens in args.num_tokens:
        for make_ops in (norm_ops, lambda t: [rotary_op(t)], lambda t: [silu_op(t)], lambda t: [qk_norm_op(t)]):
            try:
                ops = make_ops(num_tokens)
            except Exception as exc:
                print(f"building ops for T={num_tokens} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            for op in ops:
                try:
                    max_abs_diff = op.check()
                except Exception as exc:
                    results.append(Result(op.name, num_tokens, "check", error=f"{type(exc).__name__}: {exc}"))
                    print_row(results[-1])
                    continue
                for mode in ("eager", "graph"):
                    results.append(time_op(op, mode, max_abs_diff))
                    print_row(results[-1])
                    write_report(args.out, results)
            del ops
            torch.cuda.empty_cache()
    report = write_report(args.out, results)
    print("\nper L8 forward (32 layers: 2 add+norm, rope, silu_and_mul each; + final norm):")
    for e in report["per_forward"]:
        print(f"  T={e['num_tokens']:5} {e['mode']:6} torch {e['torch_ms']:7.3f} ms  fused {e['fused_ms']:7.3f} ms  "
              f"saved {e['saved_ms']:7.3f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

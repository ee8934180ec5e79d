"""Times the quantized GEMMs against bf16 ``torch.matmul`` on the L8 (Llama-3-8B) projection shapes.

    python benchmarks/quant_kernel_bench.py [--m 1 4 16 64 256 2048] [--shapes qkv o gate_up down ...]
                                            [--sweep] [--act-order] [--out FILE]

For each shape (N, K) and row count M, replayed from a CUDA graph (triton.testing.do_bench_cudagraph, as
decode steps run), in microseconds:

    bf16            F.linear(x, W) with W bf16 [N, K]                     (cuBLAS)
    w4a16           triton_w4a16.w4a16_gemm: 4-bit RTN weights, asymmetric, group 128 (default tiles; from
                    DENSE_MIN_M rows dequantize + torch.matmul); at M >= 256 also w4a16_fused_us and
                    w4a16_dense_us: each prefill path forced
    fp8_scaled_mm   fp8.fp8_linear: Triton per-token activation quant + torch._scaled_mm (row-wise scales)
    fp8_torch_quant the same with the torch activation quant (the path before the Triton kernel)
    fp8_triton      fp8.fp8_linear with SLUICE_FP8_GEMM=triton: the split-K Triton GEMM (M <= 64 only)
    fp8_quant       triton_fp8.quantize_activations alone
    fp8_tensorwise  fp8.fp8_linear with SLUICE_FP8_GEMM=tensorwise: the same quant, torch._scaled_mm with unit
                    per-tensor scales (cuBLASLt) to float32, then triton_fp8.scale_rows_cols (M <= 128 only);
                    fp8_tensorwise_gemm and fp8_rowwise_gemm: each _scaled_mm alone on quantized activations
                    (what the scaling mode costs the GEMM)

``x_bf16`` columns are bf16 time over that time (higher is better); ``w4a16_tbps`` the weight bytes
(K * N / 2 + scales and zeros) over the time. ``--sweep`` also times a list of W4A16 tile configs at each
(shape, M), and the default tiles with each dequantization (half, magic32, f32) and unpacking (reshape,
gather), and reports the best (set it with SLUICE_W4A16_CONFIG to try it in the engine). Each result
is checked against the torch reference first (max abs error relative to the output's max).
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
import torch.nn.functional as F
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sluice.bench.cli import git_commit  # noqa: E402
from sluice.layers.quantization import triton_fp8, triton_w4a16  # noqa: E402
from sluice.layers.quantization.fp8 import TENSORWISE_MAX_M, fp8_linear, quantize_fp8_per_row  # noqa: E402
from sluice.layers.quantization.w4a16 import dequantize, quantize_rtn  # noqa: E402

HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
SHAPES = {  # name -> (N, K); the engine runs the fused qkv and gate_up
    "q": (Q_HEADS * HEAD_DIM, HIDDEN), "k_v": (KV_HEADS * HEAD_DIM, HIDDEN), "o": (HIDDEN, Q_HEADS * HEAD_DIM),
    "gate_up_each": (INTERMEDIATE, HIDDEN), "down": (HIDDEN, INTERMEDIATE),
    "qkv": ((Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), "gate_up": (2 * INTERMEDIATE, HIDDEN),
}
DEFAULT_SHAPES = ["qkv", "o", "gate_up", "down", "q", "k_v", "gate_up_each"]
GROUP_SIZE = 128
DEVICE = "cuda"
C = triton_w4a16.W4A16KernelConfig
SWEEP_DECODE = [C(16, 64, 128, 1, 4, 4), C(16, 64, 128, 2, 4, 4), C(16, 64, 128, 4, 4, 4), C(16, 64, 128, 8, 4, 4),
                C(16, 32, 128, 4, 4, 4), C(16, 128, 128, 4, 4, 4), C(16, 64, 256, 2, 4, 3), C(16, 128, 64, 4, 4, 4),
                C(16, 256, 64, 2, 8, 3), C(16, 64, 64, 8, 2, 4)]
SWEEP_MID = [C(32, 64, 128, 2, 4, 4), C(64, 64, 128, 2, 4, 4), C(64, 128, 64, 1, 4, 4), C(64, 128, 128, 1, 8, 3),
             C(32, 128, 128, 1, 4, 4), C(64, 64, 64, 4, 4, 4)]
SWEEP_PREFILL = [C(64, 128, 64, 1, 4, 4), C(128, 128, 64, 1, 8, 3), C(128, 256, 64, 1, 8, 3),
                 C(64, 256, 64, 1, 8, 3), C(128, 128, 128, 1, 8, 2), C(128, 64, 64, 1, 4, 4)]


def bench_us(fn) -> float:
    fn()  # compile outside the graph
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=100)) * 1e3


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference).abs().max() / reference.abs().max()).item()


def make_weights(n: int, k: int, act_order: bool, seed: int = 0) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    dense = torch.randn(n, k, device=DEVICE, generator=gen) * k ** -0.5
    canonical = quantize_rtn(dense, 4, GROUP_SIZE)
    if act_order:  # groups over a random channel order, as GPTQ with desc_act leaves them
        perm = torch.randperm(k, device=DEVICE, generator=gen)
        canonical = {**canonical, "codes": canonical["codes"][:, perm], "g_idx": canonical["g_idx"][perm]}
    packed = triton_w4a16.pack_canonical(**canonical, bits=4, dtype=torch.bfloat16)
    w4_dense = dequantize(canonical["codes"], canonical["zeros"].bfloat16(), canonical["scales"].bfloat16(),
                          canonical["g_idx"]).bfloat16()
    w8, w8_scale = quantize_fp8_per_row(dense)
    return dict(bf16=dense.bfloat16(), packed=packed, w4_dense=w4_dense, w8=w8, w8_scale=w8_scale.view(-1))


def sweep_list(m: int) -> list:
    return SWEEP_DECODE if m <= 16 else (SWEEP_MID if m <= 64 else SWEEP_PREFILL)


def measure(name: str, n: int, k: int, m: int, w: dict, sweep: bool) -> dict:
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    packed, w8, w8_scale = w["packed"], w["w8"], w["w8_scale"]
    default = triton_w4a16.default_config(m, n, k, x.device)
    w4_reference = x.float() @ w["w4_dense"].float().t()
    fp8_reference = fp8_linear(x.float(), w8, w8_scale, None, None, gemm="scaled_mm", quant="torch")
    result = dict(shape=name, n=n, k=k, m=m, w4a16_config=dataclasses.asdict(default),
                  w4a16_error=relative_error(triton_w4a16.w4a16_gemm(x, packed), w4_reference),
                  fp8_error=relative_error(fp8_linear(x, w8, w8_scale, None, None, gemm="scaled_mm"), fp8_reference))
    weight_bytes = packed.qweight.numel() * 4 + 2 * packed.scales.numel() * 2
    with torch.no_grad():
        result["bf16_us"] = bench_us(lambda: F.linear(x, w["bf16"]))
        result["w4a16_us"] = bench_us(lambda: triton_w4a16.w4a16_gemm(x, packed))
        if m >= 256:  # both prefill paths, whichever DENSE_MIN_M picks
            result["w4a16_fused_us"] = bench_us(lambda: triton_w4a16.w4a16_gemm(x, packed, dense_min_m=1 << 30))
            result["w4a16_dense_us"] = bench_us(lambda: triton_w4a16.w4a16_gemm(x, packed, dense_min_m=1))
        result["fp8_scaled_mm_us"] = bench_us(lambda: fp8_linear(x, w8, w8_scale, None, None, gemm="scaled_mm",
                                                                 quant="triton"))
        result["fp8_torch_quant_us"] = bench_us(lambda: fp8_linear(x, w8, w8_scale, None, None, gemm="scaled_mm",
                                                                   quant="torch"))
        result["fp8_quant_us"] = bench_us(lambda: triton_fp8.quantize_activations(x))
        # cuBLASLt's per-tensor fp8 GEMM (unit scales), the row and column scales applied after in one kernel
        x8, scale_a = triton_fp8.quantize_activations(x)
        one = torch.ones((), device=DEVICE)
        w8t, w_row = w8.t(), w8_scale.view(1, -1)
        if m <= TENSORWISE_MAX_M:
            result["fp8_tensorwise_error"] = relative_error(
                fp8_linear(x, w8, w8_scale, None, None, gemm="tensorwise"), fp8_reference)
            result["fp8_tensorwise_us"] = bench_us(lambda: fp8_linear(x, w8, w8_scale, None, None, gemm="tensorwise",
                                                                      quant="triton"))
        result["fp8_tensorwise_gemm_us"] = bench_us(
            lambda: torch._scaled_mm(x8, w8t, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        result["fp8_rowwise_gemm_us"] = bench_us(
            lambda: torch._scaled_mm(x8, w8t, scale_a=scale_a.contiguous(), scale_b=w_row, out_dtype=torch.bfloat16))
        if m <= 64:
            result["fp8_triton_error"] = relative_error(fp8_linear(x, w8, w8_scale, None, None, gemm="triton"),
                                                        fp8_reference)
            result["fp8_triton_us"] = bench_us(lambda: fp8_linear(x, w8, w8_scale, None, None, gemm="triton",
                                                                  quant="triton"))
        if sweep:
            runs = []
            variants = [dataclasses.replace(default, dequant=dequant, unpack=unpack)
                        for dequant in ("half", "magic32", "f32") for unpack in ("reshape", "gather")]
            for config in variants + sweep_list(m):
                try:
                    runs.append(dict(config=dataclasses.asdict(config),
                                     us=bench_us(lambda: triton_w4a16.w4a16_gemm(x, packed, config=config))))
                except Exception as exc:  # a config that does not fit (shared memory) is reported, not fatal
                    runs.append(dict(config=dataclasses.asdict(config), error=repr(exc)))
            result["w4a16_sweep"] = runs
            timed = [r for r in runs if "us" in r]
            if timed:
                result["w4a16_best"] = min(timed, key=lambda r: r["us"])
    result["w4a16_tbps"] = weight_bytes / result["w4a16_us"] / 1e6
    result["bf16_tbps"] = n * k * 2 / result["bf16_us"] / 1e6
    for key in ("w4a16", "w4a16_fused", "w4a16_dense", "fp8_scaled_mm", "fp8_torch_quant", "fp8_triton",
                "fp8_tensorwise", "fp8_tensorwise_gemm", "fp8_rowwise_gemm"):
        if f"{key}_us" in result:
            result[f"{key}_x_bf16"] = result["bf16_us"] / result[f"{key}_us"]
    return result


def format_row(r: dict) -> str:
    def cell(key: str, fmt: str = "9.1f") -> str:
        return format(r[key], fmt) if key in r else f"{'-':>{fmt.split('.')[0]}}"
    best = r.get("w4a16_best")
    return (f"{r['shape']:<13}{r['m']:>5}{cell('bf16_us')}{cell('w4a16_us')}{cell('w4a16_x_bf16', '7.2f')}"
            f"{cell('w4a16_tbps', '7.2f')}{cell('fp8_scaled_mm_us')}{cell('fp8_scaled_mm_x_bf16', '7.2f')}"
            f"{cell('fp8_torch_quant_us')}{cell('fp8_triton_us')}{cell('fp8_triton_x_bf16', '7.2f')}"
            f"{cell('fp8_quant_us', '8.1f')}{cell('w4a16_fused_us')}{cell('w4a16_dense_us')}"
            f"{cell('fp8_tensorwise_x_bf16', '7.2f')}{cell('fp8_tensorwise_gemm_x_bf16', '7.2f')}"
            f"{cell('fp8_rowwise_gemm_x_bf16', '7.2f')}"
            + (f"   best w4a16 {best['us']:.1f} us {tuple(best['config'].values())}" if best else ""))


HEADER = (f"{'shape':<13}{'M':>5}{'bf16':>9}{'w4a16':>9}{'x':>7}{'TB/s':>7}{'fp8 smm':>9}{'x':>7}"
          f"{'fp8 tq':>9}{'fp8 tri':>9}{'x':>7}{'quant':>8}{'w4 fused':>9}{'w4 dense':>9}{'tw x':>7}{'twg x':>7}{'rwg x':>7}"
          "   (microseconds; x = bf16 time / this)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64, 256, 2048])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=sorted(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="also time a list of W4A16 tile configs")
    parser.add_argument("--act-order", action="store_true", help="W4A16 weights with act-order (activation gather)")
    parser.add_argument("--out", default=None,
                        help="JSON file (default benchmarks/results/quant_kernel_bench_<device>_<date>.json)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    date = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"quant_kernel_bench_{device.replace(' ', '_')}_{date:%Y-%m-%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(benchmark="quant_kernels", model="L8", device=device, sluice_commit=git_commit(),
                  date=date.isoformat(timespec="seconds"), w4a16=f"4-bit RTN asymmetric, group {GROUP_SIZE}"
                  + (", act-order" if args.act_order else ""), torch=torch.__version__,
                  triton=triton.__version__, results=[])
    print(HEADER)
    for name in args.shapes:
        n, k = SHAPES[name]
        weights = make_weights(n, k, args.act_order)
        for m in args.m:
            try:
                result = measure(name, n, k, m, weights, args.sweep)
            except Exception:
                result = dict(shape=name, n=n, k=k, m=m, error=traceback.format_exc())
            report["results"].append(result)
            out.write_text(json.dumps(report, indent=2))
            if "error" in result:
                print(f"{name} M={m}: {result['error']}", file=sys.stderr)
            else:
                print(format_row(result), flush=True)
        del weights
        torch.cuda.empty_cache()
    bad = [r for r in report["results"] if max(r.get("w4a16_error", 0), r.get("fp8_error", 0),
                                                r.get("fp8_triton_error", 0), r.get("fp8_tensorwise_error", 0)) > 2e-2]
    for r in bad:
        print(f"CHECK {r['shape']} M={r['m']}: relative errors w4a16 {r['w4a16_error']:.2e} fp8 {r['fp8_error']:.2e}"
              f" fp8_triton {r.get('fp8_triton_error', 0):.2e} fp8_tensorwise {r.get('fp8_tensorwise_error', 0):.2e}",
              file=sys.stderr)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

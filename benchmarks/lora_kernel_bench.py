"""Times the LoRA kernels (sluice/lora/triton_ops.py) against the base layer's matmul at L8 shapes, on the GPU.

    python benchmarks/lora_kernel_bench.py --out lora_kernels.json [--num-loras 8 --rank 16]

For each of L8's LoRA layers (qkv_proj, o_proj, gate_up_proj, down_proj) and each step size T (decode batches
1..256, prompt steps 1024 and 8192), token rows spread evenly over the adapters: the base matmul (F.linear), the
LoRA kernels (shrink + expand, one launch each) and the torch path (``apply_lora``), each replayed from a CUDA
graph (triton.testing.do_bench_cudagraph, the way steps run). The kernels' result is checked against the torch
path first. ``per_forward`` adds the four layers up over 32 layers: the LoRA share of a forward's linear time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import triton.testing

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sluice.lora.layers import LoRABatch, LoRASlotWeights, apply_lora, apply_lora_kernels  # noqa: E402
from sluice.lora.triton_ops import LoRAStepIndex  # noqa: E402

# (input size, sub-projection sizes) of L8's LoRA layers.
L8_LAYERS = {"qkv_proj": (4096, [4096, 1024, 1024]), "o_proj": (4096, [4096]),
             "gate_up_proj": (4096, [14336, 14336]), "down_proj": (14336, [4096])}
SIZES = (1, 8, 16, 32, 64, 128, 256, 1024, 8192)


def bench_layer(name: str, num_tokens: int, num_loras: int, rank: int) -> dict[str, float]:
    in_size, sizes = L8_LAYERS[name]
    device, dtype = torch.device("cuda"), torch.bfloat16
    weights = LoRASlotWeights(in_size, sizes, num_loras, rank, dtype, device)
    for slot in range(num_loras):
        for sub, size in enumerate(sizes):
            weights.set_slot(slot, sub, torch.randn(rank, in_size, device=device, dtype=dtype) * in_size ** -0.5,
                             torch.randn(size, rank, device=device, dtype=dtype) * 0.01)
    base_weight = torch.randn(sum(sizes), in_size, device=device, dtype=dtype) * in_size ** -0.5
    x = torch.randn(num_tokens, in_size, device=device, dtype=dtype)
    out = torch.nn.functional.linear(x, base_weight)
    token_slots = (np.arange(num_tokens) % num_loras).astype(np.int32)
    step = LoRAStepIndex.allocate(max(num_tokens, 16), num_loras, device)
    step.fill(token_slots)
    kernels = LoRABatch(step_index=step, active=True,
                        shrunk=torch.zeros(len(sizes), step.max_num_tokens, rank, dtype=torch.float32, device=device))
    segments = [(s, torch.from_numpy(np.flatnonzero(token_slots == s)).to(device)) for s in range(num_loras)
                if (token_slots == s).any()]
    reference = LoRABatch(segments=segments, slot_ranks=[rank] * num_loras)
    result = out.clone()
    apply_lora_kernels(x, result, weights, kernels)
    expected = apply_lora(x, out.clone(), weights, reference)
    error = (result.float() - expected.float()).abs().max().item()
    assert error <= 3e-2 * max(expected.float().abs().max().item(), 1.0), f"{name} T={num_tokens}: error {error}"
    target = out.clone()
    timings = {"base_us": triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, base_weight)),
               "lora_kernels_us": triton.testing.do_bench_cudagraph(
                   lambda: apply_lora_kernels(x, target, weights, kernels)),
               "lora_torch_us": triton.testing.do_bench_cudagraph(
                   lambda: apply_lora(x, target, weights, reference))}
    return {key: value * 1000.0 for key, value in timings.items()}  # do_bench gives milliseconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--num-loras", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    results: dict[str, dict] = {"device": torch.cuda.get_device_name(), "num_loras": args.num_loras,
                                "rank": args.rank, "layers": {}, "per_forward": {}}
    print(f"{'layer':<14}{'T':>6}{'base us':>10}{'kernels us':>12}{'torch us':>10}{'kernels/base':>14}")
    for num_tokens in SIZES:
        totals = {"base_us": 0.0, "lora_kernels_us": 0.0, "lora_torch_us": 0.0}
        for name in L8_LAYERS:
            timing = bench_layer(name, num_tokens, args.num_loras, args.rank)
            results["layers"][f"{name}/T={num_tokens}"] = timing
            for key in totals:
                totals[key] += 32 * timing[key]
            print(f"{name:<14}{num_tokens:>6}{timing['base_us']:>10.1f}{timing['lora_kernels_us']:>12.1f}"
                  f"{timing['lora_torch_us']:>10.1f}{timing['lora_kernels_us'] / timing['base_us']:>14.3f}")
        totals["kernels_over_base"] = totals["lora_kernels_us"] / totals["base_us"]
        results["per_forward"][f"T={num_tokens}"] = totals
        print(f"{'32 layers':<14}{num_tokens:>6}{totals['base_us']:>10.0f}{totals['lora_kernels_us']:>12.0f}"
              f"{totals['lora_torch_us']:>10.0f}{totals['kernels_over_base']:>14.3f}")
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

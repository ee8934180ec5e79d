"""Times one sampling step on the GPU: the fused Triton kernel against the torch path, at L8's vocabulary.

    python benchmarks/sampler_bench.py --out sampler.json

For each batch size N, bf16 logits [N, 128256] as L8's lm_head gives them, sampled with
temperature 1.0 (W1/W5) and greedily; ``Sampler(use_fused_kernel=True)`` against
``Sampler(use_fused_kernel=False)``, timed with triton.testing.do_bench (L2 flushed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sluice.sample.metadata import RequestSamplingState, SamplingMetadata  # noqa: E402
from sluice.sample.sampler import Sampler  # noqa: E402
from sluice.sampling_params import SamplingParams  # noqa: E402

VOCAB = 128256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 32, 128, 256, 512, 1024])
    args = parser.parse_args()
    rows = []
    for temperature in (1.0, 0.0):
        for n in args.batch_sizes:
            logits = torch.randn(n, VOCAB, device="cuda", dtype=torch.bfloat16)
            states = [RequestSamplingState.create(SamplingParams(temperature=temperature, max_tokens=16), [1], [],
                                                  device="cuda") for _ in range(n)]
            metadata = SamplingMetadata.build(states, VOCAB, torch.device("cuda"))
            row = dict(batch_size=n, temperature=temperature)
            for label, fused in (("fused_ms", True), ("torch_ms", False)):
                sampler = Sampler(use_fused_kernel=fused)
                row[label] = triton.testing.do_bench(lambda: sampler.sample(logits, metadata), warmup=20, rep=200)
            rows.append(row)
            print(f"T={temperature} N={n:5d}  fused {row['fused_ms'] * 1e3:8.1f} us  "
                  f"torch {row['torch_ms'] * 1e3:8.1f} us", flush=True)
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), vocab=VOCAB, rows=rows), indent=1))


if __name__ == "__main__":
    main()

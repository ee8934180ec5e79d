"""A/B of CPU decode attention, one layer's forward: SDPA over gathered K/V vs the native paged decode kernel.

    PYTHONPATH=$PWD python benchmarks/cpu_decode_attention.py [num_threads]

Back to back on the same batch (n decodes of ~200 tokens over shuffled blocks of 16, bfloat16), median of
repeated calls, plan built once per step as the engine does.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from sluice.attention.backend import AttentionMetadata
from sluice.attention.cpu_sdpa import CpuSdpaBackend


def decode_batch(n: int, heads: int, kv_heads: int, head_dim: int, context: int = 200, block_size: int = 16):
    g = torch.Generator().manual_seed(n)
    seq_lens = (context + torch.randint(-20, 21, (n,), generator=g)).tolist()
    max_blocks = -(-max(seq_lens) // block_size)
    num_blocks = n * max_blocks + 8
    table = torch.randperm(num_blocks, generator=g)[:n * max_blocks].view(n, max_blocks).to(torch.int32)
    kv = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(torch.bfloat16)
    query = torch.randn(n, heads, head_dim, generator=g).to(torch.bfloat16)
    qsl = list(range(n + 1))
    md = AttentionMetadata(num_actual_tokens=n, num_reqs=n, query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                           seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=table,
                           slot_mapping=torch.zeros(n, dtype=torch.int64), max_query_len=1,
                           max_seq_len=max(seq_lens), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    return query, kv, md


def time_forward(backend: CpuSdpaBackend, query, kv, md, repeats: int) -> float:
    md.plan = backend.plan(md, query.shape[0], query.shape[1], kv.shape[3])
    for _ in range(3):
        backend.forward(query, kv, md, 0.125)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.forward(query, kv, md, 0.125)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    if len(sys.argv) > 1:
        torch.set_num_threads(int(sys.argv[1]))
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    sdpa, native = CpuSdpaBackend(native_decode=False), CpuSdpaBackend()
    for heads, kv_heads, head_dim in ((4, 2, 64), (9, 3, 64)):
        for n in (1, 16, 256):
            query, kv, md = decode_batch(n, heads, kv_heads, head_dim)
            repeats = 200 if n < 256 else 50
            a = time_forward(sdpa, query, kv, md, repeats)
            b = time_forward(native, query, kv, md, repeats)
            a2 = time_forward(sdpa, query, kv, md, repeats)
            b2 = time_forward(native, query, kv, md, repeats)
            print(f"H {heads} Hkv {kv_heads} D {head_dim} n {n:3d}: sdpa {a:.3f}/{a2:.3f} ms  "
                  f"native {b:.3f}/{b2:.3f} ms  ({min(a, a2) / min(b, b2):.1f}x)")


if __name__ == "__main__":
    main()

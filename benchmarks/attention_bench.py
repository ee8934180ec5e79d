"""Times the Triton paged-attention kernels on the GPU and reports them against the HBM roofline.

    python benchmarks/attention_bench.py --out attn.json [--sweep]

Headline: decode of 256 requests x 1024 context, Llama-3.1-8B attention shape (32 heads,
8 KV heads, head_dim 128, bf16, block 16). The fewest bytes it must move is every K and V
element of every context once: 256 * 1024 * 8 * 128 * 2 (K, V) * 2 B = 1.07 GB, so at
3.0 TB/s (measured device copy) the floor is 0.36 ms. Also a few mixed batches, a
flash-decoding case, and W5's long-prompt steps: 224 decodes plus one 256-token chunk of a
prompt at 4K..32K positions, in one launch without and with split KV, and in the default two launches. With --sweep, also
times a grid of launch configs (the notes pick from it). --small-decode-sweep times only the small
decode batches of W1's tail under tile and split-size choices, replayed from CUDA graphs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sluice.attention.backend import AttentionMetadata  # noqa: E402
from sluice.attention.triton_paged import (DECODE_CONFIG, MIXED_CONFIG, MOSTLY_DECODE_CONFIG,  # noqa: E402
                                           KernelConfig, TritonPagedBackend)

HBM_COPY_TBPS = 3.0  # docs/benchmarks.md: measured device-to-device copy on the H100
LLAMA8B = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16)


@dataclass
class Case:
    name: str
    query_lens: list[int]
    seq_lens: list[int]


@dataclass
class Result:
    name: str
    config: str
    median_ms: float
    kv_bytes: int
    tbps: float
    fraction_of_hbm: float
    tflops: float


def make_inputs(case: Case, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """Random query and KV cache on the GPU; block tables are a random permutation of block ids."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_req = [math.ceil(s / block_size) for s in case.seq_lens]
    num_blocks = sum(blocks_per_req)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    width = max(blocks_per_req)
    block_table = torch.zeros((len(case.seq_lens), width), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks_per_req):
        block_table[i, :n] = perm[used:used + n]
        used += n
    kv_cache = torch.randn((2, num_blocks, block_size, num_kv_heads, head_dim), device="cuda",
                           generator=gen, dtype=dtype)
    num_tokens = sum(case.query_lens)
    query = torch.randn((num_tokens, num_heads, head_dim), device="cuda", generator=gen, dtype=dtype)
    qsl = [0]
    for q in case.query_lens:
        qsl.append(qsl[-1] + q)
    metadata = AttentionMetadata(
        num_actual_tokens=num_tokens, num_reqs=len(case.seq_lens),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(case.seq_lens, dtype=torch.int32, device="cuda"),
        block_table=block_table, slot_mapping=torch.zeros(num_tokens, dtype=torch.int64, device="cuda"),
        max_query_len=max(case.query_lens), max_seq_len=max(case.seq_lens))
    return query, kv_cache, metadata


def kv_bytes_and_flops(case: Case, num_heads: int, num_kv_heads: int, head_dim: int,
                       elem: int = 2) -> tuple[int, int]:
    """Fewest bytes: each context's K and V once (plus q and out); FLOPs: QK^T and PV, causal."""
    kv = sum(case.seq_lens) * num_kv_heads * head_dim * 2 * elem
    qo = sum(case.query_lens) * num_heads * head_dim * 2 * elem
    visible = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(case.query_lens, case.seq_lens))
    return kv + qo, 4 * visible * num_heads * head_dim


def time_case(case: Case, backend: TritonPagedBackend, label: str, shape: dict) -> Result:
    query, kv_cache, metadata = make_inputs(case, **shape)
    out = torch.empty_like(query)
    scale = shape["head_dim"] ** -0.5
    fn = lambda: backend.forward(query, kv_cache, metadata, scale, out=out)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    nbytes, flops = kv_bytes_and_flops(case, shape["num_heads"], shape["num_kv_heads"], shape["head_dim"])
    tbps = nbytes / (ms * 1e-3) / 1e12
    return Result(case.name, label, ms, nbytes, tbps, tbps / HBM_COPY_TBPS, flops / (ms * 1e-3) / 1e12)


def measure_copy_tbps() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus written."""
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB fp32
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e12


def config_label(cfg: KernelConfig) -> str:
    return f"m{cfg.block_m}_n{cfg.tile_n}_w{cfg.num_warps}_s{cfg.num_stages}"


def sweep(case: Case, decode: bool, shape: dict, grid: dict) -> list[Result]:
    results = []
    for block_m, tile_n, warps, stages in itertools.product(grid["block_m"], grid["tile_n"],
                                                          grid["num_warps"], grid["num_stages"]):
        cfg = KernelConfig(block_m, tile_n, warps, stages)
        backend = (TritonPagedBackend(decode_config=cfg) if decode
                   else TritonPagedBackend(mixed_config=cfg, mostly_decode_config=None))
        try:
            results.append(time_case(case, backend, config_label(cfg), shape))
        except Exception as exc:  # e.g. out of shared memory for a large tile: report and go on
            print(f"  {case.name} {config_label(cfg)} failed: {type(exc).__name__}: {str(exc)[:120]}")
    return results


def long_chunk_cases() -> list[Result]:
    """W5's long-prompt steps: decodes next to a chunk deep into a 32K prompt, split KV off / on."""
    gen = torch.Generator().manual_seed(0)
    decode_lens = torch.randint(1, 2049, (224,), generator=gen).tolist()
    results = []
    for context in (4096, 8192, 16384, 32768):
        case = Case(f"224_decodes+256_chunk@{context}", [1] * 224 + [256], decode_lens + [context])
        for label, threshold, separate in (("one_launch_no_split", 1 << 30, False), ("one_launch", None, False),
                                           ("default", None, True)):
            backend = TritonPagedBackend(mixed_split_min_seq_len=threshold, separate_short_rows=separate)
            results.append(time_case(case, backend, label, LLAMA8B))
    return results


def small_decode_sweep(capture_seq_len: int = 4096) -> list[dict]:
    """Decode-only batches of the W1 tail (1-128 requests), timed the way a decode step runs them: 32
    layers' attention (each its own KV cache, so nothing stays in L2) replayed from one CUDA graph whose
    split count was chosen at capture from ``capture_seq_len``, as the decode graphs choose it from
    max_model_len. Tries the decode tile and the smallest split size (DECODE_MIN_SPLIT_TILES)."""
    from sluice.attention import triton_paged

    rows = []
    default_min = triton_paged.DECODE_MIN_SPLIT_TILES
    scale = LLAMA8B["head_dim"] ** -0.5
    try:
        for num_reqs, context in itertools.product((1, 2, 4, 8, 16, 32, 64, 128), (512, 1024, 2048)):
            case = Case(f"decode_{num_reqs}x{context}", [1] * num_reqs, [context] * num_reqs)
            query, kv_cache, metadata = make_inputs(case, **LLAMA8B)
            caches = [kv_cache] + [torch.randn_like(kv_cache) for _ in range(31)]
            metadata.max_seq_len = capture_seq_len
            out = torch.empty_like(query)
            nbytes, _ = kv_bytes_and_flops(case, LLAMA8B["num_heads"], LLAMA8B["num_kv_heads"], LLAMA8B["head_dim"])
            for min_split, tile_n in itertools.product((1, 2, 4), (64, 128)):
                triton_paged.DECODE_MIN_SPLIT_TILES = min_split
                cfg = KernelConfig(DECODE_CONFIG.block_m, tile_n, DECODE_CONFIG.num_warps, DECODE_CONFIG.num_stages)
                backend = TritonPagedBackend(decode_config=cfg)

                def step():
                    for cache in caches:
                        backend.forward(query, cache, metadata, scale, out=out)

                step()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                graph.replay()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    graph.replay()
                end.record()
                end.synchronize()
                layer_us = 1e3 * start.elapsed_time(end) / 10 / len(caches)
                rows.append(dict(num_reqs=num_reqs, context=context, min_split_tiles=min_split, tile_n=tile_n,
                                 layer_us=layer_us, tbps=nbytes / (layer_us * 1e-6) / 1e12))
                print(f"decode {num_reqs:3} x {context:4} min_split {min_split} tile_n {tile_n:3}: "
                      f"{layer_us:7.2f} us/layer {rows[-1]['tbps']:.2f} TB/s", flush=True)
                del graph
            del caches, kv_cache
    finally:
        triton_paged.DECODE_MIN_SPLIT_TILES = default_min
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--sweep", action="store_true", help="also try launch configs")
    parser.add_argument("--sweep-long-chunk", action="store_true",
                        help="also try launch configs on 224 decodes + a 256-token chunk at 32K")
    parser.add_argument("--small-decode-sweep", action="store_true",
                        help="only: decode batches of 1-128 requests under tile and split-size choices")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_bench needs a CUDA GPU")
    if args.small_decode_sweep:
        report = dict(device=torch.cuda.get_device_name(), decode_config=asdict(DECODE_CONFIG),
                      results=small_decode_sweep())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        return

    decode = Case("decode_256x1k", [1] * 256, [1024] * 256)
    mixed = Case("mixed_255x1k_decodes+512_chunk", [1] * 255 + [512], [1024] * 255 + [1536])
    prefill = Case("prefill_4x2048", [2048] * 4, [2048] * 4)
    long_decode = Case("decode_8x16k", [1] * 8, [16384] * 8)
    results: list[Result] = []
    copy_tbps = measure_copy_tbps()
    default = TritonPagedBackend()
    for case in (decode, mixed, prefill, long_decode, Case("decode_32x4k", [1] * 32, [4096] * 32),
                 Case("decode_64x2k_ragged", [1] * 64, [64 + 61 * i for i in range(64)]),
                 Case("mixed_128x1k_decodes+2x2048_chunks", [1] * 128 + [2048] * 2, [1024] * 128 + [2048] * 2)):
        results.append(time_case(case, default, "default", LLAMA8B))
    results.append(time_case(long_decode, TritonPagedBackend(enable_split_kv=False), "no_split", LLAMA8B))
    results.append(time_case(mixed, TritonPagedBackend(separate_short_rows=False), "one_launch", LLAMA8B))
    results.append(time_case(decode, default, "default_block32", {**LLAMA8B, "block_size": 32}))
    results += long_chunk_cases()
    if args.sweep:
        results += sweep(decode, True, LLAMA8B,
                         dict(block_m=[16], tile_n=[32, 64, 128], num_warps=[4, 8], num_stages=[2, 3]))
        results += sweep(mixed, False, LLAMA8B,
                         dict(block_m=[16, 64], tile_n=[32, 64], num_warps=[4], num_stages=[2, 3]))
        results += sweep(prefill, False, LLAMA8B,
                         dict(block_m=[64, 128], tile_n=[32, 64], num_warps=[4, 8], num_stages=[2]))

    if args.sweep_long_chunk:
        gen = torch.Generator().manual_seed(0)
        decode_lens = torch.randint(1, 2049, (224,), generator=gen).tolist()
        long_chunk = Case("224_decodes+256_chunk@32768", [1] * 224 + [256], decode_lens + [32768])
        results += sweep(long_chunk, False, LLAMA8B,
                         dict(block_m=[64, 128], tile_n=[32, 64, 128], num_warps=[4, 8], num_stages=[2, 3]))
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  measured_copy_tbps=copy_tbps, reference_hbm_tbps=HBM_COPY_TBPS,
                  decode_config=asdict(DECODE_CONFIG), mixed_config=asdict(MIXED_CONFIG),
                  mostly_decode_config=asdict(MOSTLY_DECODE_CONFIG),
                  results=[asdict(r) for r in results])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"device {report['device']}, measured copy {copy_tbps:.2f} TB/s (reference {HBM_COPY_TBPS})")
    print(f"{'case':34} {'config':18} {'ms':>8} {'GB':>7} {'TB/s':>6} {'of3.0':>6} {'TFLOP/s':>8}")
    for r in results:
        print(f"{r.name:34} {r.config:18} {r.median_ms:8.4f} {r.kv_bytes / 1e9:7.3f} {r.tbps:6.2f} "
              f"{r.fraction_of_hbm:6.1%} {r.tflops:8.1f}")


if __name__ == "__main__":
    main()

"""Can attention overlap the matmuls of a large decode step? A probe on the GPU, outside the engine.

    python benchmarks/overlap_probe.py --out overlap.json [--num-reqs 1000] [--context 256]

In a decode step of ~1000 W1 requests the matmuls are compute-bound (~20 ms) and attention is
bandwidth-bound (~9 ms), and sluice runs them one after the other in every layer. Two halves of the
batch are independent until the sampler, so each half's forward could run on its own stream and
one half's attention could run while the other half's matmuls do. This times 8 L8 layers (matmuls
of the layer's real shapes, each layer its own weights and KV cache, so nothing stays in L2; the
norms and activations are left out) four ways:

  full      the whole batch on one stream (what sluice does)
  halves    the two halves one after the other on one stream (the cost of reading weights twice)
  streams   each half on its own stream, nothing between them
  carveout  as streams, with cuBLAS told to leave SMs free (torch._C._set_sm_carveout_experimental)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sluice.attention.backend import AttentionMetadata  # noqa: E402
from sluice.attention.triton_paged import TritonPagedBackend  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, BLOCK = 4096, 32, 8, 128, 14336, 16


def make_layer(num_reqs: int, context: int, gen: torch.Generator) -> dict:
    def w(out_features, in_features):
        return torch.randn((out_features, in_features), device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    blocks = num_reqs * context // BLOCK
    return dict(qkv=w((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), o=w(HIDDEN, HEADS * HEAD_DIM),
                gate_up=w(2 * INTER, HIDDEN), down=w(HIDDEN, INTER),
                kv=torch.randn((2, blocks, BLOCK, KV_HEADS, HEAD_DIM), device="cuda", dtype=torch.bfloat16,
                               generator=gen))


def metadata_for(reqs: range, context: int) -> AttentionMetadata:
    per_req = context // BLOCK
    table = torch.arange(reqs.start * per_req, reqs.stop * per_req, device="cuda", dtype=torch.int32)
    n = len(reqs)
    return AttentionMetadata(
        num_actual_tokens=n, num_reqs=n, query_start_loc=torch.arange(n + 1, device="cuda", dtype=torch.int32),
        seq_lens=torch.full((n,), context, device="cuda", dtype=torch.int32),
        block_table=table.view(n, per_req), slot_mapping=torch.zeros(n, device="cuda", dtype=torch.int64),
        max_query_len=1, max_seq_len=context)


def forward(layers: list[dict], x: torch.Tensor, metadata: AttentionMetadata, backend: TritonPagedBackend) -> None:
    """The matmuls and attention of each layer in order (no norms, no activation: the probe's only question
    is whether the two kinds of kernels overlap)."""
    n = x.shape[0]
    scale = HEAD_DIM ** -0.5
    for layer in layers:
        qkv = x @ layer["qkv"].t()
        q = qkv[:, :HEADS * HEAD_DIM].reshape(n, HEADS, HEAD_DIM)
        attn = backend.forward(q, layer["kv"], metadata, scale)
        x = attn.reshape(n, HEADS * HEAD_DIM) @ layer["o"].t()
        h = x @ layer["gate_up"].t()
        x = h[:, :INTER] @ layer["down"].t()


def timed(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-reqs", type=int, default=1000)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("overlap_probe needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers = [make_layer(args.num_reqs, args.context, gen) for _ in range(args.layers)]
    backend = TritonPagedBackend()
    n, half = args.num_reqs, args.num_reqs // 2
    x = torch.randn((n, HIDDEN), device="cuda", dtype=torch.bfloat16, generator=gen)
    full_md = metadata_for(range(n), args.context)
    halves = [(x[:half], metadata_for(range(half), args.context)),
              (x[half:], metadata_for(range(half, n), args.context))]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]

    def on_streams():
        main_stream = torch.cuda.current_stream()
        for stream, (xs, md) in zip(streams, halves):
            stream.wait_stream(main_stream)
            with torch.cuda.stream(stream):
                forward(layers, xs, md, backend)
        for stream in streams:
            main_stream.wait_stream(stream)

    results = {"num_reqs": n, "context": args.context, "layers": args.layers,
               "device": torch.cuda.get_device_name(),
               "full_ms": timed(lambda: forward(layers, x, full_md, backend)),
               "halves_ms": timed(lambda: [forward(layers, xs, md, backend) for xs, md in halves]),
               "streams_ms": timed(on_streams)}
    # The two parts alone, for the serial sum: attention only and matmuls only.
    query = torch.randn((n, HEADS, HEAD_DIM), device="cuda", dtype=torch.bfloat16, generator=gen)
    results["attention_only_ms"] = timed(lambda: [backend.forward(query, layer["kv"], full_md, HEAD_DIM ** -0.5)
                                                  for layer in layers])
    if hasattr(torch._C, "_set_sm_carveout_experimental"):
        for carveout in (16, 32, 48):
            torch._C._set_sm_carveout_experimental(carveout)
            try:
                results[f"carveout_{carveout}_ms"] = timed(on_streams)
            finally:
                torch._C._set_sm_carveout_experimental(None)
    results["matmuls_only_ms_estimate"] = results["full_ms"] - results["attention_only_ms"]
    args.out.write_text(json.dumps(results, indent=2))
    for key, value in results.items():
        print(f"{key:28} {value}")


if __name__ == "__main__":
    main()

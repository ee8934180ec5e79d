"""CUDA graphs for decode-only steps: one graph per batch-size bucket, all sharing one memory pool.

A decode step of L8 launches ~15 kernels per layer; eager, the host needs longer to launch
them than the GPU to run them at small batches. Each graph replays the whole model forward
(input_ids, positions, attention metadata -> hidden states) over *views of the runner's
persistent StepBuffers*, so a step only refills those buffers and calls ``replay()``:

    bucket sizes: 1 2 4 8 16 ... 248 256 272 ... 496 512 544 ... 1024   (up to max_num_seqs)
    a step of 13 decodes runs the 16-graph; requests 13..15 are padding:
        query_start_loc [... 13 13 13 13]   (query length 0: the attention kernels skip them)
        seq_lens        [... 0  0  0]       slot_mapping of padded tokens: -1 (no KV write)

What the attention backend decides on the host is frozen at capture (see triton_paged.py):
graphs are captured with max_query_len 1 and max_seq_len = max_model_len, so the split-KV
choice suits the longest contexts and stays correct for any shorter ones. The block table
has a fixed width (max blocks per request for max_model_len). Mixed and prefill steps, and
decode steps larger than the largest bucket, run eagerly. Graphs are captured largest first,
so the smaller ones reuse the pool the largest one sized.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from sluice.worker.step_buffers import StepBuffers

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, multiples of 8 below 256, of 16 below 512, of 32 up to 1024; the largest is
    max_num_seqs, always included.

    vLLM stops at 512; here eager decode steps past 512 requests were host-bound on the H100
    (the launches of an eager L8 forward take longer than its ~25 ms of GPU work).
    """
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, 512, 16)) + list(range(512, 1025, 32))
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    """Captured decode graphs; ``run(num_reqs)`` replays the bucket that holds num_reqs requests."""

    def __init__(self, model: torch.nn.Module, buffers: StepBuffers, sizes: list[int], max_seq_len: int) -> None:
        if not sizes or sizes[-1] > buffers.max_num_reqs:
            raise ValueError(f"sizes must be non-empty and at most max_num_reqs {buffers.max_num_reqs}, got {sizes}")
        self.model = model
        self.buffers = buffers
        self.sizes = sorted(sizes)
        self.max_seq_len = max_seq_len
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.num_replays = 0

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def bucket_for(self, num_reqs: int) -> int | None:
        """Smallest captured size >= num_reqs, or None when the step is larger than every bucket."""
        i = bisect.bisect_left(self.sizes, num_reqs)
        return self.sizes[i] if i < len(self.sizes) else None

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):
            metadata = self.buffers.decode_metadata(size, self.max_seq_len)
            input_ids, positions = self.buffers.input_ids[:size], self.buffers.positions[:size]
            self.buffers.fill_dummy_decode(size)
            # Warm-up outside the graph (Triton compiles, cuBLAS picks its kernels), on the capture stream.
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.model(input_ids, positions, metadata)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._outputs[size] = self.model(input_ids, positions, metadata)
            self._graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d CUDA graphs for decode batch sizes %d..%d in %.1f s",
                    len(self._graphs), self.sizes[0], self.sizes[-1], self.capture_seconds)

    def run(self, bucket: int) -> torch.Tensor:
        """Replays the graph of ``bucket`` over the current buffer contents; hidden [bucket, H]."""
        self._graphs[bucket].replay()
        self.num_replays += 1
        return self._outputs[bucket]

"""CUDA graphs: decode steps per batch-size bucket (DecodeGraphs), steps with prompt chunks per token-count bucket
(MixedGraphs, below), all sharing one memory pool.

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
has a fixed width (max blocks per request for max_model_len). Steps with prefill chunks of up
to 1024 tokens replay ``MixedGraphs`` (keyed by token count, see below); larger ones run
eagerly. Mixed steps split KV only when a context is long, so there are two sets of mixed
graphs: one captured just below that length (no split), and, when max_model_len reaches it,
one captured at max_model_len (split) for steps with a long context. Graphs are captured
largest first, so the smaller ones reuse the pool the largest one sized; all sets share it.
"""
from __future__ import annotations

import bisect
import logging
import time

import torch

from sluice.attention.backend import AttentionMetadata
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
    kind = "decode batch sizes"

    def __init__(self, model: torch.nn.Module, buffers: StepBuffers, sizes: list[int], max_seq_len: int,
                 kind: str | None = None) -> None:
        """``kind`` names the set in the capture log (default: the class's)."""
        limit = self._max_size(buffers)
        if not sizes or sorted(sizes)[-1] > limit:
            raise ValueError(f"sizes must be non-empty and at most {limit}, got {sizes}")
        self.model = model
        self.buffers = buffers
        self.sizes = sorted(sizes)
        self.max_seq_len = max_seq_len
        if kind is not None:
            self.kind = kind
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.num_replays = 0

    @staticmethod
    def _max_size(buffers: StepBuffers) -> int:
        return buffers.max_num_reqs

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def bucket_for(self, size: int) -> int | None:
        """Smallest captured size >= size, or None when the step is larger than every bucket."""
        i = bisect.bisect_left(self.sizes, size)
        return self.sizes[i] if i < len(self.sizes) else None

    def num_reqs_for(self, bucket: int) -> int:
        """How many requests the graph of ``bucket`` holds."""
        return bucket

    def _max_query_len(self, bucket: int) -> int:
        return 1

    def _dummy_inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Fills the buffers with harmless inputs for ``size`` and returns the views a graph reads."""
        num_reqs = self.num_reqs_for(size)
        self.buffers.fill_dummy(size, num_reqs, self.max_seq_len)
        return (self.buffers.input_ids[:size], self.buffers.positions[:size],
                self.buffers.graph_metadata(size, num_reqs, self._max_query_len(size), self.max_seq_len))

    @torch.inference_mode()
    def capture(self, pool: tuple | None = None) -> tuple:
        """Captures every size, largest first; returns the memory pool (another set may share it)."""
        start = time.perf_counter()
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):
            input_ids, positions, metadata = self._dummy_inputs(size)
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
        logger.info("captured %d CUDA graphs for %s %d..%d in %.1f s",
                    len(self._graphs), self.kind, self.sizes[0], self.sizes[-1], self.capture_seconds)
        return pool

    def run(self, bucket: int) -> torch.Tensor:
        """Replays the graph of ``bucket`` over the current buffer contents; hidden [bucket, H]."""
        self._graphs[bucket].replay()
        self.num_replays += 1
        return self._outputs[bucket]


# Steps with prefill chunks of at most this many tokens replay a graph; larger ones keep the GPU
# busy long enough (~25 ms for L8 at 1024 tokens) for eager launches to stay ahead of it.
MIXED_CAPTURE_SIZES = (16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


def mixed_capture_sizes(max_num_tokens: int) -> list[int]:
    return [s for s in MIXED_CAPTURE_SIZES if s <= max_num_tokens]


class MixedGraphs(DecodeGraphs):
    """Graphs for steps with prefill chunks, keyed by the step's token count.

    The graph of T tokens holds up to R = min(T, max_num_seqs) requests; a step of n <= T tokens
    and r <= R requests pads tokens (id 0, slot -1: no KV write) and requests (empty queries):

        T = 16, step: A decodes 1, B prefills 6        query_start_loc [0 1 7 7 7 ... 7]  (R + 1 entries)
        tokens 7..15 are padding, requests 2..R-1 are empty; the attention kernel's grid
        (T // BLOCK_Q + R programs) covers any such step, and its programs find their request
        on the device, so nothing the host decided at capture depends on the step's shape.
    """
    kind = "steps with prefill chunks, tokens"

    @staticmethod
    def _max_size(buffers: StepBuffers) -> int:
        return buffers.max_num_tokens

    def num_reqs_for(self, bucket: int) -> int:
        return min(bucket, self.buffers.max_num_reqs)

    def _max_query_len(self, bucket: int) -> int:
        # A step of this size may be one chunk of them all: the attention backend sizes its row tile for that.
        return max(2, bucket)

"""Host KV blocks and the copies between them and the device KV cache (swap preemption, the host prefix tier).

The scheduler decides which blocks move (core/kv_offload.py, ``SchedulerOutput.kv_transfers``); this runs the
copies before the step's forward. The host cache keeps one block of every layer contiguous, so each block moves
in one copy:

    host_kv: [num_host_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]     (pinned on CUDA)
    device kv_cache[layer]: [2, num_blocks, block_size, num_kv_heads, head_dim]

On CUDA the transfers over the host link run on their own stream and the compute stream waits only for what
it reads, so with async scheduling a step's copies overlap the forward still running before it:

    host -> device   the copy stream moves the host blocks into a device staging buffer at once (nothing
                     queued on the compute stream touches either); the compute stream waits for that copy
                     and scatters the staging buffer into the KV cache (a device-local copy, in order after the
                     previous forward, which may still read those blocks: a victim's freed ones)
    device -> host   the compute stream gathers the blocks (after the work queued before them: a victim's last
                     step may still be writing its KV); the copy stream moves the gathered buffer to the host
                     once the gather is done, and the compute stream goes on at once

On the compute stream the gather comes before the scatter, so a device block freed by a victim can be refilled
in the same step. On the copy stream a step's host->device copy goes before its device->host one (it does not
wait for the gather); the two never touch the same host block in one step (core/kv_offload.py), and across steps
the copy stream keeps them in order. On the CPU they are plain copies. They move bytes: an fp8 cache is copied
through uint8 views of the same shape (torch has no float8 index_copy_ on the CPU), and its host blocks are half
the size of a 16-bit cache's.
"""
from __future__ import annotations

import contextlib
import time

import torch

from sluice.core.kv_offload import KVTransfers, PreemptionCosts
from sluice.worker.kv_cache import KVCacheSpec, zeros


class KVSwapper:
    def __init__(self, spec: KVCacheSpec, num_host_blocks: int, kv_caches: list[torch.Tensor],
                 device: torch.device) -> None:
        self.device = device
        self.kv_caches = [_as_bytes(kv) for kv in kv_caches]
        shape = (num_host_blocks, spec.num_layers, 2, spec.block_size, spec.num_kv_heads, spec.head_dim)
        host_dtype = self.kv_caches[0].dtype if self.kv_caches else spec.dtype
        self.host_kv = (torch.zeros(shape, dtype=host_dtype, pin_memory=True) if device.type == "cuda"
                        else zeros(shape, host_dtype, device))
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run(self, transfers: KVTransfers) -> None:
        """Queues the step's copies: device->host, then host->device, as the compute stream sees them."""
        staged = loaded = None
        if transfers.host_to_device:
            staged, loaded = self._stage(transfers.host_to_device)
        if transfers.device_to_host:
            self._device_to_host(transfers.device_to_host)
        if staged is not None:
            if loaded is not None:  # CUDA: the compute stream waits for the transfer alone
                torch.cuda.current_stream(self.device).wait_event(loaded)
            self._scatter(transfers.host_to_device, staged)

    def _device_to_host(self, pairs: list[tuple[int, int]]) -> None:
        """Gathers the blocks on the current stream; on CUDA the copy stream moves them once they are gathered."""
        device_ids = self._index([d for d, _ in pairs])
        # [n, layers, 2, block_size, heads, head_dim]: each block contiguous, one copy per run of host blocks.
        gathered = torch.stack([kv.index_select(1, device_ids) for kv in self.kv_caches], dim=0)
        gathered = gathered.permute(2, 0, 1, 3, 4, 5).contiguous()
        cuda = self.copy_stream is not None
        if cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            gathered.record_stream(self.copy_stream)
        with torch.cuda.stream(self.copy_stream) if cuda else contextlib.nullcontext():
            for start, host, length in _host_runs([h for _, h in pairs]):
                self.host_kv[host:host + length].copy_(gathered[start:start + length], non_blocking=cuda)

    def _stage(self, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """The host blocks, in order, in one device buffer. On CUDA the copy stream fills it at once, in memory
        of its own (no forward queued on the compute stream uses it), and the event marks the transfer done."""
        cuda = self.copy_stream is not None
        with torch.cuda.stream(self.copy_stream) if cuda else contextlib.nullcontext():
            staged = torch.empty((len(pairs),) + tuple(self.host_kv.shape[1:]), dtype=self.host_kv.dtype,
                                 device=self.device)
            for start, host, length in _host_runs([h for h, _ in pairs]):
                staged[start:start + length].copy_(self.host_kv[host:host + length], non_blocking=cuda)
        if not cuda:
            return staged, None
        staged.record_stream(torch.cuda.current_stream(self.device))
        return staged, self.copy_stream.record_event()

    def _scatter(self, pairs: list[tuple[int, int]], staged: torch.Tensor) -> None:
        device_ids = self._index([d for _, d in pairs])
        for layer, kv in enumerate(self.kv_caches):
            kv.index_copy_(1, device_ids, staged[:, layer].transpose(0, 1))

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        """Block ids on the device, through pinned memory on CUDA (a copy from a list would wait for the
        stream)."""
        ids = torch.tensor(block_ids, dtype=torch.long, pin_memory=self.copy_stream is not None)
        return ids.to(self.device, non_blocking=True)


def _as_bytes(kv_cache: torch.Tensor) -> torch.Tensor:
    """A float8 cache as uint8 (the same storage and shape); any other cache as it is."""
    return kv_cache.view(torch.uint8) if kv_cache.element_size() == 1 and kv_cache.is_floating_point() else kv_cache


def _host_runs(host_ids: list[int]) -> list[tuple[int, int, int]]:
    """(index into host_ids, first host block, length) of each run of consecutive host block ids: one copy each.

        host_ids [4, 5, 6, 9, 10] -> [(0, 4, 3), (3, 9, 2)]
    """
    runs: list[tuple[int, int, int]] = []
    for i, host in enumerate(host_ids):
        if runs and runs[-1][1] + runs[-1][2] == host:
            start, first, length = runs[-1]
            runs[-1] = (start, first, length + 1)
        else:
            runs.append((i, host, 1))
    return runs


def measure_preemption_costs(spec: KVCacheSpec, num_parameters: int, num_attention_heads: int,
                             device: torch.device, compute_dtype: torch.dtype | None = None) -> PreemptionCosts:
    """Times a square matmul in the model's dtype (default: the KV dtype) and a host<->device copy (a host
    memcpy on the CPU): the rates the scheduler weighs recompute against swap with."""
    n = 4096 if device.type == "cuda" else 256  # large enough on a GPU that launch overhead does not count
    dtype = compute_dtype or spec.dtype
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    matmul_seconds = _timed(lambda: a @ b, device)
    num_bytes = 32 << 20
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    target = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    copy_seconds = _timed(lambda: target.copy_(host, non_blocking=True), device)
    return PreemptionCosts(
        flops_per_token=2.0 * num_parameters,
        attention_flops_per_token_pair=4.0 * spec.num_layers * num_attention_heads * spec.head_dim,
        matmul_flops_per_s=2.0 * n ** 3 / matmul_seconds,
        bytes_per_block=spec.bytes_per_block,
        copy_bytes_per_s=num_bytes / copy_seconds)


def _timed(fn, device: torch.device, repeats: int = 5) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return max((time.perf_counter() - start) / repeats, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

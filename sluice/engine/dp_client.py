"""DPClient: data parallelism, the EngineCoreClient (engine/client.py) of N engine cores, each a whole replica.

    LLMEngine / AsyncLLM --> DPClient --PrefixRouter: which core?--> MPClient 0 --ZMQ--> engine core 0 (GPUs 0..TP-1)
                                                                   MPClient 1 --ZMQ--> engine core 1 (GPUs TP..2TP-1)
                                                                   ...

Each core is the single-core process of core_proc.py, started with its own devices (``CUDA_VISIBLE_DEVICES``,
core i takes GPUs ``i*TP .. (i+1)*TP - 1`` of those visible) or, on the CPU, its share of the threads
(``SLUICE_CPU_THREADS``). A request goes to one core for life: its aborts and stops follow it there, its n > 1
children go with it (they share its prompt). The router (PrefixRouter) sends requests that share a prompt prefix
to the core that already holds that prefix's KV blocks: consistent hashing of the prompt's first block (as vLLM's
router does), so a core's prefix cache keeps serving the same prefixes and adding or losing a core moves only its
share of them; unless that core is much more loaded than the least loaded one (queued and running requests, as the
cores report them in their stats and as this client counts its own in flight), when the least loaded core gets it.

``step()`` polls every core's output socket and exit handle at once and steps the cores that answered, so a
quiet core never holds up a busy one. ``make_stats()`` sums the cores' stats (``per_core_stats()`` keeps them
apart); under ``sluice serve`` each core writes its own scheduler series, labelled ``engine="<i>"``.

Two ways to get one: ``DPClient.spawn(config)`` starts the N cores (``LLM(data_parallel_size=N)``), and
``DPClient.attach(config, attachments)`` joins cores that the API server pool started (every API server is a
client of every core, so any of them may route any request to any core).
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import os
import weakref
from collections.abc import Iterable, Sequence
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

import zmq

from sluice.config import EngineConfig
from sluice.core.interface import EngineCoreOutput
from sluice.core.request import Request
from sluice.engine.core_client import MPClient, spawn_engine_core
from sluice.engine.core_proc import CoreAddresses
from sluice.engine.cpu_threads import ENV_CPU_THREADS, default_cpu_threads
from sluice.stats import KVCacheEvents, SchedulerStats

if TYPE_CHECKING:
    from sluice.engine.client import CoreAttachment

VIRTUAL_NODES_PER_CORE = 64  # points per core on the hash ring: shares within a few percent of 1/N
PREFIX_BLOCKS = 1  # prompt blocks hashed for affinity: requests sharing these land on one core
# A prefix's core is passed over when it has this many more requests queued and running than the least loaded
# core, and also BALANCE_REL_THRESHOLD times as many (vLLM router's cache-aware defaults: 32 and 1.5).
BALANCE_ABS_THRESHOLD = 32
BALANCE_REL_THRESHOLD = 1.5
KV_FULL_THRESHOLD = 0.95  # a prefix's core whose KV cache is this full is passed over for one with room


def core_env(config: EngineConfig, index: int, inherited: dict[str, str] | None = None) -> dict[str, str]:
    """The environment core ``index`` of ``config.parallel.data_parallel_size`` is started with: its own GPUs on
    CUDA, its share of the CPU threads otherwise (unless ``--cpu-threads`` names the count per core)."""
    inherited = os.environ if inherited is None else inherited
    num_cores = config.parallel.data_parallel_size
    if config.device.type == "cuda":
        tp = config.parallel.tensor_parallel_size
        visible = inherited.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(num_cores * tp)]
        mine = devices[index * tp:(index + 1) * tp]
        if len(mine) < tp:
            raise ValueError(f"data_parallel_size {num_cores} x tensor_parallel_size {tp} needs "
                             f"{num_cores * tp} GPUs; {len(devices)} visible")
        return {"CUDA_VISIBLE_DEVICES": ",".join(mine)}
    if config.model.cpu_threads is not None or inherited.get(ENV_CPU_THREADS):
        return {}  # the count was given per process
    return {ENV_CPU_THREADS: str(max(1, default_cpu_threads() // num_cores))}


class PrefixRouter:
    """Picks a core for each request: prefix affinity by consistent hashing, unless that core is overloaded."""

    def __init__(self, num_cores: int, block_size: int) -> None:
        self.num_cores, self.block_size = num_cores, block_size
        points = sorted((_hash64(f"core-{core}-{v}".encode()), core)
                        for core in range(num_cores) for v in range(VIRTUAL_NODES_PER_CORE))
        self._ring_hashes = [h for h, _ in points]
        self._ring_cores = [core for _, core in points]

    def affinity(self, request: Request) -> int:
        """The core that owns this request's prompt prefix on the ring."""
        prefix = request.prompt_token_ids[:self.block_size * PREFIX_BLOCKS]
        key = b",".join(str(t).encode() for t in prefix)
        if request.lora_request is not None:  # another adapter's KV is another prefix
            key += b"|" + request.lora_request.lora_name.encode()
        position = bisect.bisect(self._ring_hashes, _hash64(key)) % len(self._ring_hashes)
        return self._ring_cores[position]

    def choose(self, request: Request, loads: Sequence[int], kv_usages: Sequence[float]) -> int:
        """``loads``: each core's queued + running requests; ``kv_usages``: each core's KV cache use (0..1)."""
        core = self.affinity(request)
        least = min(range(self.num_cores), key=lambda c: (loads[c], kv_usages[c]))
        overloaded = (loads[core] - loads[least] > BALANCE_ABS_THRESHOLD
                      and loads[core] > BALANCE_REL_THRESHOLD * loads[least])
        kv_full = kv_usages[core] >= KV_FULL_THRESHOLD and kv_usages[least] < KV_FULL_THRESHOLD
        return least if overloaded or kv_full else core


class DPClient:
    """N engine cores behind one EngineCoreClient."""

    def __init__(self, config: EngineConfig, cores: list[MPClient]) -> None:
        """Use ``spawn`` or ``attach``."""
        self.cores = cores
        smallest = min(cores, key=lambda core: core.info.num_kv_blocks)  # what every core can take
        self.config, self.info = smallest.config, smallest.info
        self.router = PrefixRouter(len(cores), config.cache.block_size)
        self._owner: dict[str, int] = {}  # request id -> its core, while the core may still send outputs for it
        self._poller = zmq.Poller()
        self._handle_core: dict[object, int] = {}
        for index, core in enumerate(cores):
            for handle in core.poll_handles:
                self._poller.register(handle, zmq.POLLIN)
                self._handle_core[handle] = index
        self._last_parent: tuple[str | None, int] = (None, 0)  # the last request's parent id and core
        self.num_routed = [0] * len(cores)  # requests sent to each core (n > 1 children counted one by one)

    @classmethod
    def spawn(cls, config: EngineConfig) -> "DPClient":
        """Starts ``data_parallel_size`` cores (each waits for its model in parallel) and waits until all are ready."""
        started: list[tuple[CoreAddresses, BaseProcess]] = []
        clients: list[MPClient] = []
        try:
            for index in range(config.parallel.data_parallel_size):
                addresses = CoreAddresses.create(num_clients=1)
                process = spawn_engine_core(config, addresses, engine_index=index, env=core_env(config, index))
                started.append((addresses, process))
            for addresses, process in started:
                clients.append(MPClient.of_process(config, addresses, process))
        except BaseException:
            for client in clients:
                client.shutdown()
            for addresses, process in started:
                if process.is_alive():
                    process.kill()
                addresses.remove()
            raise
        client = cls(config, clients)
        # An offline LLM is seldom shut down by hand: the cores go when it is collected or the interpreter exits.
        weakref.finalize(client, _shutdown_all, clients)
        return client

    @classmethod
    def attach(cls, config: EngineConfig, attachments: Sequence[CoreAttachment]) -> "DPClient":
        """Joins cores another process started (the API server pool): one attachment per core."""
        clients: list[MPClient] = []
        try:
            for attachment in attachments:
                clients.append(MPClient.attach(config, attachment.addresses, attachment.index,
                                               attachment.core_pid))
        except BaseException:
            for client in clients:
                client.shutdown()
            raise
        return cls(config, clients)

    # ---- routing -------------------------------------------------------------------------------------------------
    def core_loads(self) -> list[int]:
        """Each core's queued and running requests: what it last reported (every client's requests), or what this
        client has in flight there when that is more (its reports lag its own new requests)."""
        return [max(core.latest_stats.num_running_reqs + core.latest_stats.num_waiting_reqs, core.num_unfinished)
                for core in self.cores]

    def add_request(self, request: Request) -> None:
        parent = request.parent_request_id
        if parent is not None and self._last_parent[0] == parent:
            index = self._last_parent[1]  # the front end adds an n > 1 request's children one after another
        else:
            kv_usages = [core.latest_stats.kv_cache_usage for core in self.cores]
            index = self.router.choose(request, self.core_loads(), kv_usages)
        self._last_parent = (parent, index)
        self.cores[index].add_request(request)
        self._owner[request.request_id] = index
        self.num_routed[index] += 1

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        for index, ids in self._by_core(request_ids).items():
            self.cores[index].abort_requests(ids)

    def stop_requests(self, request_ids: Iterable[str]) -> None:
        for index, ids in self._by_core(request_ids).items():
            self.cores[index].stop_requests(ids)

    def _by_core(self, request_ids: Iterable[str]) -> dict[int, list[str]]:
        by_core: dict[int, list[str]] = {}
        for request_id in request_ids:
            index = self._owner.pop(request_id, None)
            if index is not None:
                by_core.setdefault(index, []).append(request_id)
        return by_core

    # ---- stepping ------------------------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return any(core.has_unfinished_requests() for core in self.cores)

    def step(self) -> list[EngineCoreOutput]:
        """The outputs every core sent since the last call: waits for the first core to answer while requests are
        in flight; a core with none in flight is stepped at once (it waits only for its last commands to apply)."""
        waiting = self.has_unfinished_requests()
        answered = {self._handle_core[h] for h, _ in self._poller.poll(None if waiting else 0)}
        outputs: list[EngineCoreOutput] = []
        for index, core in enumerate(self.cores):
            if index in answered or not core.has_unfinished_requests():
                outputs.extend(core.step())
        for output in outputs:
            if output.finish_reason is not None:
                self._owner.pop(output.req_id, None)
        return outputs

    def make_stats(self) -> SchedulerStats:
        """The cores' stats summed (KV cache usage averaged)."""
        return merge_scheduler_stats([core.make_stats() for core in self.cores])

    def per_core_stats(self) -> list[SchedulerStats]:
        """Each core's stats as it last reported them."""
        return [core.latest_stats for core in self.cores]

    # ---- health and lifecycle ------------------------------------------------------------------------------------
    def check_health(self) -> None:
        for core in self.cores:
            core.check_health()

    def shutdown(self) -> None:
        _shutdown_all(self.cores)


def _shutdown_all(cores: list[MPClient]) -> None:
    for core in cores:
        core.shutdown()


def merge_scheduler_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    """Counts and cumulative totals summed over the cores, KV cache usage averaged, per-step events joined."""
    merged = SchedulerStats(
        num_running_reqs=sum(s.num_running_reqs for s in stats),
        num_waiting_reqs=sum(s.num_waiting_reqs for s in stats),
        kv_cache_usage=sum(s.kv_cache_usage for s in stats) / len(stats),
        prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
        num_preemptions=sum(s.num_preemptions for s in stats),
        num_waiting_for_capacity=sum(s.num_waiting_for_capacity for s in stats))
    events = [s.kv_cache_events for s in stats if s.kv_cache_events is not None]
    if events:
        merged.kv_cache_events = KVCacheEvents()
        for other in events:
            merged.kv_cache_events.extend(other)
    offloads = [s.kv_offload for s in stats if s.kv_offload is not None]
    if offloads:
        merged.kv_offload = dataclasses.replace(offloads[0], **{
            f.name: sum(getattr(o, f.name) for o in offloads) for f in dataclasses.fields(offloads[0])
            if isinstance(getattr(offloads[0], f.name), (int, float))})
    merged.lora = next((s.lora for s in stats if s.lora is not None), None)
    return merged


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")

"""``--distributed-executor-backend ray``: ranks 1..N-1 of tensor parallelism as Ray actors.

    engine-core process (a Ray driver)             Ray actors, one placement-group bundle each
    RayExecutor (executor.TPExecutor)              RankActor.run(address, token, rank)
      rank 0 ModelRunner                             connects, sends token + rank, then serves exactly
      socket server on 127.0.0.1 <---------------    as a worker process does (worker.serve_rank):
      each step: pickled SchedulerOutput -------->   set-up calls answered, steps not
      watchdog: ray.wait on every actor's run ref (ready once the actor dies or its rank fails)

The placement group holds one bundle per rank, rank 0's included ({"GPU": 1} on CUDA, {"CPU": 1} on the
CPU), packed (STRICT_PACK) on the node of this process: the TCP store of the TP group and the sockets are on
loopback. On
CUDA the actors see every GPU of the node (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES) and rank r uses
device r, as with the mp backend. Ray is joined when this process already initialised it or RAY_ADDRESS
names a cluster; otherwise a local instance is started here and shut down with the engine.
"""
from __future__ import annotations

import os
import socket
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from sluice.distributed.executor import RankHandle, TPExecutor, TPWorkerDiedError
from sluice.distributed.parallel_state import NCCL_ENV_DEFAULTS

PLACEMENT_TIMEOUT_S = 60.0  # for the placement group's resources to be free
CONNECT_TIMEOUT_S = 120.0  # for every actor to start (a fresh Python process importing torch) and connect
_RANK_BYTES = 4


class RankActor:
    """The body of each rank's actor (made a Ray actor class by ``ray.remote`` when an executor starts)."""

    def run(self, address: tuple[str, int], token: bytes, rank: int) -> None:
        from sluice.distributed.worker import serve_rank

        conn = Connection(socket.create_connection(address).detach())
        conn.send_bytes(token + rank.to_bytes(_RANK_BYTES, "little"))
        try:
            serve_rank(conn, standalone=False)
        finally:
            conn.close()


class _ActorRank(RankHandle):
    """One rank's actor, its ``run`` task (the health ref) and, once it has connected, the socket to it."""

    def __init__(self, rank: int, actor: Any, run_ref: Any) -> None:
        self.rank = rank
        self.actor = actor
        self.run_ref = run_ref
        self.conn: Connection | None = None  # type: ignore[assignment]
        self.status: str | None = None  # how ``run`` ended, once it has
        self.watched = False  # the watchdog waits on ``run_ref`` and records its end

    @property
    def where(self) -> str:
        return f"Ray actor {self.actor._actor_id.hex()[:12]}"

    def exit_status(self) -> str | None:
        """Asks Ray (about 0.1 ms) until the watchdog takes over; from then on what the watchdog recorded, so
        that a step pays nothing (the socket's end shows a dead actor to ``_check_workers`` at once anyway)."""
        if self.status is None and not self.watched:
            self.settle(timeout_s=0)
        return self.status

    def settle(self, timeout_s: float | None) -> bool:
        """Records how the actor's ``run`` ended, waiting up to ``timeout_s`` for it; False while it runs."""
        import ray

        ready, _ = ray.wait([self.run_ref], timeout=timeout_s)
        if not ready:
            return False
        try:
            ray.get(self.run_ref)
            self.status = "stopped"
        except ray.exceptions.RayActorError:
            self.status = "died (its Ray actor was killed or its process exited)"
        except ray.exceptions.RayError as exc:
            self.status = f"failed: {str(exc).strip().splitlines()[-1]}"
        return True

    def describe_exit(self) -> str:
        if self.status is None:
            self.settle(timeout_s=2.0)  # its socket closed: Ray learns of the actor's end within moments
        return super().describe_exit()

    def stop(self, timeout_s: float) -> None:
        import ray

        try:
            self.settle(timeout_s=max(0.1, timeout_s))
        finally:
            ray.kill(self.actor)
            if self.conn is not None:
                self.conn.close()


class RayExecutor(TPExecutor):
    """Ranks 1..N-1 as Ray actors in a placement group; everything after start-up is TPExecutor's."""

    _owns_ray = False
    _placement_group: Any = None

    def _start_workers(self, config: Any, world_size: int, init_method: str) -> list[RankHandle]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._owns_ray = _connect_ray(world_size)
        on_cuda = config.model.device == "cuda"
        self._placement_group = _reserve_bundles(world_size, {"GPU": 1} if on_cuda else {"CPU": 1})
        actor_class = ray.remote(RankActor)
        env_vars = _actor_env_vars(on_cuda)
        server = socket.create_server(("127.0.0.1", 0))
        server.settimeout(0.5)
        token = os.urandom(16)
        workers: list[_ActorRank] = []
        self._workers = workers  # shutdown stops whatever started, should connecting fail
        try:
            for rank in range(1, world_size):
                strategy = PlacementGroupSchedulingStrategy(self._placement_group, placement_group_bundle_index=rank)
                actor = actor_class.options(num_cpus=0 if on_cuda else 1, num_gpus=1 if on_cuda else 0,
                                            scheduling_strategy=strategy,
                                            runtime_env={"env_vars": env_vars}).remote()
                workers.append(_ActorRank(rank, actor, actor.run.remote(server.getsockname(), token, rank)))
            _accept_connections(server, token, workers)
        finally:
            server.close()
        for worker in workers:
            worker.conn.send((config, worker.rank, world_size, init_method, None))
        return list(workers)

    def _wait_for_an_exit(self) -> RankHandle | None:
        import ray

        runs = {worker.run_ref: worker for worker in self._workers}
        for worker in runs.values():
            worker.watched = True
        while not self._closing:
            try:
                ready, _ = ray.wait(list(runs), num_returns=1, timeout=0.5)
            except Exception:  # noqa: BLE001 - Ray shut down under the watchdog: nothing left to watch
                return None
            if ready:
                runs[ready[0]].settle(timeout_s=None)
                return runs[ready[0]]
        return None

    def _release(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if not ray.is_initialized():
            return
        if self._placement_group is not None:
            remove_placement_group(self._placement_group)
            self._placement_group = None
        if self._owns_ray:
            ray.shutdown()

    @property
    def worker_actors(self) -> list[Any]:
        """The actors of ranks 1..N-1, in rank order."""
        return [worker.actor for worker in self._workers]


def _connect_ray(world_size: int) -> bool:
    """Joins the Ray of this process, of RAY_ADDRESS, or a local one started here (then True: ours to stop)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(num_cpus=max(world_size, os.cpu_count() or 1), include_dashboard=False)
    return True


def _reserve_bundles(world_size: int, bundle: dict[str, float]) -> Any:
    """One bundle per rank on this node: rank 0's bundle asks for a sliver of this node's own resource, and
    STRICT_PACK puts the others beside it (the ranks meet on loopback)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    this_node = {f"node:{ray.util.get_node_ip_address()}": 0.001}
    bundles = [{**bundle, **this_node}] + [dict(bundle) for _ in range(1, world_size)]
    group = placement_group(bundles, strategy="STRICT_PACK")
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(f"tensor_parallel_size {world_size} needs {world_size} x {bundle} on this Ray node; "
                           f"none freed within {PLACEMENT_TIMEOUT_S:.0f} s (available: {ray.available_resources()})")
    return group


def _actor_env_vars(on_cuda: bool) -> dict[str, str]:
    package_root = str(Path(__file__).resolve().parents[2])
    env = {name: os.environ.get(name, value) for name, value in NCCL_ENV_DEFAULTS.items()}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    if on_cuda:
        env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"  # rank r uses device r, as with mp
    return env


def _accept_connections(server: socket.socket, token: bytes, workers: list[_ActorRank]) -> None:
    """Waits until every actor has connected with the token; an actor that ends first fails start-up."""
    pending = {worker.rank: worker for worker in workers}
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while pending:
        try:
            sock, _ = server.accept()
        except TimeoutError:
            for worker in pending.values():
                if worker.exit_status() is not None:
                    raise TPWorkerDiedError(worker.describe_exit() + " before connecting to rank 0") from None
            if time.monotonic() > deadline:
                raise TPWorkerDiedError(f"tensor-parallel worker ranks {sorted(pending)} did not connect to rank 0 "
                                        f"within {CONNECT_TIMEOUT_S:.0f} s") from None
            continue
        sock.settimeout(None)
        conn = Connection(sock.detach())
        try:
            hello = conn.recv_bytes(len(token) + _RANK_BYTES) if conn.poll(5.0) else b""
        except (EOFError, OSError):
            hello = b""
        rank = int.from_bytes(hello[len(token):], "little")
        if hello[:len(token)] != token or rank not in pending:
            conn.close()  # not one of ours
            continue
        pending.pop(rank).conn = conn


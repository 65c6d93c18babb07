"""Run cache shards on Ray: plain actors, one per teacher replica, fed from a shard queue.

Placement (``placement``) is read off the alive nodes' own resources, never the cluster's
total, which no single node may have: GPU actors take ``teacher.gpus_per_actor`` GPUs each
and are spread over the nodes; CPU actors are sized per node (by default one per node, with
that node's CPUs as torch threads) and pinned to it. A request no node holds fails at once,
naming the request and the largest node; on a cluster with an autoscaler the actors may
wait ``PLACEMENT_WAIT_S`` for a node to be added, then fail the same way.
Faults: actors are created with unlimited restarts; when one dies mid-shard (OOM, segfault,
a lost node) its shards go back to the front of the queue, up to ``cache.max_retries`` times
per shard, and run on whichever actor is free next: the dead one is not waited for (a lost
node never comes back). Ray restarts it where resources allow (reloading the teacher); a
ping tells when, and it then takes shards again. Each actor holds ``SHARDS_IN_FLIGHT``
shards: one running the teacher, one finishing its writes. The dead attempt left at most a
hidden temp file, never a visible shard. An exception raised by the shard code itself is a
bug or bad input, not a fault: it stops the job at once with its message.
The per-shard work is ``stages.cache.stage.CacheWorker.run_shard``, the same routine the
in-process ``LocalExecutor`` calls. Both executors live here: stages never import Ray.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import CacheConfig, TeacherConfig
from pipeline.errors import UserError, raise_if_stopped
from pipeline.storage import remote_for
from stages.cache.stage import SHARDS_IN_FLIGHT, CacheJob, CacheWorker
from stages.cache.writer import shard_name


class LocalExecutor:
    """Runs every shard in this process with one teacher replica (debugging, tests), overlapping
    shards as a Ray actor does (``SHARDS_IN_FLIGHT``); ``on_done`` runs on the calling thread."""

    def __init__(self, device: str = "cpu"):
        self.device = device

    def run(self, job: CacheJob, todo: list[int], on_done: Callable[[dict[str, Any]], None]) -> None:
        worker = CacheWorker(job, self.device)
        with ThreadPoolExecutor(max_workers=SHARDS_IN_FLIGHT, thread_name_prefix="shard") as pool:
            futures = [pool.submit(worker.run_shard, i) for i in todo[:SHARDS_IN_FLIGHT]]
            queue = list(todo[SHARDS_IN_FLIGHT:])
            try:
                while futures:
                    raise_if_stopped()
                    result = futures.pop(0).result()
                    if queue:
                        futures.append(pool.submit(worker.run_shard, queue.pop(0)))
                    on_done(result)
            finally:
                for f in futures:
                    f.cancel()


def make_cache_executor(teacher: TeacherConfig, cache: CacheConfig, address: str | None) -> "RayExecutor":
    """The Ray executor for ``address`` as ``cluster.local.resolve_address`` resolved it (None:
    an embedded Ray on 127.0.0.1). A cluster address is asked first, before the cache
    directory is touched: a refused token or nothing answering is one line."""
    from cluster.local import check_address

    check_address(address)
    return RayExecutor(address=address, teacher=teacher, max_retries=cache.max_retries)


class _CacheActor:
    """Ray actor body: one teacher replica. Creating it only places it (``ready`` answers as
    soon as Ray has found it a node); the teacher loads on ``load`` or the first shard, also
    after Ray restarted the actor elsewhere, so placement can be waited for within a bound
    while loading a large teacher takes as long as it takes."""

    def __init__(self, job: Any, device: str, threads: int | None):
        import threading

        self.job, self.device, self.threads = job, device, threads
        self.worker: CacheWorker | None = None
        self.cache = remote_for(job.cache_dir)
        self._loading = threading.Lock()

    def ready(self) -> str:
        """The id of the node this replica runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def load(self) -> str:
        with self._loading:
            if self.worker is None:
                # On a node without the driver's disk, a bucket-backed pack is pulled into this
                # node's scratch (a no-op where it is already there).
                if (pack := remote_for(self.job.pack_dir)) is not None:
                    pack.pull()
                self.worker = CacheWorker(self.job, device=self.device, threads=self.threads)
        return self.ready()

    def run_shard(self, index: int) -> dict[str, Any]:
        self.load()
        assert self.worker is not None
        result = self.worker.run_shard(index)
        if self.cache is not None:  # published by the node that wrote it: nothing waits on the driver's disk
            name = shard_name(index)
            self.cache.upload_file(Path(self.job.cache_dir) / name, name)
        return result


@dataclass(frozen=True)
class Slot:
    """One teacher actor: what it asks of Ray, the node it is meant for (CPU actors: its
    threads are that node's CPUs, so it must land there), its torch threads."""

    request: dict[str, float]  # {"CPU": n, "GPU": g}
    node: str | None = None
    threads: int | None = None


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"'{k}': {v:g}" for k, v in sorted(resources.items())) + "}"


def alive_nodes() -> list[dict[str, Any]]:
    """{"id", "CPU", "GPU"} of every node Ray reports alive."""
    import ray

    return [{"id": n["NodeID"], "CPU": float(n["Resources"].get("CPU", 0.0)),
             "GPU": float(n["Resources"].get("GPU", 0.0))} for n in ray.nodes() if n.get("Alive")]


def unplaceable(request: dict[str, float], nodes: list[dict[str, Any]], what: str) -> UserError:
    """The one line for a teacher actor no node can hold: the request and the largest node."""
    key = lambda n: tuple(n.get(r, 0.0) for r in sorted(request, reverse=True))  # noqa: E731  GPU first
    largest = max(nodes, key=key) if nodes else None
    has = (f"the largest of the {len(nodes)} alive node(s) has {_fmt({r: largest.get(r, 0.0) for r in request})}"
           if largest else "no node is alive")
    return UserError(f"cache: no node can hold a teacher actor of {_fmt(request)} ({what}): {has}")


def autoscaling() -> bool:
    """Whether an autoscaler may add a node to the cluster. ``ray start --head`` alone runs a
    read-only one, whose only node types are the nodes that are there (``node_<id>``); one
    with a cluster config (``ray up``, KubeRay) names its types, or runs as autoscaler v2."""
    import json

    from ray._private import ray_constants
    from ray.experimental import internal_kv

    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        raw = internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        types = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") or {} if raw else {}
    except Exception:  # no GCS client, or a status of another shape: nothing to wait for
        return False
    return any(kind != f"node_{node}" for node, kind in types.items())


def placement(nodes: list[dict[str, Any]], teacher: TeacherConfig, shards: int,
              may_grow: bool = False) -> tuple[list[Slot], str]:
    """The teacher actors for the cluster's alive ``nodes`` ({"id", "CPU", "GPU"}) and the
    device they run on. GPU actors (``teacher.gpus_per_actor`` > 0, or unset on a cluster with
    GPUs, then 1) take that many GPUs and one CPU each: ``teacher.num_actors``, else as many as
    the nodes hold. CPU actors are sized per node: by default one per node, its threads that
    node's CPUs; ``teacher.num_actors`` go one to each node first, the rest where they get
    the most CPUs, each node's CPUs split among its actors. Never
    more actors than shards. A request that no node holds is a UserError naming it and the
    largest node (never an actor Ray would wait on forever), unless ``may_grow`` (an
    autoscaler may add a node: the actors' demand is what makes it add one)."""
    per_gpu = teacher.gpus_per_actor
    if per_gpu is None:
        per_gpu = 1.0 if any(n["GPU"] > 0 for n in nodes) else 0.0
    shards = max(1, shards)
    if per_gpu > 0:
        request = {"CPU": 1.0, "GPU": per_gpu}
        fits = sum(int(min(n["GPU"] // per_gpu, n["CPU"])) for n in nodes)
        if fits == 0 and not may_grow:
            raise unplaceable(request, nodes, "teacher.gpus_per_actor")
        return [Slot(request) for _ in range(min(teacher.num_actors or max(fits, 1), shards))], "cuda"
    cpus = {n["id"]: int(n["CPU"]) for n in nodes if n["CPU"] >= 1}
    if not cpus:
        raise unplaceable({"CPU": 1.0}, nodes, "a CPU teacher actor")
    want = min(teacher.num_actors or len(cpus), shards)
    per_node = dict.fromkeys(cpus, 0)
    for _ in range(want):  # the next actor: to a node without one first, else where it gets the most CPUs
        best = max(cpus, key=lambda i: (per_node[i] == 0, cpus[i] // (per_node[i] + 1), cpus[i]))
        if cpus[best] < per_node[best] + 1:
            raise UserError(f"teacher.num_actors: {teacher.num_actors} CPU actors need a CPU each; the "
                            f"{len(cpus)} alive node(s) have {sum(cpus.values())} CPUs")
        per_node[best] += 1
    slots = []
    for node, k in per_node.items():
        threads = cpus[node] // k if k else 0
        slots += [Slot({"CPU": float(threads)}, node, threads) for _ in range(k)]
    return slots, "cpu"


PLACEMENT_WAIT_S = 300.0  # how long teacher actors may wait for a node (an autoscaler adding one)


class RayExecutor:
    def __init__(self, address: str | None, teacher: TeacherConfig, max_retries: int = 3, poll_s: float = 1.0):
        self.address, self.teacher, self.max_retries, self.poll_s = address, teacher, max_retries, poll_s

    def run(self, job: Any, todo: list[int], on_done: Callable[[dict[str, Any]], None]) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from cluster.local import ray_session

        with ray_session(self.address):
            slots, device = placement(alive_nodes(), self.teacher, len(todo), may_grow=autoscaling())
            Actor = ray.remote(_CacheActor)
            # Two calls at once per actor (SHARDS_IN_FLIGHT): the next shard's forwards start
            # while the previous shard finishes writing; the worker's teacher lock orders them.
            # A CPU actor is meant for its node (soft: restarted elsewhere if that node is lost).
            actors = [Actor.options(num_cpus=s.request["CPU"], num_gpus=s.request.get("GPU", 0), max_restarts=-1,
                                    max_task_retries=0, max_concurrency=SHARDS_IN_FLIGHT,
                                    scheduling_strategy=NodeAffinitySchedulingStrategy(s.node, soft=True)
                                    if s.node else "SPREAD").remote(job, device, s.threads)
                      for s in slots]
            try:
                actors = self._wait_placed(actors, slots)
                self._wait_ready(actors)
                self._drive(actors, job, todo, on_done)
            finally:
                for a in actors:
                    ray.kill(a, no_restart=True)

    def _wait_placed(self, actors: list[Any], slots: list[Slot], timeout: float = PLACEMENT_WAIT_S) -> list[Any]:
        """The actors Ray has found a node for within ``timeout`` (the others are killed);
        none at all is a UserError naming the request and the largest node."""
        import ray

        pending = {a.ready.remote(): i for i, a in enumerate(actors)}
        placed: list[int] = []
        t0, said = time.monotonic(), False
        while pending and time.monotonic() - t0 < timeout:
            raise_if_stopped()
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=self.poll_s)
            for ref in done:
                i = pending.pop(ref)
                try:
                    ray.get(ref)
                    placed.append(i)
                except ray.exceptions.RayError as err:
                    raise _user_error(err, "teacher actor failed to start") from None
            if pending and not said and time.monotonic() - t0 > 10:
                print(f"cache: {len(pending)} teacher actor(s) of {_fmt(slots[next(iter(pending.values()))].request)} not placed yet; "
                      f"waiting up to {timeout:.0f} s for room on a node", flush=True)
                said = True
        if not placed:
            raise unplaceable(slots[0].request, alive_nodes(), f"waited {timeout:.0f} s")
        for i in pending.values():
            ray.kill(actors[i], no_restart=True)
        if pending:
            print(f"cache: {len(pending)} teacher actor(s) found no node within {timeout:.0f} s; "
                  f"going on with {len(placed)}", flush=True)
        return [actors[i] for i in sorted(placed)]

    def _wait_ready(self, actors: list[Any]) -> None:
        """Every placed actor loads its teacher (as long as that takes)."""
        import ray

        pending = [a.load.remote() for a in actors]
        nodes: list[str] = []
        while pending:
            raise_if_stopped()
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=self.poll_s)
            try:
                nodes += ray.get(done)
            except ray.exceptions.RayError as err:
                raise _user_error(err, "teacher actor failed to start") from None
        counts = collections.Counter(nodes)
        print(f"cache: {len(actors)} teacher actor(s) on {len(counts)} node(s): "
              + ", ".join(f"{node[:12]} x{k}" for node, k in counts.items()), flush=True)

    def _drive(self, actors: list[Any], job: Any, todo: list[int], on_done: Callable[[dict[str, Any]], None],
               restart_timeout: float = 600.0) -> None:
        """Keep every live actor ``SHARDS_IN_FLIGHT`` shards busy. A dead actor's shards are
        re-queued at once for the live ones; a ping to it (answered when Ray has restarted it)
        brings it back. Only when no actor is live for ``restart_timeout`` does the job fail."""
        import ray

        queue = collections.deque(todo)
        cache = remote_for(job.cache_dir)
        attempts: collections.Counter[int] = collections.Counter()
        busy = [0] * len(actors)  # shards in flight per actor
        down: dict[int, float] = {}  # actor -> when it was seen dead (a ping to it is in flight)
        shards: dict[Any, tuple[int, int]] = {}  # ref -> (actor, shard)
        pings: dict[Any, int] = {}  # ref -> actor
        while queue or shards:
            raise_if_stopped()
            while queue:
                live = [a for a in range(len(actors)) if a not in down and busy[a] < SHARDS_IN_FLIGHT]
                if not live:
                    break
                a = min(live, key=lambda i: busy[i])
                shard = queue.popleft()
                shards[actors[a].run_shard.remote(shard)] = (a, shard)
                busy[a] += 1
            if queue and not shards and down and time.monotonic() - min(down.values()) > restart_timeout:
                raise UserError(f"cache: no teacher actor came back within {restart_timeout:.0f} s after "
                                f"{len(down)} died (lost node?); {len(queue)} shard(s) left; re-run to finish them")
            ready, _ = ray.wait([*shards, *pings], num_returns=1, timeout=self.poll_s)
            for ref in ready:
                if ref in pings:
                    a = pings.pop(ref)
                    try:
                        node = ray.get(ref)
                        down.pop(a, None)
                        print(f"cache: teacher actor {a} is back (node {node[:12]})", flush=True)
                    except ray.exceptions.RayActorError:  # died again while restarting: ask again
                        pings[actors[a].ready.remote()] = a
                    continue
                a, shard = shards.pop(ref)
                busy[a] -= 1
                try:
                    result = ray.get(ref)
                    if cache is not None:  # the shard may have been written on another node
                        cache.fetch(shard_name(shard))
                    on_done(result)
                except ray.exceptions.RayActorError as err:  # the process or its node died
                    attempts[shard] += 1
                    if attempts[shard] > self.max_retries:
                        raise UserError(f"cache: shard {shard} failed {attempts[shard]} times (teacher actor died: "
                                        f"{str(err).splitlines()[0][:200]}); giving up (cache.max_retries="
                                        f"{self.max_retries})") from None
                    print(f"cache: teacher actor died on shard {shard}; retrying on a live actor "
                          f"(actor {a}; {attempts[shard]}/{self.max_retries})", flush=True)
                    queue.appendleft(shard)
                    if a not in down:
                        down[a] = time.monotonic()
                        pings[actors[a].ready.remote()] = a
                except ray.exceptions.RayTaskError as err:
                    raise _user_error(err, f"shard {shard} failed") from None


def _user_error(err: Exception, what: str) -> Exception:
    """Surface the original exception: a UserError keeps its message, anything else says what failed."""
    import re

    cause = getattr(err, "cause", None)
    if isinstance(cause, UserError):
        return UserError(str(cause))
    if isinstance(err, UserError):
        return err
    # An actor whose __init__ raised arrives as ActorDiedError carrying only the text.
    names, todo = {"UserError"}, [UserError]
    while todo:
        for sub in todo.pop().__subclasses__():
            names.add(sub.__name__)
            todo.append(sub)
    found = re.findall(r"(?:[\w]+\.)*(?:%s): ([^\n\"]+)" % "|".join(sorted(names)), str(err))
    if found:
        return UserError(found[-1].strip())
    return RuntimeError(f"cache: {what}: {str(err).strip().splitlines()[-1][:500] if str(err).strip() else err!r}")

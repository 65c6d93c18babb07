"""Run cache shards on Ray: plain actors, one per teacher replica, fed from a shard queue.

Placement: with GPUs in the cluster each actor takes ``teacher.gpus_per_actor`` GPUs (one
actor per GPU group, or ``teacher.num_actors``); without, ``teacher.num_actors`` CPU actors
(default one) share the cluster's CPUs, each running torch with that many threads.
Actors are spread over the cluster's nodes (``scheduling_strategy="SPREAD"``).
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
from pathlib import Path
from typing import Any, Callable

from pipeline.config import CacheConfig, TeacherConfig
from pipeline.errors import UserError
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
                    result = futures.pop(0).result()
                    if queue:
                        futures.append(pool.submit(worker.run_shard, queue.pop(0)))
                    on_done(result)
            finally:
                for f in futures:
                    f.cancel()


def make_cache_executor(teacher: TeacherConfig, cache: CacheConfig, address: str | None) -> "RayExecutor":
    """The Ray executor for ``address`` as ``cluster.local.resolve_address`` resolved it (None:
    an embedded Ray on 127.0.0.1)."""
    return RayExecutor(address=address, teacher=teacher, max_retries=cache.max_retries)


class _CacheActor:
    """Ray actor body: one teacher replica."""

    def __init__(self, job: Any, device: str, threads: int | None):
        # On a node without the driver's disk, a bucket-backed pack is pulled into this
        # node's scratch (a no-op where it is already there).
        if (pack := remote_for(job.pack_dir)) is not None:
            pack.pull()
        self.cache = remote_for(job.cache_dir)
        self.worker = CacheWorker(job, device=device, threads=threads)

    def ready(self) -> str:
        """The id of the node this replica runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def run_shard(self, index: int) -> dict[str, Any]:
        result = self.worker.run_shard(index)
        if self.cache is not None:  # published by the node that wrote it: nothing waits on the driver's disk
            name = shard_name(index)
            self.cache.upload_file(Path(self.worker.job.cache_dir) / name, name)
        return result


def placement(resources: dict[str, float], teacher: TeacherConfig, shards: int) -> tuple[int, dict[str, float], str, int | None]:
    """(actors, per-actor resources, device, torch threads) for the cluster's resources."""
    gpus, cpus = resources.get("GPU", 0.0), max(1.0, resources.get("CPU", 1.0))
    if gpus > 0 and teacher.gpus_per_actor > 0:
        n = teacher.num_actors or max(1, int(gpus // teacher.gpus_per_actor))
        per, device, threads = {"num_gpus": teacher.gpus_per_actor, "num_cpus": 1}, "cuda", None
    else:
        n = teacher.num_actors or 1
        threads = max(1, int(cpus // n))
        per, device = {"num_cpus": threads}, "cpu"
    return max(1, min(n, shards)), per, device, threads


class RayExecutor:
    def __init__(self, address: str | None, teacher: TeacherConfig, max_retries: int = 3, poll_s: float = 1.0):
        self.address, self.teacher, self.max_retries, self.poll_s = address, teacher, max_retries, poll_s

    def run(self, job: Any, todo: list[int], on_done: Callable[[dict[str, Any]], None]) -> None:
        import ray

        from cluster.local import ray_session

        with ray_session(self.address):
            n, per, device, threads = placement(ray.cluster_resources(), self.teacher, len(todo))
            Actor = ray.remote(_CacheActor)
            # Two calls at once per actor (SHARDS_IN_FLIGHT): the next shard's forwards start
            # while the previous shard finishes writing; the worker's teacher lock orders them.
            actors = [Actor.options(**per, max_restarts=-1, max_task_retries=0, scheduling_strategy="SPREAD",
                                    max_concurrency=SHARDS_IN_FLIGHT).remote(job, device, threads)
                      for _ in range(n)]
            try:
                self._wait_ready(actors)
                self._drive(actors, job, todo, on_done)
            finally:
                for a in actors:
                    ray.kill(a, no_restart=True)

    @staticmethod
    def _wait_ready(actors: list[Any]) -> None:
        import ray

        try:
            nodes = ray.get([a.ready.remote() for a in actors])
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

"""Start the training ranks: locally (torchrun or the deepspeed launcher) or on Ray Train.

Every path runs the same :func:`stages.train.loop.train` on every rank. Inputs are checked
here first (``preflight``) so that bad input fails once, before any rank starts; the ranks
read the job file this writes to ``<run>/train_job.json`` (the resolved spec and inputs).

On a machine without a GPU the ranks use DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``)
over gloo, in fp32; with GPUs, NCCL and bf16.

Several machines without Ray: ``posdistill train CONFIG --nnodes N --node-rank I
--rdzv-endpoint HOST:PORT`` on each, the same command but for ``--node-rank``
(:class:`Rendezvous`). Node 0 builds the packs and caches; the others wait for them to be
done, then every node's torchrun joins node 0's rendezvous (``static``: fixed node ranks,
HOST:PORT is node 0's master address; ``c10d``: a TCP store there, node ranks by arrival).
Checkpoints and the export are written into one run directory by ranks on every node, so
``run.out_dir`` must be a POSIX path all nodes share (NFS, Lustre, a PVC), not a bucket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.head import free_port
from cluster.jit import check_jit_locks
from pipeline.errors import Stopped, UserError
from pipeline.locks import exclusive
from pipeline.progress import LIVE_ENV, is_progress_line
from stages.specs import TrainSpec
from stages.train.checkpoint import complete_tags, discard_incomplete
from stages.train.loop import RANK_ERROR_ENV, RANK_ERROR_LINE, read_job, write_job

RANK_ERROR = ".rank-error"  # a rank's UserError, written by the first rank that meets one

from stages.train.plan import MODEL_DIR, default_workers, preflight, threads_per_rank


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def rank_env(workers: int) -> dict[str, str]:
    env = dict(os.environ)
    if not _has_gpu():
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(workers)))
    if sys.stderr.isatty():
        env[LIVE_ENV] = "1"  # run_ranks redraws their progress lines: they may print them often
    # The project root on the ranks' path, whatever their working directory.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


@dataclass(frozen=True)
class Rendezvous:
    """Where this node's torchrun meets the others' (one node: nothing to meet)."""

    nnodes: int = 1
    node_rank: int = 0
    endpoint: str | None = None  # HOST:PORT of node 0
    backend: str = "static"  # static | c10d

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise UserError(f"--nnodes {self.nnodes}: give 1 or more")
        if not 0 <= self.node_rank < self.nnodes:
            raise UserError(f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        if self.backend not in ("static", "c10d"):
            raise UserError(f"--rdzv-backend {self.backend}: not one of static, c10d")
        if self.nnodes > 1 and not self.endpoint:
            raise UserError(f"--rdzv-endpoint HOST:PORT is required with --nnodes {self.nnodes}: the address of "
                            "node 0 (--node-rank 0) that every node can reach, and a free port there")
        if self.endpoint is not None:
            host, _, port = self.endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UserError(f"--rdzv-endpoint {self.endpoint}: not HOST:PORT (e.g. 10.0.0.1:29500)")

    @property
    def multi(self) -> bool:
        return self.nnodes > 1

    @property
    def follower(self) -> bool:
        """Not node 0: uses the inputs node 0 builds, computes none."""
        return self.node_rank > 0

    def check(self, launcher: str, runner: str, out_dir: str | None = None) -> None:
        """What a multi-node run needs of the config (the flags themselves are checked on creation)."""
        if not self.multi:
            return
        if launcher == "ray":
            raise UserError(f"--nnodes {self.nnodes}: train.launcher is 'ray', where Ray Train places the ranks "
                            "on the cluster's nodes itself; drop --nnodes, or set train.launcher: local")
        if runner != "torchrun":
            raise UserError(f"--nnodes {self.nnodes} needs train.local_runner: torchrun (the deepspeed launcher "
                            f"reaches other nodes over ssh with a hostfile), not '{runner}'")
        from pipeline.storage import is_remote

        if out_dir is not None and is_remote(out_dir):
            raise UserError(f"--nnodes {self.nnodes}: run.out_dir {out_dir} is a bucket, but a multi-node run "
                            "writes its checkpoint shards from every node's ranks into one directory that rank 0 "
                            "then exports from: set run.out_dir to a POSIX path all nodes share (NFS, Lustre, a "
                            "PVC); a bucket works with --nnodes 1 or train.launcher: ray")


def local_command(runner: str, job_path: Path, workers: int, resume: bool,
                  rdzv: Rendezvous = Rendezvous()) -> list[str]:
    args = [str(job_path)] + (["--resume"] if resume else [])
    if runner == "deepspeed":
        exe = shutil.which("deepspeed")
        if exe is None:
            raise UserError("train.local_runner: the 'deepspeed' launcher is not on PATH")
        return [exe, "--num_gpus", str(workers), "--master_port", str(free_port()), "--module", "stages.train", *args]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(rdzv.nnodes),
           "--nproc_per_node", str(workers), "--max_restarts", "0"]
    if rdzv.backend == "c10d":
        # Every node names the same run (its directory holds the spec's fingerprint).
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", str(rdzv.endpoint),
                "--rdzv_id", f"posdistill-{job_path.parent.name}"]
    else:
        host, _, port = (rdzv.endpoint or f"127.0.0.1:{free_port()}").rpartition(":")
        cmd += ["--node_rank", str(rdzv.node_rank), "--master_addr", host, "--master_port", port]
    return cmd + ["-m", "stages.train", *args]


def run_training(spec: TrainSpec, inputs: dict[int, Path], run: Path, workers: int | None = None,
                 address: str | None = None, resume: bool = False, rdzv: Rendezvous = Rendezvous()) -> Path:
    """Check inputs, start the ranks, wait; returns the exported model. A run directory with
    a complete checkpoint continues from it; ``resume`` insists on one. ``workers``: ranks on
    this node (``rdzv.nnodes`` nodes of them in all)."""
    workers = workers or spec.train.workers or default_workers()
    rdzv.check(spec.train.launcher, spec.train.local_runner)
    preflight(spec, inputs, workers * rdzv.nnodes)
    if resume and not complete_tags(run / "checkpoints"):
        raise UserError(f"--resume: no complete checkpoint under {run / 'checkpoints'}")
    check_jit_locks()
    run.mkdir(parents=True, exist_ok=True)
    # One training job per run directory (node 0's, in a multi-node run: the other nodes'
    # ranks write into it as part of the same job).
    with contextlib.nullcontext() if rdzv.follower else exclusive(run, "train job"):
        job = write_job(spec, inputs, run)
        try:
            if spec.train.launcher == "ray":
                return run_on_ray(job, spec, workers, address, resume)
            cmd = local_command(spec.train.local_runner, job, workers, resume, rdzv)
            code = run_ranks(cmd, {**rank_env(workers), RANK_ERROR_ENV: str(run / RANK_ERROR)}, run / RANK_ERROR)
            if code != 0:
                raise RuntimeError(f"training ranks failed (exit {code}): {' '.join(cmd)}")
        except BaseException:
            if not rdzv.multi:  # every rank is gone; another node's might still be writing
                discard_incomplete(run / "checkpoints")
            raise
    return run / MODEL_DIR


def _die_with_parent() -> None:
    """Runs in the launcher's child before exec: it gets SIGTERM if this process dies, even
    by SIGKILL (Linux), and passes it on to its ranks."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_ranks(cmd: list[str], env: dict[str, str], error_file: Path, grace_s: float = 8.0) -> int:
    """Run the rank launcher in its own process group and wait for it.

    SIGINT or SIGTERM to this process goes to the whole group (the launcher and every rank;
    SIGKILL after ``grace_s``), then :class:`Stopped` is raised: nothing is left running. A
    rank that met bad input writes ``error_file``; its message is raised as the one
    ``UserError``, and the launcher's own failure report (which only repeats that a rank
    exited) is not forwarded."""
    error_file.unlink(missing_ok=True)
    got: list[tuple[int, float]] = []  # (signal, when)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True,
                            preexec_fn=_die_with_parent)

    live = sys.stderr.isatty()  # progress lines redraw in place, as in the ranks' own terminal

    reported: list[str] = []  # a rank's message that could not go to error_file (a full disk)

    def forward() -> None:
        drawn = False  # the cursor sits after a redrawn progress line
        for line in proc.stderr:
            if RANK_ERROR_LINE in line and not reported:
                reported.append(line.split(RANK_ERROR_LINE, 1)[1].strip())
            if error_file.exists() or reported:
                continue
            if live and is_progress_line(line):
                sys.stderr.write("\r" + line.rstrip("\n") + "\x1b[K")
                drawn = True
            else:
                sys.stderr.write(("\n" if drawn else "") + line)
                drawn = False
            sys.stderr.flush()
        if drawn:
            sys.stderr.write("\n")

    pump = threading.Thread(target=forward, daemon=True)
    pump.start()

    def stop(signum: int, _frame: object) -> None:
        got.append((signum, time.monotonic()))
        with contextlib.suppress(ProcessLookupError):  # the group has exited already
            os.killpg(proc.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while proc.poll() is None:
            if got and time.monotonic() - got[0][1] > grace_s:
                with contextlib.suppress(ProcessLookupError):  # the group has exited already
                    os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):  # the group has exited already
            os.killpg(proc.pid, signal.SIGKILL)  # a rank the launcher left behind
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # the group has exited already
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    pump.join(timeout=5)
    if got:
        raise Stopped(got[0][0])
    message = error_file.read_text().strip() if error_file.exists() else ""
    error_file.unlink(missing_ok=True)
    if message or reported:
        raise UserError(message or reported[0])
    return proc.returncode



# ----------------------------------------------------------------------------- Ray Train


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: Ray made the process group; DeepSpeed reuses it."""
    if loop_config["cpu"]:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import ray.train

    from stages.train.loop import train

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(ctx.get_local_world_size())
    os.environ["RANK"] = str(ctx.get_world_rank())
    spec, inputs, run = read_job(loop_config["job"])
    out = train(spec, inputs, run, resume=loop_config["resume"])
    ray.train.report({"model": str(out)})


def run_on_ray(job: Path, spec: TrainSpec, workers: int, address: str | None, resume: bool) -> Path:
    """Ray Train over the cluster at ``address`` (resolved by ``cluster.local.resolve_address``:
    inside a submitted job its own cluster; None: an embedded Ray). CPU workers are spread
    over the nodes (one per node while there are as many nodes: each gets a machine's cores);
    GPU workers are packed (a node's GPUs share its fast links)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.local import ray_session

    run = job.parent
    gpu = _has_gpu() if address is None else None
    with ray_session(address):
        import ray

        if gpu is None:
            gpu = ray.cluster_resources().get("GPU", 0) > 0
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"job": str(job.resolve()), "resume": resume, "cpu": not gpu},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                         resources_per_worker=None if gpu else {"CPU": 1},
                                         placement_strategy="PACK" if gpu else "SPREAD"),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            run_config=RunConfig(name=f"train-{run.name}", storage_path=str((run / "ray").resolve()),
                                 failure_config=FailureConfig(max_failures=0)),
        )
        try:
            trainer.fit()
        except Exception as err:  # Ray wraps worker errors; surface a UserError's message as such
            text = str(err)
            if "UserError" in text:
                raise UserError(text.split("UserError:")[-1].strip().splitlines()[0]) from None
            raise
    return run / MODEL_DIR

"""Start the training ranks: locally (torchrun or the deepspeed launcher) or on Ray.

Every path runs the same :func:`stages.train.loop.train` on every rank. Inputs are checked
here first (``preflight``) so that bad input fails once, before any rank starts; the ranks
read the resolved config this writes to ``<run>/config.json``.

On a machine without a GPU the ranks use DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``)
over gloo, in fp32; with GPUs, NCCL and bf16.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_bytes
from pipeline.config import Config
from pipeline.errors import UserError
from stages.train.checkpoint import complete_tags
from stages.train.plan import default_workers, model_dir, preflight, run_dir, threads_per_rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def rank_env(workers: int) -> dict[str, str]:
    env = dict(os.environ)
    if not _has_gpu():
        env["DS_ACCELERATOR"] = "cpu"
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(workers)))
    # The project root on the ranks' path, whatever their working directory.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def local_command(cfg: Config, config_path: Path, workers: int, resume: bool) -> list[str]:
    args = [str(config_path)] + (["--resume"] if resume else [])
    port = str(_free_port())
    if cfg.train.local_runner == "deepspeed":
        exe = shutil.which("deepspeed")
        if exe is None:
            raise UserError("train.local_runner: the 'deepspeed' launcher is not on PATH")
        return [exe, "--num_gpus", str(workers), "--master_port", port, "--module", "stages.train.loop", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(workers),
            "--master_addr", "127.0.0.1", "--master_port", port, "-m", "stages.train.loop", *args]


def run_training(cfg: Config, resume: bool = False, workers: int | None = None) -> Path:
    """``posdistill train``: check inputs, start the ranks, wait; returns the exported model."""
    workers = workers or cfg.train.workers or default_workers()
    preflight(cfg, workers)
    run = run_dir(cfg)
    if resume and not complete_tags(run / "checkpoints"):
        raise UserError(f"--resume: no complete checkpoint under {run / 'checkpoints'}")
    run.mkdir(parents=True, exist_ok=True)
    config_path = run / "config.json"
    atomic_write_bytes(config_path, cfg.to_json().encode())
    if cfg.train.launcher == "ray":
        return run_on_ray(cfg, resume, workers)
    cmd = local_command(cfg, config_path, workers, resume)
    proc = subprocess.run(cmd, env=rank_env(workers))
    if proc.returncode == 2:
        raise UserError("training stopped on bad input (see the error above)")
    if proc.returncode != 0:
        raise RuntimeError(f"training ranks failed (exit {proc.returncode}): {' '.join(cmd)}")
    return model_dir(cfg)


# ----------------------------------------------------------------------------- Ray Train


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: Ray made the process group; DeepSpeed reuses it."""
    if loop_config["cpu"]:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import ray.train

    from pipeline.config import parse_config
    from stages.train.loop import train

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(ctx.get_local_world_size())
    os.environ["RANK"] = str(ctx.get_world_rank())
    cfg = parse_config(loop_config["config"], "config.json")
    out = train(cfg, resume=loop_config["resume"])
    ray.train.report({"model": str(out)})


def run_on_ray(cfg: Config, resume: bool, workers: int) -> Path:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.local import ray_session, resolve_address

    # Inside a submitted job this is the job's cluster; otherwise cluster.address or embedded.
    address = resolve_address(None, cfg.cluster.address)
    gpu = _has_gpu() if address is None else None
    with ray_session(address):
        import ray

        if gpu is None:
            gpu = ray.cluster_resources().get("GPU", 0) > 0
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"config": cfg.resolved(), "resume": resume, "cpu": not gpu},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                         resources_per_worker=None if gpu else {"CPU": 1}),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            run_config=RunConfig(name=f"train-{run_dir(cfg).name}", storage_path=str((run_dir(cfg) / "ray").resolve()),
                                 failure_config=FailureConfig(max_failures=0)),
        )
        try:
            trainer.fit()
        except Exception as err:  # Ray wraps worker errors; surface a UserError's message as such
            text = str(err)
            if "UserError" in text:
                raise UserError(text.split("UserError:")[-1].strip().splitlines()[0]) from None
            raise
    return model_dir(cfg)

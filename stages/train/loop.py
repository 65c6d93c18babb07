"""The one training function. Every launcher (torchrun, the deepspeed launcher, Ray Train)
ends up calling :func:`train` on every rank, after the process group exists.

Every rank reads the same job file, ``<run>/train_job.json`` (the resolved ``TrainSpec`` and
each phase's input directory), written by the launcher in ``cluster.launch``. Run directly::

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 -m stages.train RUN_DIR/train_job.json [--resume]
    deepspeed --num_gpus 8 --module stages.train RUN_DIR/train_job.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from pipeline.errors import UserError, write_failure
from pipeline.progress import Progress, progress_interval
from stages.specs import PhaseSpec, TrainSpec, spec_to_dict, train_spec_from_dict
from stages.train.ds_config import deepspeed_config, precision
from stages.train.plan import MODEL_DIR, Geometry, geometry, lr_at, preflight, threads_per_rank

JOB_FILE = "train_job.json"
# Where a rank reports bad input (set by the launcher in ``cluster.launch``): the first rank to
# fail writes its message there, so the user sees it once, whichever rank it was.
RANK_ERROR_ENV = "POSDISTILL_RANK_ERROR_FILE"
RANK_ERROR_LINE = "posdistill-rank-error: "  # _report's stderr fallback, read by cluster.launch.run_ranks


def write_job(spec: TrainSpec, inputs: dict[int, Path], run_dir: Path) -> Path:
    """The file every rank reads: the spec and each phase's input directory."""
    from pipeline.atomic import atomic_write_json

    path = run_dir / JOB_FILE
    atomic_write_json(path, {"spec": spec_to_dict(pinned_spec(spec)),
                             "inputs": {str(i): str(p) for i, p in inputs.items()}, "run_dir": str(run_dir)})
    return path


def pinned_spec(spec: TrainSpec) -> TrainSpec:
    """``spec`` with each Hub id (tokenizer, student.init, teacher) pinned to the commit this
    process resolved, ``org/name@<commit>``: every rank loads exactly those files."""
    from dataclasses import replace

    from pipeline.locate import pinned

    from pipeline.errors import UserError

    student = spec.student
    if student.init is not None:
        student = student.model_copy(update={"init": pinned(student.init, "student.init", "model")})
    try:  # the teacher only lends its vocabulary here (see stages.student.teacher_vocab_size)
        teacher = pinned(spec.teacher_model, "teacher.model", "config")
    except UserError:
        teacher = spec.teacher_model
    return replace(spec, student=student, tokenizer=pinned(spec.tokenizer, "data.tokenizer", "tokenizer"),
                   teacher_model=teacher)


def read_job(path: str | Path) -> tuple[TrainSpec, dict[int, Path], Path]:
    try:
        raw = json.loads(Path(path).read_text())
        return (train_spec_from_dict(raw["spec"]), {int(i): Path(p) for i, p in raw["inputs"].items()},
                Path(raw["run_dir"]))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: not a training job file ({err})") from None


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


def init_distributed() -> DistEnv:
    """Join the process group, or wrap the one Ray Train made; gloo on CPU, nccl on GPU."""
    gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR: it picks its accelerator on import
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if gpu:
        torch.cuda.set_device(local_rank)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False,
                               verbose=False)
    world = dist.get_world_size()
    return DistEnv(rank=dist.get_rank(), world=world, local_rank=local_rank,
                   local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                   device=torch.device("cuda", local_rank) if gpu else torch.device("cpu"))


def _on_rank0(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 (None elsewhere) while the others wait; its UserError reaches every
    rank, so none hangs in a collective."""
    out, msg = None, [None]
    if env.rank == 0:
        try:
            out = fn()
        except UserError as err:
            msg[0] = str(err)
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise UserError(msg[0])
    return out


def tracked_config(spec: TrainSpec) -> dict[str, Any]:
    """What trackers record as the run's config: the resolved sections and every phase."""
    phases = [{"name": p.name, "window_len": p.window_len, "steps": p.steps, "start": p.start, "lr": p.lr,
               "min_lr_ratio": p.min_lr_ratio, "kd": spec_to_dict(p.kd), "rope": spec_to_dict(p.rope),
               "source": p.source} for p in spec.phases]
    return {"label": spec.label, "variant": spec.variant, "seed": spec.seed, "init_from": spec.init_from,
            **spec.identity(), "resolved_phases": phases}


class NonFiniteTraining(UserError):
    """A NaN/inf target, loss or gradient norm: every step after it would train on garbage."""


@dataclass
class StepStats:
    loss: float
    kd: float | None
    ce: float
    tokens: int
    wait_s: float


def train_step(engine: Any, data: Any, phase: PhaseSpec, geo: Geometry, device: torch.device) -> StepStats:
    """One optimizer step: ``grad_accum`` micro-batches, then sums reduced over all ranks.
    Non-finite targets and losses are counted on every rank and reduced with the sums, so all
    ranks see them in the same step and stop together (no rank is left in a collective)."""
    # kd_sum, ce_sum, kd_positions, ce_positions, wait_s, non-finite target values, non-finite losses
    sums = torch.zeros(7, dtype=torch.float64)
    tokens = 0
    for _ in range(geo.grad_accum):
        t0 = time.perf_counter()
        batch = next(data)
        sums[4] += time.perf_counter() - t0
        batch = batch.to(device)
        if batch.logp is not None:
            sums[5] += int((~torch.isfinite(batch.logp)).sum())
        loss, kd_sum, ce_sum = engine(batch, phase.kd)
        sums[6] += 0 if torch.isfinite(loss).item() else 1
        engine.backward(loss)
        engine.step()
        sums[0] += kd_sum.item()
        sums[1] += ce_sum.item()
        sums[2] += 0 if batch.ids is None else batch.ids.shape[0] * batch.ids.shape[1]
        sums[3] += int((batch.labels != -100).sum())
        tokens += batch.tokens
    reduced = sums.to(device)  # NCCL reduces device tensors only
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    sums = reduced.cpu()
    if sums[5] > 0:
        raise NonFiniteTraining(f"{int(sums[5])} non-finite teacher log-probs in this step's batch: the cache is "
                                "bad (`posdistill cache verify --deep` names the windows)")
    kd = sums[0].item() / sums[2].item() if sums[2] > 0 else None
    ce = sums[1].item() / max(sums[3].item(), 1.0)
    a, tau = phase.kd.alpha, phase.kd.temperature
    loss = (a * tau * tau * kd if kd is not None else 0.0) + (1 - a) * ce
    if sums[6] > 0 or not math.isfinite(loss):
        raise NonFiniteTraining(f"non-finite loss (kd {kd}, ce {ce}) on {int(sums[6])} micro-batch(es)")
    return StepStats(loss=loss, kd=kd, ce=ce, tokens=tokens * geo.dp, wait_s=sums[4].item() / geo.world)


def open_loader(spec: TrainSpec, phase: PhaseSpec, path: Path, geo: Geometry, rank: int, state: Any) -> Any:
    from stages.train.data import Prefetcher, batches, open_stream

    stream = open_stream(phase.source, path, dp_rank=geo.dp_rank(rank), dp_size=geo.dp, seed=spec.seed)
    if state is not None:
        stream.load_state_dict(state)
    source = batches(stream, geo.micro_batch, mode=spec.mode, window_len=phase.window_len, sp=geo.sp,
                     sp_rank=geo.sp_rank(rank), with_targets=phase.source == "cache",
                     periodic=phase.data.source == "periodic")
    return Prefetcher(source, spec.train.prefetch)


def build_engine(spec: TrainSpec, geo: Geometry, env: DistEnv) -> tuple[Any, Any, list[dict[str, Any]]]:
    """(DeepSpeed engine, the HF student inside it, every phase's rope_parameters)."""
    import deepspeed

    from stages.rope import plan_phases
    from stages.student import build_student
    from stages.train.model import StudentWithLoss, enable_checkpointing, enable_tiled_mlp, setup_sequence_parallel

    model, fresh = build_student(spec)
    rope_plan = plan_phases(list(spec.phases), model.config, fresh)
    if spec.train.gradient_checkpointing:
        enable_checkpointing(model)
    if spec.train.tiled_mlp:
        enable_tiled_mlp(model)
    mpu = setup_sequence_parallel(model, geo.sp, geo.micro_batch) if geo.sp > 1 else None
    module = StudentWithLoss(model, spec.train.loss_tile)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=list(module.parameters()),
                                      config=deepspeed_config(spec.train, geo, env.gpu), mpu=mpu)
    return engine, model, rope_plan


def train(spec: TrainSpec, inputs: dict[int, Path], run: Path, resume: bool = False) -> Path:
    """Train every phase of ``spec`` on this rank, reading phase i from ``inputs[i]`` and
    writing checkpoints and the exported model under ``run``; returns the model directory.
    A write that failed for the storage's sake (a full or read-only volume under a
    checkpoint, ``metrics.jsonl`` or the export) is one UserError naming the run directory,
    whichever launcher runs the rank: ``torch.save`` reports a full disk without its errno."""
    try:
        return _train(spec, inputs, run, resume)
    except Exception as err:
        user = write_failure(err, run)
        if user is None:
            raise
        raise user from None


def _train(spec: TrainSpec, inputs: dict[int, Path], run: Path, resume: bool) -> Path:
    from stages.rope import apply_rope
    from stages.tokenizer import load_tokenizer
    from stages.train.checkpoint import Checkpointer
    from stages.train.export import export_checkpoint, is_exported
    from stages.train.metrics import MetricsLog

    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")  # DeepSpeed's own call
    env = init_distributed()
    _on_rank0(env, lambda: preflight(spec, inputs, env.world))
    torch.set_num_threads(threads_per_rank(env.local_world))
    t, phases = spec.train, spec.phases
    geo = geometry(t, env.world)
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if env.rank == 0 else (lambda m: None)
    engine, model, rope_plan = build_engine(spec, geo, env)
    tokenizer = load_tokenizer(spec.tokenizer)

    say(f"train: {spec.label}: {env.world} ranks, precision {precision(t, env.gpu)}, ZeRO-{t.deepspeed.zero_stage}")
    ckpt = Checkpointer(run / "checkpoints", env.rank, env.world, t.keep_checkpoints, spec.identity())
    point = ckpt.resume_point()
    if resume and point is None:
        raise UserError(f"--resume: no complete checkpoint under {run / 'checkpoints'}")
    state = ckpt.load(engine, point) if point else None
    step = point.step if point else 0
    if point:
        say(f"train: resuming from {point.tag.name} (step {step})")
    metrics = _on_rank0(env, lambda: MetricsLog(run, step, True, t.report_to, t.tracking, spec.label,
                                                tracked_config(spec))) or MetricsLog(run, step, enabled=False)
    skipped = 0  # consecutive optimizer steps DeepSpeed skipped

    with metrics:
        for phase in phases:
            if step >= phase.end:
                continue
            report = apply_rope(model, rope_plan[phase.index], phase.window_len)
            say(f"train: {phase.name} window {phase.window_len}, steps {phase.start}..{phase.end}, "
                f"{'KD from ' if phase.source == 'cache' else 'CE on '}{phase.source} (alpha {phase.kd.alpha}); "
                + report.line(phase.window_len))
            named = "" if phase.name == f"phase{phase.index}" else f" ({phase.name})"
            progress = Progress(f"train {spec.label} phase {phase.index + 1}/{len(phases)}{named}", phase.steps,
                                unit="steps", interval=progress_interval(t.log_every_s), enabled=env.rank == 0,
                                done=step - phase.start)
            resume_here = point is not None and point.phase == phase.index and phase.start < step
            data = open_loader(spec, phase, inputs[phase.index], geo, env.rank, state if resume_here else None)
            try:
                while step < phase.end:
                    lr = lr_at(phase, step - phase.start, t.warmup_steps)
                    for group in engine.optimizer.param_groups:
                        group["lr"] = lr
                    t0 = time.perf_counter()
                    try:
                        s = train_step(engine, data, phase, geo, env.device)
                    except NonFiniteTraining as err:
                        raise NonFiniteTraining(f"train: {phase.name} step {step + 1}: {err}; stopped before saving "
                                                "it (the last checkpoint is clean)") from None
                    dt = time.perf_counter() - t0
                    step += 1
                    grad_norm = engine.get_global_grad_norm()
                    skipped = skipped + 1 if not engine.was_step_applied() else 0
                    if skipped >= t.max_skipped_steps:
                        raise NonFiniteTraining(f"train: {phase.name} step {step}: DeepSpeed skipped the last {skipped} "
                                                "optimizer steps (gradient overflow; train.max_skipped_steps="
                                                f"{t.max_skipped_steps})")
                    if not skipped and grad_norm is not None and not math.isfinite(float(grad_norm)):
                        raise NonFiniteTraining(f"train: {phase.name} step {step}: gradient norm is "
                                                f"{float(grad_norm)}; stopped before saving it (the last checkpoint "
                                                "is clean)")
                    metrics.log({"phase": phase.index, "step": step, "loss": s.loss, "kd": s.kd, "ce": s.ce, "lr": lr,
                                 "tokens": s.tokens, "tokens_per_s": s.tokens / dt, "step_s": dt,
                                 "wait_s": s.wait_s, "grad_norm": None if grad_norm is None else float(grad_norm),
                                 "phase_name": phase.name})
                    progress.note = f"loss {s.loss:.3g}"
                    progress.update(1, s.tokens)
                    if step % t.save_every == 0 or step == phase.end:
                        ckpt.save(engine, step, phase.index, data.state_dict(), model, tokenizer)
            finally:
                data.close()
            progress.close()

    out = run / MODEL_DIR
    if env.rank == 0 and not is_exported(out, step, ckpt.identity):
        export_checkpoint(run / "checkpoints", out, dtype="float32")
        say(f"train: exported {out}")
    dist.barrier()
    return out


def _report(message: str) -> None:
    """The launcher's one error line: the error file (on the run directory, which every node
    shares), or -- when that cannot be written, a full disk -- a marked line on stderr."""
    target = os.environ.get(RANK_ERROR_ENV)
    if target:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # the first rank wins
        except FileExistsError:
            return
        except OSError:
            fd = None
        if fd is not None:
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(message + "\n")
                return
            except OSError:
                Path(target).unlink(missing_ok=True)
        print(RANK_ERROR_LINE + message, file=sys.stderr, flush=True)
    elif int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", help=f"a run directory's {JOB_FILE} (written by `posdistill train`)")
    ap.add_argument("--resume", action="store_true", help="fail unless a complete checkpoint exists")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    code = 0
    try:
        spec, inputs, run = read_job(args.job)
        train(spec, inputs, run, resume=args.resume)
    except UserError as err:
        _report(str(err))
        code = 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()

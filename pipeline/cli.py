"""The ``posdistill`` command line. Each stage command validates the config and runs the run
graph (``pipeline.graph``) up to that stage's nodes: what is done is reused, the rest computed.

Imports of heavy libraries (torch, ray, deepspeed) happen inside commands so that
``--help`` and config errors answer instantly.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from pipeline.atomic import OWNER_FILE, check_output_dir, owned_kind
from pipeline.config import load_config
from pipeline.errors import UserError, on_stop_signal, stop_signal, storage_error

config_arg = click.argument("config", type=click.Path(dir_okay=False))
student_opt = click.option("--student", default=None, help="Only this student (a students: name, or NAME-sSEED).")
phase_opt = click.option("--phase", type=int, default=None,
                         help="Only the nodes of each selected student's phases[N].")


class DefaultGroup(click.Group):
    """A group that runs ``default_cmd`` when the first argument is not a subcommand,
    so ``posdistill cache CONFIG`` and ``posdistill cache verify DIR`` both work."""

    def __init__(self, *args, default_cmd: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_cmd = default_cmd

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_cmd, *args]
        return super().parse_args(ctx, args)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """posdistill: distil long-context ability into small models from short data."""


# ----------------------------------------------------------------------------- config


@cli.group()
def config() -> None:
    """Inspect configs."""


@config.command("show")
@config_arg
def config_show(config: str) -> None:
    """Print the resolved config (every default filled in) as JSON, with each student as the
    graph resolves it (``resolved_students``: run directory, parent, every phase's inherited
    settings and whether it reads a teacher cache or packed windows)."""
    import json

    from pipeline.resolve import layout, train_specs
    from stages.specs import spec_to_dict

    cfg = load_config(config)
    lay = layout(cfg)
    out = cfg.resolved()
    out["resolved_students"] = [{
        "label": s.label, "run_dir": str(lay.run_dir(s)), "init_from": s.init_from, "seed": s.seed,
        "batch_size": s.train.batch_size, "micro_batch": s.train.micro_batch,
        "phases": [{"name": ph.name, "window_len": ph.window_len, "steps": ph.steps, "start": ph.start, "lr": ph.lr,
                    "min_lr_ratio": ph.min_lr_ratio, "kd": spec_to_dict(ph.kd), "rope": spec_to_dict(ph.rope),
                    "data": ph.data.source, "doc_len": list(ph.pack.pack.doc_len), "source": ph.source}
                   for ph in s.phases]} for s in train_specs(cfg)]
    click.echo(json.dumps(out, indent=2))


# ----------------------------------------------------------------------------- pack


@cli.command()
@config_arg
@student_opt
@phase_opt
def pack(config: str, student: str | None, phase: int | None) -> None:
    """Pack short documents into windows: the top-level pack and every phase's windows."""
    from pipeline.run import run_stage

    run_stage(load_config(config), "pack", student=student, phase=phase)


# ----------------------------------------------------------------------------- cluster and jobs

address_opt = click.option("--address", default=None,
                           help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS or the local head).")


@cli.group()
def cluster() -> None:
    """A local Ray head on 127.0.0.1 with token authentication."""


@cluster.command("up")
@click.option("--port", default=6379, show_default=True)
@click.option("--dashboard-port", default=8265, show_default=True)
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray nodes on 127.0.0.1: the head plus NODES-1 worker nodes (node i has the custom "
                   "resource posdistill_node_<i>: 1).")
@click.option("--num-cpus", type=int, default=None, help="CPUs of each node (default: Ray's count).")
@click.option("--num-gpus", type=int, default=None, help="GPUs of each node.")
def cluster_up(port: int, dashboard_port: int, nodes: int, num_cpus: int | None, num_gpus: int | None) -> None:
    """Start a Ray head bound to loopback, token auth on, and NODES-1 worker nodes beside it
    (a head already up is kept; a worker node that is not running is started)."""
    from cluster.head import head_up

    info = head_up(port, dashboard_port, num_cpus, num_gpus, nodes=nodes)
    click.echo(f"Ray head on {info.gcs_address}, dashboard {info.dashboard} (loopback only)")
    for w in info.workers:
        click.echo(f"worker node {w.index} on 127.0.0.1 (resource {w.resource}; temp dir {w.temp_dir})")
    click.echo(f"token authentication: on; token file {info.token_path}")
    click.echo(f"submit with: posdistill submit STAGE CONFIG --address {info.dashboard}")
    click.echo(f"other clients: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={info.token_path}")


@cluster.command("down")
@click.option("--node", type=click.IntRange(min=1), default=None,
              help="Stop only worker node NODE (as a lost node looks to Ray); the head and the other nodes stay.")
def cluster_down(node: int | None) -> None:
    """Stop the nodes started by `cluster up` (and nothing else)."""
    from cluster.head import head_down, worker_down

    if node is not None:
        click.echo(f"stopped worker node {node}: {worker_down(node)} processes")
        return
    click.echo(f"stopped {head_down()} processes")


@cluster.command("status")
def cluster_status() -> None:
    """The head and every worker node `cluster up` started, as JSON."""
    import json

    from cluster.head import head_status

    click.echo(json.dumps(head_status(), indent=2))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("stage")
@config_arg
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
@address_opt
@click.option("--follow", is_flag=True, help="Stream the job's logs and exit with its status.")
@click.option("--python", "python", metavar="PATH", default=None,
              help="The job's interpreter on the cluster (default: this interpreter for the local head "
                   "`cluster up` started, else `python` on the cluster's PATH).")
def submit(stage: str, config: str, extra: tuple[str, ...], address: str | None, follow: bool,
           python: str | None) -> None:
    """Submit STAGE (pack, cache, train, eval, analyze, run) for CONFIG as a Ray job.

    Arguments after CONFIG are passed to the stage (e.g. `-- --model DIR` for eval). Only the
    allow-listed code and configs are uploaded (cluster/upload.py: UPLOAD_ALLOW)."""
    from cluster import jobs

    if stage not in jobs.STAGES:
        raise UserError(f"stage: '{stage}' is not one of {', '.join(jobs.STAGES)}")
    cfg = load_config(config)
    addr = jobs.default_address(address)
    sid, new = jobs.submit(stage, cfg, addr, list(extra), python=python)
    click.echo(f"{'submitted' if new else 'already submitted'}: {sid} ({jobs.status(addr, sid)})")
    if follow:
        final = jobs.follow(addr, sid)
        click.echo(f"{sid}: {final}")
        sys.exit(0 if final == "SUCCEEDED" else 1)


@cli.group()
def jobs() -> None:
    """List, inspect, follow and stop posdistill jobs."""


@jobs.command("list")
@address_opt
def jobs_list(address: str | None) -> None:
    from cluster import jobs as j

    for row in j.list_jobs(j.default_address(address)):
        click.echo(f"{row['submission_id']}  {row['status']:<9}  {row['entrypoint']}")


@jobs.command("status")
@click.argument("submission_id")
@address_opt
def jobs_status(submission_id: str, address: str | None) -> None:
    from cluster import jobs as j

    click.echo(j.status(j.default_address(address), submission_id))


@jobs.command("logs")
@click.argument("submission_id")
@address_opt
@click.option("--follow", is_flag=True)
def jobs_logs(submission_id: str, address: str | None, follow: bool) -> None:
    from cluster import jobs as j

    addr = j.default_address(address)
    if follow:
        sys.exit(0 if j.follow(addr, submission_id) == "SUCCEEDED" else 1)
    click.echo(j.logs(addr, submission_id), nl=False)


@jobs.command("stop")
@click.argument("submission_id")
@address_opt
def jobs_stop(submission_id: str, address: str | None) -> None:
    from cluster import jobs as j

    click.echo("stopped" if j.stop(j.default_address(address), submission_id) else "not running")


# ----------------------------------------------------------------------------- bootstrap


@cli.command()
@config_arg
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: teacher.model, else <run.out_dir>/teacher).")
def bootstrap(config: str, out: str | None) -> None:
    """Train a tiny long-context teacher (teacher.bootstrap) and save it as an HF directory."""
    from pipeline.resolve import bootstrap_dir, bootstrap_spec
    from stages.bootstrap import read_meta, run_bootstrap, summary_lines

    cfg = load_config(config)
    dest = Path(out) if out else bootstrap_dir(cfg)
    check_output_dir(dest, "bootstrap")  # before minutes of training, not after
    final = run_bootstrap(bootstrap_spec(cfg), dest)
    meta = read_meta(final)
    click.echo(f"teacher saved to {final} (train {meta['train_seconds']}s, "
               f"rope_theta {meta['rope_parameters']['rope_theta']:g})")
    for line in summary_lines(meta):
        click.echo(line)


# ----------------------------------------------------------------------------- eval / analyze


@cli.command("eval")
@config_arg
@click.option("--model", "models", multiple=True, type=click.Path(file_okay=False),
              help="A Hugging Face model directory; repeat to compare. Default: the teacher and every "
              "student of the config (trained first if needed).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory for --model (default: <run.out_dir>/eval/models).")
def eval_cmd(config: str, models: tuple[str, ...], out: str | None) -> None:
    """Passkey / needle heatmaps, loss by position and a comparison table."""
    cfg = load_config(config)
    if not models:
        from pipeline.run import run_stage

        run_stage(cfg, "eval")
        return
    from pipeline.resolve import eval_spec, layout
    from stages.evaluate.run import run_eval
    from stages.pack import run_pack

    dest = Path(out) if out else cfg.out_dir / "eval" / "models"
    check_output_dir(dest, "eval")
    spec = eval_spec(cfg)
    heldout = None
    if spec.eval.loss_windows > 0:
        hspec = spec.heldout_pack(spec.eval.loss_window_len or max(spec.eval.lengths))
        heldout = run_pack(hspec, layout(cfg).pack_dir(hspec), verbose=False)
    run_eval(spec, list(models), dest, heldout_dir=heldout)


@cli.group()
def analyze() -> None:
    """The seed paper's analyses: positional perturbation and query-span updates."""


@analyze.command("perturb")
@config_arg
@click.option("--model", required=True, type=click.Path(file_okay=False), help="A Hugging Face model directory.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory (default: <run.out_dir>/analyze/perturb-<model>).")
def analyze_perturb(config: str, model: str, out: str | None) -> None:
    """Shift the positions queries/keys see by delta; trace hidden-state change and KL per layer."""
    from pipeline.resolve import analyze_spec
    from stages.analyze.perturb import run_perturb
    from stages.evaluate.report import safe_name

    cfg = load_config(config)
    dest = Path(out) if out else cfg.out_dir / "analyze" / f"perturb-{safe_name(Path(model).name)}"
    check_output_dir(dest, "analyze")
    run_perturb(analyze_spec(cfg), model, dest)


@analyze.command("query-spans")
@click.option("--before", required=True, type=click.Path(file_okay=False), help="Model before extension.")
@click.option("--after", required=True, type=click.Path(file_okay=False), help="Model after extension.")
@click.option("--windows", default=None, help="Phase windows to mark, e.g. 256,1024 "
              "(default: analyze.query_spans.windows of --config, else both models' max_position_embeddings).")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False),
              help="Run config: output under <run.out_dir>/analyze/query_spans, its analyze.query_spans settings.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output directory.")
def analyze_query_spans(before: str, after: str, windows: str | None, config: str | None, out: str | None) -> None:
    """Relative update of W_q and W_k per layer, head and RoPE frequency pair."""
    from stages.analyze.query_spans import parse_windows, run_query_spans

    cfg = load_config(config) if config else None
    qs = cfg.analyze.query_spans if cfg else None
    marks = parse_windows(windows) or (sorted(set(qs.windows)) if qs and qs.windows else None)
    dest = Path(out) if out else (cfg.out_dir if cfg else Path(".")) / "analyze" / "query_spans"
    check_output_dir(dest, "analyze")
    run_query_spans(before, after, marks, qs.top if qs else 5, dest)


@cli.command()
@config_arg
@click.option("--teacher-config", default=None,
              help="The teacher's config.json when teacher.model is not on this machine.")
@click.option("--student-config", default=None,
              help="The student's config.json when student.init is not on this machine.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(config: str, teacher_config: str | None, student_config: str | None, as_json: bool) -> None:
    """Estimate cache size, teacher GPU-hours and student memory per GPU before spending GPUs."""
    import json

    from pipeline.plan import format_plan, make_plan

    result = make_plan(load_config(config), teacher_config, student_config)
    click.echo(json.dumps(result, indent=2) if as_json else format_plan(result))


# ----------------------------------------------------------------------------- cache


@cli.group(cls=DefaultGroup, default_cmd="run")
def cache() -> None:
    """Teacher logit cache: `cache CONFIG` builds it; `cache verify DIR`, `cache info DIR` inspect it."""


@cache.command("run")
@config_arg
@click.option("--address", default=None, help="Ray cluster to attach to (host:6379, ray://host:10001; default: "
              "the cluster this runs in, else cluster.address, else an embedded Ray on 127.0.0.1).")
@click.option("--force", is_flag=True, help="Rebuild every shard of the selected caches.")
@student_opt
@phase_opt
def cache_run(config: str, address: str | None, force: bool, student: str | None, phase: int | None) -> None:
    """The teacher over every KD phase's windows (packing first if needed), into fingerprinted
    shards; a config without phases caches its top-level pack."""
    from pipeline.run import run_stage

    graph = run_stage(load_config(config), "cache", address=address, student=student, phase=phase,
                      force_cache=force)
    for n in graph.nodes:
        if n.stage == "cache" and n.out is not None:
            click.echo(n.out)


@cache.command("verify")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--deep", is_flag=True, help="Also read every page and check its checksum.")
def cache_verify(cache_dir: str, deep: bool) -> None:
    """Check every shard's footer, fingerprint, completion flag, rows and window coverage."""
    from stages.cache.verify import verify_cache

    local = _local_dir(cache_dir)
    if not local.is_dir():
        raise UserError(f"{cache_dir}: no such cache directory")
    problems = verify_cache(local, deep=deep)
    for name, reason in problems:
        click.echo(f"BAD {name}: {reason}", err=True)
    if problems:
        click.echo(f"{cache_dir}: {len(problems)} problem(s); re-run `posdistill cache CONFIG` to regenerate "
                   "the bad shards", err=True)
        sys.exit(1)
    click.echo(f"{cache_dir}: OK")


@cache.command("info")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def cache_info(cache_dir: str, as_json: bool) -> None:
    """Windows, tokens, k, kind, codec, teacher, bytes per token and per entry."""
    import json

    from stages.cache.info import cache_summary, format_summary

    summary = cache_summary(_local_dir(cache_dir))
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))



# ----------------------------------------------------------------------------- train / export


@cli.command()
@config_arg
@click.option("--address", default=None, help="Ray cluster for the cache shards and Ray Train "
              "(default: as for `posdistill cache`).")
@click.option("--workers", type=int, default=None, help="Ranks to start on this machine (default: train.workers).")
@click.option("--resume", is_flag=True, help="Fail unless every selected student still to train has a complete "
              "checkpoint (a plain run continues from one anyway).")
@student_opt
@click.option("--nnodes", type=int, default=1, show_default=True,
              help="Machines of a torchrun run outside Ray: run the same command on each, with its --node-rank.")
@click.option("--node-rank", type=int, default=0, show_default=True,
              help="This machine's rank among --nnodes; node 0 builds the packs and caches, the others wait for them.")
@click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
              help="Node 0's address and a free port there, reachable from every node (needed with --nnodes > 1).")
@click.option("--rdzv-backend", type=click.Choice(["static", "c10d"]), default="static", show_default=True,
              help="static: fixed node ranks, HOST:PORT is node 0's master address; c10d: torchrun's "
                   "TCP-store rendezvous at HOST:PORT.")
def train(config: str, address: str | None, workers: int | None, resume: bool, student: str | None,
          nnodes: int, node_rank: int, rdzv_endpoint: str | None, rdzv_backend: str) -> None:
    """Train every student (or --student) phase by phase with DeepSpeed, building the packs and
    teacher caches it needs first. A run directory with a complete checkpoint continues from it.

    --workers ranks on each of --nnodes machines; with --nnodes > 1, run.out_dir must be a
    directory every machine shares (checkpoints are written from all of them)."""
    from cluster.launch import Rendezvous
    from pipeline.graph import build_graph, is_done
    from pipeline.storage import remote_for
    from stages.train.checkpoint import intact_tags

    rdzv = Rendezvous(nnodes=nnodes, node_rank=node_rank, endpoint=rdzv_endpoint, backend=rdzv_backend)
    cfg = load_config(config)
    rdzv.check(cfg.train.launcher, cfg.train.local_runner, cfg.run.out_dir)
    graph = build_graph(cfg, address=address, workers=workers, rdzv=rdzv)
    nodes = graph.select("train", student=student)
    if resume:
        for n in nodes:
            if (remote := remote_for(n.locate())) is not None:
                remote.pull()
            if n.stage == "train" and not is_done(n, n.locate(), n.ident()) \
                    and not intact_tags(n.locate() / "checkpoints"):
                raise UserError(f"--resume: {n.name}: no complete, intact checkpoint under "
                                f"{n.locate() / 'checkpoints'}")
    graph.run(nodes)
    for s in graph.students:
        if student is None or student in (s.variant, s.label):
            click.echo(f"train: {s.label} model in {graph.layout.model_dir(s)}")


@cli.command()
@click.argument("ckpt", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32")
def export(ckpt: str, out: str, dtype: str) -> None:
    """Export a training checkpoint (a step-* dir, a checkpoints dir or a run dir) as a
    Hugging Face directory."""
    from stages.train.export import export_checkpoint

    from pipeline.storage import Remote, is_remote

    local = _local_dir(ckpt)
    if not local.is_dir():
        raise UserError(f"{ckpt}: no such checkpoint directory")
    if not is_remote(out):
        check_output_dir(out, "export", keep=(local,))
        click.echo(f"export: wrote {export_checkpoint(local, out, dtype=dtype)}")
        return
    target = Remote(out)
    if target.exists() and owned_kind(target.pull()) != "export":  # the push replaces the prefix's objects
        raise UserError(f"{out}: holds objects posdistill did not export (no {OWNER_FILE}); choose another prefix")
    export_checkpoint(local, target.local, dtype=dtype)
    target.push(final=True)
    click.echo(f"export: wrote {out}")


def _local_dir(arg: str) -> Path:
    """A directory argument: a local path as is; an ``s3://``/``gs://`` prefix pulled into its
    scratch mirror first (a prefix with no objects is reported as missing by the caller)."""
    from pipeline.storage import Remote, is_remote

    if not is_remote(arg):
        return Path(arg)
    remote = Remote(arg)
    return remote.pull() if remote.exists() else remote.local / ".missing"

@cli.command("run")
@config_arg
@click.option("--address", default=None, help="Ray cluster for the cache stage (default: embedded local Ray).")
def run_cmd(config: str, address: str | None) -> None:
    """The whole pipeline: pack, teacher, cache, every student, eval, analyze, report.

    Every stage whose fingerprinted output is already valid is reused (and said so)."""
    from pipeline.run import run_pipeline

    run_pipeline(load_config(config), address)


def main() -> None:
    # Quiet by default: no per-file weight-loading bars from transformers / huggingface_hub
    # (inherited by the training ranks and Ray workers this process starts).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for sig in (signal.SIGINT, signal.SIGTERM):  # both unwind; ``cluster.local`` puts them back after ray.init
        signal.signal(sig, on_stop_signal)
    try:
        cli.main(standalone_mode=False)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:
        user = storage_error(err)
        if user is None:
            raise
        click.echo(f"error: {user}", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt) as err:  # click turns a KeyboardInterrupt into Abort
        cause = err.__cause__ if isinstance(err, click.exceptions.Abort) else err
        signum = getattr(cause, "signum", None) or stop_signal() or signal.SIGINT
        click.echo(f"stopped ({signal.Signals(signum).name})", err=True)
        sys.exit(128 + signum)
    except click.UsageError as err:  # one line, like every other bad input
        hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        click.echo(f"error: {err.format_message()}{hint}", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()

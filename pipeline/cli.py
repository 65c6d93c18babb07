"""The ``posdistill`` command line. Each command validates the config, then hands off to a stage.

Imports of heavy libraries (torch, ray, deepspeed) happen inside commands so that
``--help`` and config errors answer instantly.
"""

from __future__ import annotations

import os
import sys

import click

from pipeline.config import load_config
from pipeline.errors import UserError

config_arg = click.argument("config", type=click.Path(dir_okay=False))


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
    """Print the resolved config (every default filled in) as JSON."""
    click.echo(load_config(config).to_json())


# ----------------------------------------------------------------------------- pack


@cli.command()
@config_arg
def pack(config: str) -> None:
    """Pack short documents into windows of exactly pack.window_len tokens."""
    from stages.pack import pack_spec, run_pack

    cfg = load_config(config)
    run_pack(cfg, pack_spec(cfg))


# ----------------------------------------------------------------------------- cluster and jobs

address_opt = click.option("--address", default=None,
                           help="Ray dashboard URL (default: RAY_API_SERVER_ADDRESS or the local head).")


@cli.group()
def cluster() -> None:
    """A local Ray head on 127.0.0.1 with token authentication."""


@cluster.command("up")
@click.option("--port", default=6379, show_default=True)
@click.option("--dashboard-port", default=8265, show_default=True)
@click.option("--num-cpus", type=int, default=None)
@click.option("--num-gpus", type=int, default=None)
def cluster_up(port: int, dashboard_port: int, num_cpus: int | None, num_gpus: int | None) -> None:
    """Start a Ray head bound to loopback, token auth on."""
    from cluster.head import head_up

    info = head_up(port, dashboard_port, num_cpus, num_gpus)
    click.echo(f"Ray head on {info.gcs_address}, dashboard {info.dashboard} (loopback only)")
    click.echo(f"token authentication: on; token file {info.token_path}")
    click.echo(f"submit with: posdistill submit STAGE CONFIG --address {info.dashboard}")
    click.echo(f"other clients: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={info.token_path}")


@cluster.command("down")
def cluster_down() -> None:
    """Stop the head started by `cluster up` (and nothing else)."""
    from cluster.head import head_down

    click.echo(f"stopped {head_down()} processes")


@cluster.command("status")
def cluster_status() -> None:
    import json

    from cluster.head import head_status

    click.echo(json.dumps(head_status(), indent=2))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("stage")
@config_arg
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
@address_opt
@click.option("--follow", is_flag=True, help="Stream the job's logs and exit with its status.")
def submit(stage: str, config: str, extra: tuple[str, ...], address: str | None, follow: bool) -> None:
    """Submit STAGE (pack, cache, train, eval, analyze, run) for CONFIG as a Ray job.

    Arguments after CONFIG are passed to the stage (e.g. `-- --model DIR` for eval)."""
    from cluster import jobs

    cfg = load_config(config)
    addr = jobs.default_address(address)
    sid, new = jobs.submit(stage, cfg, addr, list(extra))
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
    from stages.bootstrap import read_meta, run_bootstrap, summary_lines

    cfg = load_config(config)
    final = run_bootstrap(cfg, out)
    meta = read_meta(final)
    click.echo(f"teacher saved to {final} (train {meta['train_seconds']}s, "
               f"rope_theta {meta['rope_parameters']['rope_theta']:g})")
    for line in summary_lines(meta):
        click.echo(line)


# ----------------------------------------------------------------------------- eval / analyze


@cli.command("eval")
@config_arg
@click.option("--model", "models", multiple=True, required=True, type=click.Path(file_okay=False),
              help="A Hugging Face model directory; repeat to compare teacher and students.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output directory (default: <run.out_dir>/eval).")
def eval_cmd(config: str, models: tuple[str, ...], out: str | None) -> None:
    """Passkey / needle heatmaps, loss by position and a comparison table for each --model."""
    from stages.evaluate.run import run_eval

    run_eval(load_config(config), list(models), out)


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
    from stages.analyze.perturb import run_perturb

    run_perturb(load_config(config), model, out)


@analyze.command("query-spans")
@click.option("--before", required=True, type=click.Path(file_okay=False), help="Model before extension.")
@click.option("--after", required=True, type=click.Path(file_okay=False), help="Model after extension.")
@click.option("--windows", default=None, help="Phase windows to mark, e.g. 256,1024 "
              "(default: the config's train.phases, else both models' max_position_embeddings).")
@click.option("--config", "config", default=None, type=click.Path(dir_okay=False),
              help="Run config: output under <run.out_dir>/analyze/query_spans, windows from train.phases.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Output directory.")
def analyze_query_spans(before: str, after: str, windows: str | None, config: str | None, out: str | None) -> None:
    """Relative update of W_q and W_k per layer, head and RoPE frequency pair."""
    from stages.analyze.query_spans import parse_windows, run_query_spans

    run_query_spans(before, after, parse_windows(windows), load_config(config) if config else None, out)


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
@click.option("--force", is_flag=True, help="Rebuild every shard.")
@click.option("--phase", type=int, default=None, help="Cache the windows of train.phases[N] instead of pack.")
def cache_run(config: str, address: str | None, force: bool, phase: int | None) -> None:
    """Run the teacher over the packed windows (packs first if needed) into fingerprinted shards."""
    from stages.cache.stage import run_cache

    cfg = load_config(config)
    if phase is not None and not 0 <= phase < len(cfg.train.phases):
        raise UserError(f"--phase {phase}: the config has {len(cfg.train.phases)} train.phases")
    click.echo(run_cache(cfg, phase_index=phase, address=address, force=force))


@cache.command("verify")
@click.argument("cache_dir", type=click.Path(file_okay=False))
@click.option("--deep", is_flag=True, help="Also read every page and check its checksum.")
def cache_verify(cache_dir: str, deep: bool) -> None:
    """Check every shard's footer, fingerprint, completion flag, rows and window coverage."""
    from stages.cache.verify import verify_cache

    problems = verify_cache(cache_dir, deep=deep)
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

    summary = cache_summary(cache_dir)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))



# ----------------------------------------------------------------------------- train / export


@cli.command()
@config_arg
@click.option("--resume", is_flag=True, help="Require a complete checkpoint to continue from (a plain re-run "
              "also continues from the newest one).")
@click.option("--workers", type=int, default=None, help="Ranks to start (default: train.workers).")
def train(config: str, resume: bool, workers: int | None) -> None:
    """Train the student phase by phase with DeepSpeed (KD from the teacher cache, or CE)."""
    from stages.train.launch import run_training

    out = run_training(load_config(config), resume=resume, workers=workers)
    click.echo(f"train: model in {out}")


@cli.command()
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32")
def export(ckpt: str, out: str, dtype: str) -> None:
    """Export a training checkpoint (a step-* dir, a checkpoints dir or a run dir) as a
    Hugging Face directory."""
    from stages.train.export import export_checkpoint

    click.echo(f"export: wrote {export_checkpoint(ckpt, out, dtype=dtype)}")

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
    try:
        cli.main(standalone_mode=False)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()

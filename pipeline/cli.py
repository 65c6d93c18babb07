"""The ``posdistill`` command line. Each command validates the config, then hands off to a stage.

Imports of heavy libraries (torch, ray, deepspeed) happen inside commands so that
``--help`` and config errors answer instantly.
"""

from __future__ import annotations

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


def main() -> None:
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

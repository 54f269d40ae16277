"""What every `wss` command shares: the -c/-o options, loading the run config, logging, and the
one handler that turns user errors into a one-line message (no traceback) and Ctrl-C into
advice and exit 130. The commands themselves are registered in pipeline/cli.py."""

from __future__ import annotations

import errno
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

# Before torch is imported: idle OpenMP threads sleep instead of spinning, which on a small
# CPU shared with data-loader workers made training steps 2x and inference 15x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under torchrun (several processes, one job) rank 0 tells the story: the other ranks draw no
# progress bars (tqdm reads this when it is imported) and log only warnings.
SIDE_RANK = int(os.environ.get("RANK", "0")) > 0
if SIDE_RANK:
    os.environ.setdefault("TQDM_DISABLE", "1")

import click  # noqa: E402

from data.errors import WssError  # noqa: E402

# Errors of the place a command writes to (permissions, a read-only or full disk): the user's
# to fix, reported in one line; the work already committed is complete and stays.
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}

# What a user can do after Ctrl-C, by command.
RESUMABLE = (
    "unfinished work is left in a .partial directory that is never reused as a result; the same "
    "command with `--resume` continues it (training from its last checkpoint, files already "
    "written kept), without it the stage starts again"
)
AFTER_INTERRUPT = {
    "run": RESUMABLE,
    "run-stage": RESUMABLE,
    "pseudo-labels": RESUMABLE,
    "compare": "rerun the same command: the methods already computed are reused from the cache, "
    "the interrupted one starts again",
    "prepare": "rerun the same command: the images already prepared are kept, the rest are "
    "prepared; the folder is not a dataset until it finishes",
}


def command_name(ctx: click.Context) -> str | None:
    """The top-level command being run: `prepare` for `wss prepare siim`, `predict` for the
    predict command invoked on its own."""
    return ctx.find_root().invoked_subcommand or ctx.info_name


@contextmanager
def user_errors(ctx: click.Context):
    """A WssError or an unwritable output as `error: ...` (exit 2), Ctrl-C as `interrupted: `
    and what the command leaves to do (exit 130)."""
    try:
        yield
    except WssError as error:
        click.echo(f"error: {error}", err=True)
        ctx.exit(2)
    except OSError as error:
        if error.errno not in UNWRITABLE:
            raise
        where = f" {error.filename}" if error.filename else ""
        click.echo(f"error: cannot write{where}: {error.strerror}", err=True)
        ctx.exit(2)
    except KeyboardInterrupt:
        click.echo(f"interrupted: {AFTER_INTERRUPT.get(command_name(ctx), 'nothing was lost')}", err=True)
        ctx.exit(130)


class WssCommand(click.Command):
    """A command whose user errors end in one line, also when it is invoked on its own."""

    def invoke(self, ctx):
        with user_errors(ctx):
            return super().invoke(ctx)


class WssGroup(click.Group):
    """A group whose commands (and subgroups) are WssCommands (WssGroups); its own callback's
    user errors end in one line too."""

    command_class = WssCommand
    group_class = type  # subgroups of the same class

    def invoke(self, ctx):
        with user_errors(ctx):
            return super().invoke(ctx)


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (CliRunner and notebooks swap it between runs)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_wss", False) for h in root.handlers):
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._wss = True
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if SIDE_RANK:
        root.setLevel(logging.WARNING)


CONFIG_HELP = "YAML run config; repeat to layer a preset over it."
OVERRIDE_HELP = "Override a config value, e.g. -o cam.epochs=3 (repeatable)."


def config_options(func=None, *, config_help: str = CONFIG_HELP, override_help: str = OVERRIDE_HELP):
    """The -c/--config (repeatable, required) and -o/--override (repeatable) options, as the
    `config_path` and `overrides` arguments; a command may word their help for itself."""

    def decorate(func):
        func = click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE", help=override_help)(
            func
        )
        return click.option(
            "-c",
            "--config",
            "config_path",
            required=True,
            multiple=True,
            type=click.Path(dir_okay=False, path_type=Path),
            help=config_help,
        )(func)

    return decorate if func is None else decorate(func)


def load(config_path: tuple[Path, ...] | list[Path], overrides: tuple[str, ...] | list[str], *, show_logs: bool = True):
    """The run config of the -c files (in order) and -o overrides; with `show_logs`, the log
    goes to stderr at the level run.verbose asks for."""
    from pipeline.config import load_config

    cfg = load_config(list(config_path), overrides)
    if show_logs:
        setup_logging(cfg.run.verbose)
    return cfg

"""The `wss` command line: one command per job. User errors print one line and exit non-zero."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from data.errors import WssError

log = logging.getLogger("wss")


class WssGroup(click.Group):
    """Turns user errors into a one-line message (no traceback) and Ctrl-C into exit 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WssError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: unfinished work is left in a .partial directory that is never reused "
                       "as a result (`--resume` continues training)", err=True)
            ctx.exit(130)


def setup_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_wss", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._wss = True
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def config_options(func):
    func = click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a config value, e.g. -o cam.epochs=3 (repeatable).")(func)
    func = click.option("-c", "--config", "config_path", required=True,
                        type=click.Path(dir_okay=False, path_type=Path), help="YAML run config.")(func)
    return func


def load(config_path: Path, overrides: tuple[str, ...]):
    from pipeline.config import load_config
    cfg = load_config(config_path, overrides)
    setup_logging(cfg.run.verbose)
    return cfg


@click.group(cls=WssGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """wss: weakly supervised semantic segmentation, from image-level labels to pixel masks.

    \b
    Quick start:
      wss prepare synthetic --out runs/data/synthetic
      wss run -c configs/demo.yaml
    """


# ------------------------------------------------------------------------------------ prepare
@main.group()
def prepare():
    """Convert a raw dataset into the prepared layout every stage reads."""


@prepare.command("synthetic")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", default=400, show_default=True, help="Number of images.")
@click.option("--size", default=128, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True)
@click.option("--variant", type=click.Choice(["multiclass", "binary"]), default="multiclass", show_default=True,
              help="binary mimics SIIM: one finding class, many negative images.")
@click.option("--force", is_flag=True, help="Rewrite even if an identical dataset is already there.")
def prepare_synthetic(out: Path, n: int, size: int, seed: int, variant: str, force: bool):
    """Generate the synthetic benchmark (deterministic in --seed).

    \b
    Example:
      wss prepare synthetic --out runs/data/synthetic --n 400 --size 128 --seed 0
    """
    import json

    from tqdm.auto import tqdm

    from data.synthetic import SyntheticSpec, write_synthetic
    setup_logging()
    spec = SyntheticSpec(n=n, size=size, seed=seed, variant=variant)
    stamp = out / "synthetic.json"
    wanted = json.dumps(spec.__dict__, sort_keys=True)
    if not force and stamp.is_file() and stamp.read_text() == wanted and (out / "dataset.json").is_file():
        click.echo(f"synthetic dataset already prepared in {out} (same spec), skipping")
        return
    (out / "dataset.json").unlink(missing_ok=True)
    write_synthetic(out, spec, progress=lambda ids: tqdm(ids, desc="synthetic", unit="img"))
    stamp.write_text(wanted)
    click.echo(f"wrote {n} images to {out}")


# ---------------------------------------------------------------------------------- run stages
@main.command("run-stage")
@click.argument("stage")
@config_options
@click.option("--force", is_flag=True, help="Recompute even if an up-to-date artifact exists.")
@click.option("--resume", is_flag=True, help="Continue an interrupted training from its last checkpoint.")
@click.option("--limit", type=int, default=None, help="Use only the first N images of each split (quick tries).")
def run_stage(stage: str, config_path: Path, overrides, force: bool, resume: bool, limit: int | None):
    """Run one stage (its inputs must be up to date).

    \b
    Example:
      wss run-stage cam -c configs/demo.yaml -o cam.epochs=3
    """
    from pipeline.report import print_outcomes
    from pipeline.runner import Pipeline
    cfg = load(config_path, overrides)
    pipeline = Pipeline(cfg)
    outcome = pipeline.run_stage(stage, force=force, resume=resume, limit=limit)
    print_outcomes([outcome])


@main.command("run")
@config_options
@click.option("--until", default=None, help="Last stage to run.")
@click.option("--force", "force", multiple=True, help="Recompute this stage and everything after it (repeatable).")
def run(config_path: Path, overrides, until: str | None, force: tuple[str, ...]):
    """Run the whole chain, skipping stages whose artifact is up to date.

    \b
    Example:
      wss run -c configs/demo.yaml
      wss run -c configs/demo.yaml --until cam --force cam
    """
    from pipeline.report import print_outcomes
    from pipeline.runner import Pipeline
    cfg = load(config_path, overrides)
    pipeline = Pipeline(cfg)
    for name in force:
        pipeline.stage(name)
    outcomes = pipeline.run(until=until, force=force)
    print_outcomes(outcomes)


@main.command("status")
@config_options
def status(config_path: Path, overrides):
    """Show every stage as up to date, stale (and why) or missing.

    \b
    Example:
      wss status -c configs/demo.yaml
    """
    from pipeline.runner import Pipeline
    cfg = load(config_path, overrides)
    for item in Pipeline(cfg).status():
        where = f"  {item.path}" if item.path else ""
        click.echo(f"{item.stage:8s} {item.state}{where}")
        for reason in item.reasons:
            click.echo(f"           - {reason}")


@main.command("evaluate")
@config_options
@click.option("--stage", "which", default="all", show_default=True, help="all, or one stage name.")
def evaluate(config_path: Path, overrides, which: str):
    """Score the up-to-date artifacts where ground truth exists; write evaluation.csv/json.

    \b
    Example:
      wss evaluate -c configs/demo.yaml --stage cam
    """
    from pipeline.report import evaluate_artifacts
    cfg = load(config_path, overrides)
    evaluate_artifacts(cfg, which)


# -------------------------------------------------------------------------------------- config
@main.group()
def config():
    """Inspect run configs."""


@config.command("show")
@config_options
def config_show(config_path: Path, overrides):
    """Print the resolved config (file + base + overrides, with every default).

    \b
    Example:
      wss config show -c configs/demo.yaml -o cam.epochs=3
    """
    cfg = load(config_path, overrides)
    click.echo(cfg.dump(), nl=False)


if __name__ == "__main__":
    main()

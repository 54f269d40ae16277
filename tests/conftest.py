"""Shared fixtures: tiny synthetic datasets made once per test session, and the CLI runner.

    synthetic_dataset(n=32, size=64, seed=0, variant="multiclass") -> Path
        a prepared synthetic dataset; identical requests share one directory, so treat it as
        read-only (copy it with shutil.copytree before changing files in it).
    tiny_synthetic        the default one above (32 images of 64 px, 3 classes)
    cli(*args)            invoke `wss ...` in-process; returns click's Result (also invoke_cli)
    demo_overrides(root, workdir)   `-o` pairs that point configs/demo.yaml at a tiny, fast run
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as pipeline/cli.py: no spinning threads

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

# A cam run that takes seconds on a CPU: resnet18 from scratch, 64 px, one scale.
FAST_CAM = {
    "cam.backbone": "resnet18",
    "cam.weights": "null",
    "cam.epochs": "4",
    "cam.batch_size": "8",
    "cam.optimizer": "adamw",
    "cam.lr": "0.002",
    "cam.head_lr_mult": "1.0",
    "cam.crop_size": "64",
    "cam.resize_long": "[56,72]",
    "cam.scales": "[1.0]",
    "cam.flip": "false",
    "run.workers": "0",
    "run.device": "cpu",
}


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    from data.synthetic import SyntheticSpec, write_synthetic
    made: dict[SyntheticSpec, Path] = {}

    def make(n: int = 32, size: int = 64, seed: int = 0, variant: str = "multiclass") -> Path:
        spec = SyntheticSpec(n=n, size=size, seed=seed, variant=variant)
        if spec not in made:
            made[spec] = write_synthetic(tmp_path_factory.mktemp(f"syn-{variant}-{n}-{size}-{seed}"), spec)
        return made[spec]

    return make


@pytest.fixture(scope="session")
def tiny_synthetic(synthetic_dataset) -> Path:
    return synthetic_dataset()


def invoke_cli(*args):
    """`wss *args` in-process; stdout, stderr and log lines all land in result.output."""
    import logging

    from click.testing import CliRunner

    from pipeline.cli import main
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_wss", False)]:
        # the CLI's log handler holds the stderr of the invocation that made it: start afresh
        root.removeHandler(handler)
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture
def cli():
    return invoke_cli


def overrides(values: dict) -> list[str]:
    """{"cam.epochs": 2} -> ["-o", "cam.epochs=2"]."""
    args: list[str] = []
    for key, value in values.items():
        args += ["-o", f"{key}={value}"]
    return args


@pytest.fixture
def demo_overrides():
    def make(root: Path, workdir: Path, **extra) -> list[str]:
        values = {"data.root": root, "run.workdir": workdir, **FAST_CAM}
        values.update({k.replace("__", "."): v for k, v in extra.items()})
        return overrides(values)

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """On a shared, loaded CPU two OpenMP threads wait on each other: one is several times faster.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

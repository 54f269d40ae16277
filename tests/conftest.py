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

from tests.helpers import FAST_CAM, invoke_cli, overrides

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as pipeline/cli.py: no spinning threads


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


@pytest.fixture
def cli():
    return invoke_cli


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

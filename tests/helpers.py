"""What tests share besides fixtures: the repository's paths, fast settings, the in-process CLI.

Import it as `from tests.helpers import ...` (conftest.py holds only fixtures, which pytest
finds by itself).
"""

from __future__ import annotations

from pathlib import Path

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


def overrides(values: dict) -> list[str]:
    """{"cam.epochs": 2} -> ["-o", "cam.epochs=2"]."""
    args: list[str] = []
    for key, value in values.items():
        args += ["-o", f"{key}={value}"]
    return args

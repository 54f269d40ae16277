"""Two nodes simulated on one machine: two torchrun agents (`--nnodes 2 --nproc_per_node 1`, c10d
rendezvous on 127.0.0.1, Gloo), each starting one `wss run` process, so the two processes have
separate node ranks (GROUP_RANK 0 and 1) and both have LOCAL_RANK 0.

With a shared workdir every stage commits once, with the metrics of every image, under the keys
a one-process run uses, and the trained models and per-image files equal the one-process run's
where the arithmetic is the same (see test_two_nodes_commit_each_stage_once_and_equal_one_process).
With a workdir the nodes do not share, the run stops at its first stage instead of committing
an artifact that holds one node's share.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import DEMO_CONFIG, REPO
from tests.test_run_chain import FAST_CHAIN

BIN = Path(sys.executable).parent
TORCHRUN = BIN / "torchrun"
STAGES = ("cam", "irn", "pseudo", "seg")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def decoded(done: subprocess.CompletedProcess) -> tuple[str, str]:
    # not text=True: its universal newlines would turn each "\r" of a progress bar into a line end
    return done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def two_nodes(args: list[str], cwds: tuple[Path, Path]) -> list[tuple[int, str, str]]:
    """`wss run ARGS` under two torchrun agents, node ranks 0 and 1, each in its own folder;
    (exit code, stdout, stderr) of each agent."""
    if not TORCHRUN.is_file():
        pytest.skip(f"no torchrun beside {sys.executable}")
    port, run_id = free_port(), f"wss-test-{uuid.uuid4().hex[:8]}"
    agents = [
        subprocess.Popen(
            [
                str(TORCHRUN),
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                f"--rdzv_id={run_id}",
                "--max_restarts=0",
                "--no-python",
                str(BIN / "wss"),
                "run",
                *args,
            ],
            cwd=cwd,
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank, cwd in enumerate(cwds)
    ]
    results = []
    try:
        for agent in agents:
            stdout, stderr = agent.communicate(timeout=600)
            results.append((agent.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    return results


def one_process(args: list[str], cwd: Path) -> None:
    done = subprocess.run(
        [str(BIN / "wss"), "run", *args], cwd=cwd, env=environment(), capture_output=True, timeout=600
    )
    assert done.returncode == 0, decoded(done)[1][-3000:]


def chain_args(root: Path, workdir: Path | str, train_images: int) -> list[str]:
    """FAST_CHAIN with a classifier that trains as one process does: each step takes the whole
    train split as its global batch (a data-parallel step then averages the same gradient), plain
    SGD, and BatchNorm that keeps its statistics (cam.freeze_bn)."""
    values = {
        **FAST_CHAIN,
        "data.root": root,
        "run.workdir": workdir,
        "cam.optimizer": "sgd",
        "cam.lr": "0.05",
        "cam.momentum": "0.9",
        "cam.freeze_bn": "true",
        "cam.batch_size": train_images,
    }
    args = ["-c", str(DEMO_CONFIG)]
    for key, value in values.items():
        args += ["-o", f"{key}={value}"]
    return args


def artifacts(workdir: Path) -> dict[str, Path]:
    found = {}
    for stage in STAGES:
        folders = sorted((workdir / "synthetic").glob(f"{stage}-*"))
        assert len(folders) == 1, f"{stage}: {folders}"  # committed once
        found[stage] = folders[0]
    leftovers = [p.name for p in (workdir / "synthetic").iterdir() if ".partial" in p.name or ".old" in p.name]
    assert not leftovers, leftovers
    return found


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def pixels_equal(first: Path, second: Path) -> float:
    from data.layout import read_index_png

    a, b = read_index_png(first), read_index_png(second)
    assert a.shape == b.shape, (first, a.shape, b.shape)
    return float((a == b).mean())


@pytest.mark.slow  # two chains of four stages: 30 s to a minute on a 2-core CPU
def test_two_nodes_commit_each_stage_once_and_equal_one_process(tmp_path, synthetic_dataset):
    """Must be equal to one process's: the keys (artifact names); the classifier's weights (up to
    float rounding: the two halves' gradients are summed in another order); the CAMs (float16
    files, within two of their steps near 1) and the seeds made from them (all but a few pixels
    where a CAM sits on a threshold). Trained otherwise, so only complete: the IRN, whose loss
    averages over each process's own pixel pairs (a data-parallel step averages the two halves'
    means, not the whole batch's), hence the pseudo-labels; the segmenter, whose BatchNorm
    normalises each process's half batch with that half's statistics."""
    import torch

    from data.layout import PreparedDataset
    from stages.cam.infer import load_cam

    root = synthetic_dataset()
    data = PreparedDataset(root)
    train, val = data.split("train"), data.split("val")
    shared = tmp_path / "shared"
    nodes = (tmp_path / "node0", tmp_path / "node1")
    for folder in nodes:
        folder.mkdir()
    results = two_nodes(chain_args(root, shared, len(train)), nodes)
    for code, stdout, stderr in results:
        assert code == 0, stderr[-3000:]
    reports = [stdout.count("report:") for _, stdout, _ in results]
    assert sorted(reports) == [0, 1], reports  # global rank 0 alone reports, on whichever node it is
    two = artifacts(shared)
    one_process(chain_args(root, tmp_path / "one", len(train)), tmp_path)
    one = artifacts(tmp_path / "one")
    assert {s: p.name for s, p in two.items()} == {s: p.name for s, p in one.items()}  # the same keys

    manifests = {stage: json.loads((two[stage] / "manifest.json").read_text()) for stage in STAGES}
    for stage, manifest in manifests.items():
        assert manifest["failures"] == [], (stage, manifest["failures"])
    metrics = {stage: manifest["metrics"] for stage, manifest in manifests.items()}
    assert metrics["cam"]["cam_scored_images"] == len(train)  # rank 0 scored both nodes' files
    assert metrics["irn"]["seed_scored_images"] == len(train)
    assert metrics["pseudo"]["pseudo_images"] == metrics["pseudo"]["pseudo_scored_images"] == len(train)
    assert metrics["seg"]["seg_train_scored_images"] == len(train)
    assert metrics["seg"]["seg_val_scored_images"] == len(val)

    reference = tensors(one["cam"] / "model.safetensors")
    for name, weights in tensors(two["cam"] / "model.safetensors").items():
        torch.testing.assert_close(weights, reference[name], rtol=1e-4, atol=1e-5, msg=name)
    for image_id in train:
        (cam_two, keys_two, size_two), (cam_one, keys_one, size_one) = (
            load_cam(two["cam"] / "cams" / f"{image_id}.npz"),
            load_cam(one["cam"] / "cams" / f"{image_id}.npz"),
        )
        assert list(keys_two) == list(keys_one) and tuple(size_two) == tuple(size_one)
        np.testing.assert_allclose(cam_two.astype(np.float32), cam_one.astype(np.float32), atol=2e-3, err_msg=image_id)
    agreement = np.mean(
        [pixels_equal(two["irn"] / "seeds" / f"{i}.png", one["irn"] / "seeds" / f"{i}.png") for i in train]
    )
    assert agreement >= 0.999, agreement
    for stage, folder, ids in (("pseudo", "pseudo_labels", train), ("seg", "predictions", train + val)):
        assert {p.stem for p in (two[stage] / folder).glob("*.png")} == set(ids), stage


@pytest.mark.slow
def test_a_workdir_the_nodes_do_not_share_is_refused(tmp_path, synthetic_dataset):
    """A relative run.workdir resolves in each agent's own folder: two nodes with node-local
    storage. Each rank would write its share of the CAMs into its own folder and rank 0 would
    commit an artifact holding half of them; the run stops before computing, on both nodes."""
    root = synthetic_dataset()
    nodes = (tmp_path / "node0", tmp_path / "node1")
    for folder in nodes:
        folder.mkdir()
    results = two_nodes(chain_args(root, "work", 26), nodes)
    for code, _, stderr in results:
        assert code != 0
        assert "error: run.workdir is not shared by every process: rank 1 on " in stderr, stderr[-3000:]
    for folder in nodes:
        assert not list(folder.glob("work/synthetic/cam-*")), "an artifact was committed"

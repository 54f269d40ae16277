"""Several processes under torchrun (Gloo on the CPU): data-parallel training equals one
process, and `wss run` shards the per-image work, commits each artifact once and reuses it."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import DEMO_CONFIG, REPO
from tests.test_run_chain import FAST_CHAIN, states

BIN = Path(sys.executable).parent
TORCHRUN = BIN / "torchrun"


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    if not TORCHRUN.is_file():
        pytest.skip(f"no torchrun beside {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for _ in range(3):
        done = subprocess.run(
            [str(TORCHRUN), "--standalone", "--nproc_per_node=2", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            timeout=300,
        )
        # decoded here, not with text=True: its universal newlines would turn each "\r" of a progress
        # bar's refresh into a line end, and a refresh at 100% would read as a second closing line
        done.stdout, done.stderr = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
        if done.returncode == 0 or EXIT_ABORT not in done.stderr:
            return done
    return done


# About one run in ten to twenty on a loaded 2-core machine, rank 0 aborts in torch's C++
# teardown at interpreter exit, after its work, the barrier and destroy_process_group have all
# returned (a thread still joinable at exit). Nothing of wss runs then; such a run is repeated.
EXIT_ABORT = "terminate called without an active exception"


@pytest.mark.slow
def test_fit_on_two_processes_equals_one_process(tmp_path):
    from tests.distributed_fit import train

    done = torchrun(str(REPO / "tests" / "distributed_fit.py"), str(tmp_path / "two.pt"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    train(tmp_path / "one.pt")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name, weights in one["model"].items():
        torch.testing.assert_close(two["model"][name], weights, rtol=1e-5, atol=1e-6, msg=name)
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-6)
    assert one["history"][0]["loss"] != pytest.approx(one["history"][-1]["loss"], rel=1e-4)  # it did train


@pytest.mark.slow
def test_wss_run_on_two_processes_shards_the_work_and_commits_once(tmp_path, synthetic_dataset, cli):
    from data.layout import PreparedDataset

    root = synthetic_dataset()
    args = ["-c", str(DEMO_CONFIG), "-o", f"data.root={root}", "-o", f"run.workdir={tmp_path / 'work'}"]
    for key, value in {**FAST_CHAIN, "seg.checkpoint": "pseudo_holdout"}.items():
        args += ["-o", f"{key}={value}"]
    done = torchrun("--no-python", str(BIN / "wss"), "run", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("report:") == 1  # rank 0 alone reports
    train_ids = PreparedDataset(root).split("train")
    # a bar's closing line ends with a newline; a refresh at 100% just before it ends with the "\r" of the next
    share = re.findall(r"cam inference: 100%\|[^|]*\| (\d+)/\1 \[[^\]\n]*\]\n", done.stderr)
    assert share == [str(math.ceil(len(train_ids) / 2))], share  # rank 0 drew its half; rank 1 drew none

    from pipeline.config import load_config
    from pipeline.runner import Pipeline

    pipeline = Pipeline(load_config([DEMO_CONFIG], [a for a in args[3::2]]))
    per_image = {
        "cam": ("cams", ".npz"),
        "irn": ("seeds", ".png"),
        "pseudo": ("pseudo_labels", ".png"),
        "seg": ("predictions", ".png"),
    }
    for stage, (folder, suffix) in per_image.items():
        artifact = pipeline.artifact(stage)
        assert artifact is not None, f"{stage}: no complete artifact"
        assert set(train_ids) <= {p.stem for p in (artifact / folder).glob(f"*{suffix}")}, stage
        manifest = pipeline.store.read_manifest(artifact)
        rescored = pipeline.stage(stage).evaluate(pipeline.cfg, pipeline.dataset, artifact)
        for name, value in rescored.items():  # metrics from every rank's files, not rank 0's share
            assert manifest["metrics"][name] == pytest.approx(value, nan_ok=True), (stage, name)
    assert not list((tmp_path / "work").rglob("*.partial"))
    for stage in per_image:  # one TensorBoard event file per artifact: rank 0's
        events = list((tmp_path / "work" / "synthetic" / "tensorboard" / pipeline.artifact(stage).name).iterdir())
        assert len(events) == 1 and events[0].name.startswith("events.out.tfevents."), (stage, events)

    again = cli("run", *args)  # one process finds what two computed: the key does not count processes
    assert again.exit_code == 0, again.output
    assert states(again.output) == dict.fromkeys(["cam", "irn", "pseudo", "seg"], "cache hit")


def test_single_process_commands_refuse_torchrun(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = cli("status", "-c", str(DEMO_CONFIG), "-o", f"run.workdir={tmp_path}")
    assert result.exit_code == 2
    assert "`wss status` runs in one process" in result.output and "run, run-stage, pseudo-labels" in result.output


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    from data.errors import WssError
    from stages.common import distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(WssError, match="process 2 on this machine but it has 2 GPU.*--nproc_per_node=2"):
        distributed.init_from_env("auto")
    assert not distributed.active()


def test_global_batch_must_split_evenly(monkeypatch):
    from data.errors import WssError
    from stages.common import distributed
    from stages.common.training import per_process_batch

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    assert per_process_batch(12) == 4
    with pytest.raises(WssError, match="batch_size 16 does not split evenly over 3 processes"):
        per_process_batch(16)


def test_shard_covers_every_item_once(monkeypatch):
    from stages.common import distributed

    items = [f"id{i}" for i in range(11)]
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        shares.append(distributed.shard(items))
    assert sorted(sum(shares, [])) == sorted(items) and [len(s) for s in shares] == [4, 4, 3]

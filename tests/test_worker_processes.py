"""No process outlives its command: the workers of `wss predict` (data-loader workers) and of
`wss prepare` (a process pool) end with it on success, on an error in a worker or in the main
process, on Ctrl-C, and when the main process is killed outright (SIGKILL, as the kernel's
out-of-memory killer does), when they would otherwise wait forever on a pipe to a dead process.

Every command runs in a session of its own with a marker in its environment, which its
workers inherit: after the command, any live process (zombies hold nothing) whose environment
carries the marker is a leftover, whoever its parent now is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO
from tests.test_big_images import BINARY, write_tiny_artifact
from tests.test_nih import write_entries

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")
MARK = "WSS_TEST_PROCESS_MARK"

# `wss` with one function replaced first: the tests' way to fail or slow down inside a worker.
# A pool sends its function by name, so the replacement takes the name of the one it replaces.
CLI = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import {module} as target
    original = getattr(target, {name!r})

    def replaced(*args, **kwargs):
        {body}
        return original(*args, **kwargs)

    replaced.__module__, replaced.__qualname__ = {module!r}, {name!r}
    setattr(target, {name!r}, replaced)
    from pipeline.cli import main
    main()
""")


def marked_processes(marker: str) -> list[tuple[int, str, str]]:
    """(pid, state, name) of the live processes whose environment holds the marker."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if f"{MARK}={marker}".encode() not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{entry}/comm") as handle:
                name = handle.read().strip()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if state not in ("Z", "X"):
            found.append((int(entry), state, name))
    return found


def wait_for(condition, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


class Command:
    """A `wss` command in its own session, marked; kills whatever of it is left at the end."""

    def __init__(
        self, tmp_path: Path, args: list[str], module: str = "pipeline.cli", name: str = "main", body: str = "pass"
    ):
        self.marker = uuid.uuid4().hex
        script = tmp_path / f"wss_{self.marker[:8]}.py"
        script.write_text(CLI.format(repo=str(REPO), module=module, name=name, body=body))
        env = dict(os.environ, **{MARK: self.marker}, PYTHONPATH=str(REPO), TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
        self.process = subprocess.Popen(
            [sys.executable, str(script), *map(str, args)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def workers(self) -> list[tuple[int, str, str]]:
        return [p for p in marked_processes(self.marker) if p[0] != self.process.pid]

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out + err

    def leftovers(self, grace: float) -> list[tuple[int, str, str]]:
        """The marked processes still alive after up to `grace` seconds."""
        wait_for(lambda: not marked_processes(self.marker), grace)
        return marked_processes(self.marker)

    def cleanup(self) -> None:
        for pid, _, _ in marked_processes(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.fixture(scope="module")
def predict_inputs_folder(tmp_path_factory):
    """An untrained model that predicts at 256 px, and 8 noisy 800 x 800 images: each one a
    loader worker hands over (1.9 MB pickled) fills the pipe, while the main process takes a
    while over every prediction, so workers wait with an image in hand."""
    return predict_inputs(tmp_path_factory.mktemp("workers-predict"), 8)


@pytest.fixture(scope="module")
def long_predict_inputs_folder(tmp_path_factory):
    """The same with 64 images: a predict that is surely still running when it is interrupted
    (8 take about a second on an idle machine)."""
    return predict_inputs(tmp_path_factory.mktemp("workers-predict-long"), 64)


def predict_inputs(root: Path, count: int) -> list:
    artifact = write_tiny_artifact(root / "model", BINARY, long_side=256)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(images / f"{k}.png", compress_level=0)
    config = root / "predict.yaml"
    config.write_text(f"data:\n  root: {root / 'no-dataset'}\nrun:\n  device: cpu\n  workers: 2\n")
    return ["predict", "-c", config, images, "--out", root / "out", "--artifact", artifact]


@pytest.fixture
def nih_release(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for k in range(40):
        Image.fromarray(np.full((24, 32), 10 * (k % 20), np.uint8)).save(images / f"{k:08d}_000.png")
        rows.append((f"{k:08d}_000.png", "Mass" if k % 2 else "No Finding", str(k)))
    write_entries(tmp_path / "entry.csv.gz", rows)
    (tmp_path / "boxes.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")
    return [
        "prepare",
        "nih",
        "--images",
        images,
        "--data-entry",
        tmp_path / "entry.csv.gz",
        "--boxes",
        tmp_path / "boxes.csv",
        "--out",
        tmp_path / "out",
        "--workers",
        "2",
    ]


def started(command: Command, workers: int, timeout: float = 90) -> None:
    assert wait_for(lambda: len(command.workers()) >= workers, timeout), "the command's workers never started"


@pytest.mark.slow
def test_a_killed_predict_leaves_no_loader_worker(predict_inputs_folder, tmp_path):
    command = Command(tmp_path, predict_inputs_folder)
    try:
        started(command, 2)
        time.sleep(2)  # workers decode and hand images over while the main process predicts
        os.kill(command.process.pid, signal.SIGKILL)
        command.process.wait()
        assert command.leftovers(grace=10) == []
    finally:
        command.cleanup()


def test_a_killed_prepare_leaves_no_pool_worker(nih_release, tmp_path):
    """A pool worker notices a dead parent only when it asks for its next task: one busy with a
    long image (a 30 s one here) would go on for that long. It ends with its command."""
    command = Command(tmp_path, nih_release, "data.nih", "_prepare_image", "time.sleep(30)")
    try:
        started(command, 2)
        time.sleep(1)
        os.kill(command.process.pid, signal.SIGKILL)
        command.process.wait()
        assert command.leftovers(grace=10) == []
    finally:
        command.cleanup()


@pytest.mark.slow
def test_ctrl_c_ends_predict_and_its_workers_at_once(long_predict_inputs_folder, tmp_path):
    """Loader workers leave Ctrl-C to the main process, whose shutdown ends them at once; a
    worker that took it waited at its exit to hand over an image nobody reads, and the shutdown
    waited 5 s for each such worker before terminating it (22 s in all here)."""
    command = Command(tmp_path, long_predict_inputs_folder)
    masks = Path(long_predict_inputs_folder[long_predict_inputs_folder.index("--out") + 1]) / "masks"
    try:
        started(command, 2)
        # interrupted while predicting: after the first mask, long before the 64th
        assert wait_for(lambda: masks.is_dir() and any(masks.iterdir()), 90), "predict never wrote a mask"
        interrupted = time.monotonic()
        os.killpg(command.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code, output = command.finish()
        assert time.monotonic() - interrupted < 8
        assert code == 130 and "interrupted" in output, output[-2000:]
        assert "Traceback" not in output, output[-2000:]
        assert command.leftovers(grace=10) == []
    finally:
        command.cleanup()


def test_an_error_inside_a_pool_worker_ends_the_command_and_every_worker(nih_release, tmp_path):
    command = Command(
        tmp_path, nih_release, "data.nih", "_prepare_image", "raise RuntimeError('failed inside a worker')"
    )
    try:
        code, output = command.finish()
        assert code != 0 and "failed inside a worker" in output, output[-2000:]
        assert command.leftovers(grace=10) == []
    finally:
        command.cleanup()


@pytest.mark.slow
def test_an_error_in_the_main_process_ends_the_loader_workers(predict_inputs_folder, tmp_path):
    command = Command(
        tmp_path,
        predict_inputs_folder,
        "stages.seg.predict",
        "predict_mask",
        "time.sleep(1); raise RuntimeError('failed in the main process')",
    )
    try:
        code, output = command.finish()
        assert code != 0 and "failed in the main process" in output, output[-2000:]
        assert command.leftovers(grace=10) == []
    finally:
        command.cleanup()


@pytest.mark.slow
def test_a_successful_predict_leaves_no_worker(predict_inputs_folder, tmp_path):
    command = Command(tmp_path, [*predict_inputs_folder[:-4], "--out", tmp_path / "out", *predict_inputs_folder[-2:]])
    try:
        code, output = command.finish()
        assert code == 0, output[-2000:]
        assert command.leftovers(grace=5) == []
        assert len(list((tmp_path / "out" / "masks").glob("*.png"))) == 8
    finally:
        command.cleanup()


def test_one_progress_bar_starts_one_set_of_loader_workers():
    """tqdm.auto's bar, given a DataLoader, iterates it twice: the first set of workers decodes
    images nobody reads (see stages.common.runtime.progress)."""
    from torch.utils.data import DataLoader

    from stages.common.runtime import image_loader, progress

    class CountedLoader(DataLoader):
        passes = 0

        def __iter__(self):
            CountedLoader.passes += 1
            return super().__iter__()

    loader = image_loader(list(range(5)), 0)
    loader.__class__ = CountedLoader
    assert list(progress(loader, disable=True)) == [0, 1, 2, 3, 4]
    assert CountedLoader.passes == 1


def test_a_worker_whose_parent_is_gone_ends(tmp_path):
    """end_with_parent: a child that arms it after its parent was killed exits at once (the
    race between the start of a worker and its first line), and one armed before is killed with
    the parent."""
    script = tmp_path / "orphans.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from data.workers import end_with_parent
        parent = os.getpid()
        for arm_late in (True, False):
            if os.fork() == 0:
                if not arm_late:
                    end_with_parent(parent)
                time.sleep(1.0)  # the parent is killed meanwhile
                if arm_late:
                    end_with_parent(parent)
                time.sleep(60)
                os._exit(0)
        time.sleep(0.3)
        os.kill(parent, signal.SIGKILL)
    """)
    )
    marker = uuid.uuid4().hex
    process = subprocess.Popen(
        [sys.executable, str(script)], env=dict(os.environ, **{MARK: marker}), start_new_session=True
    )
    try:
        process.wait(timeout=30)
        assert wait_for(lambda: not marked_processes(marker), 10)
    finally:
        for pid, _, _ in marked_processes(marker):
            os.kill(pid, signal.SIGKILL)

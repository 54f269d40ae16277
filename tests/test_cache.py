"""The artifact cache: which inputs change a stage's key, and atomic completion.

A stage is replaced by a fake here (no training), so these tests exercise only the runner and
the store: a run that raises or is killed must leave nothing that a later run would reuse.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from data.errors import WssError
from pipeline.cache import ArtifactStore, CacheError, StageKey
from pipeline.config import load_config
from pipeline.runner import Pipeline
from stages.base import Stage, StageInputError, StageResult
from stages.common.training import CHECKPOINT
from tests.helpers import DEMO_CONFIG, REPO


def make_pipeline(root, workdir, *overrides: str) -> Pipeline:
    return Pipeline(load_config(DEMO_CONFIG, [f"data.root={root}", f"run.workdir={workdir}", *overrides]))


class FakeCam(Stage):
    """Stands in for the cam stage: writes one file, optionally raises half way."""

    name, needs, section = "cam", (), "cam"

    def __init__(self, fail: BaseException | None = None):
        self.fail, self.calls = fail, 0

    def key_config(self, cfg, task) -> dict:
        from stages.base import section_dict

        return section_dict(cfg.cam)

    def code_version(self) -> str:
        return "fake-1"

    def run(self, cfg, dataset, inputs, out, *, resume=False, limit=None) -> StageResult:
        self.calls += 1
        (out / f"half-{self.calls}.txt").write_text("written before the failure point")
        if self.fail is not None:
            (out / "from-failed-run.txt").write_text("must never reach an artifact")
            raise self.fail
        (out / "result.txt").write_text("done")
        return StageResult(metrics={"cam_miou": 0.5}, headline="cam_miou")


def with_stage(pipeline: Pipeline, stage) -> Pipeline:
    pipeline.stages = {**pipeline.stages, "cam": stage}
    pipeline._keys.clear()
    return pipeline


# ----------------------------------------------------------------------------------- key parts


def test_same_config_same_key(tiny_synthetic, tmp_path):
    first = make_pipeline(tiny_synthetic, tmp_path).key("cam")
    second = make_pipeline(tiny_synthetic, tmp_path).key("cam")
    assert first.digest == second.digest
    assert len(first.short) == 12


@pytest.mark.parametrize("override", ["run.workers=7", "run.device=cpu", "run.verbose=true", "run.workdir=/elsewhere"])
def test_how_to_run_does_not_change_the_key(tiny_synthetic, tmp_path, override):
    base = make_pipeline(tiny_synthetic, tmp_path).key("cam").digest
    assert make_pipeline(tiny_synthetic, tmp_path, override).key("cam").digest == base


@pytest.mark.parametrize(
    "override",
    ["cam.weight_decay=0.003", "cam.epochs=99", "cam.scales=[1.0,0.5]", "data.train_split=val", "run.seed=3"],
)
def test_what_to_compute_changes_the_key(tiny_synthetic, tmp_path, override):
    base = make_pipeline(tiny_synthetic, tmp_path).key("cam").digest
    assert make_pipeline(tiny_synthetic, tmp_path, override).key("cam").digest != base


def test_another_methods_settings_do_not_change_the_key(tiny_synthetic, tmp_path):
    """cam.minmax_k only matters to method minmax: under gap a new value retrains nothing."""
    gap = make_pipeline(tiny_synthetic, tmp_path).key("cam").digest
    assert make_pipeline(tiny_synthetic, tmp_path, "cam.minmax_k=5").key("cam").digest == gap
    assert make_pipeline(tiny_synthetic, tmp_path, "cam.dropblock_prob=0.3").key("cam").digest == gap
    minmax = make_pipeline(tiny_synthetic, tmp_path, "cam.method=minmax").key("cam").digest
    assert make_pipeline(tiny_synthetic, tmp_path, "cam.method=minmax", "cam.minmax_k=5").key("cam").digest != minmax


def test_giving_a_setting_its_own_value_keeps_every_key(tiny_synthetic, tmp_path):
    """`-o irn.crf.gauss_compat=3` reads as 3.0: a default written 3 would hash differently and
    retrain irn and seg for nothing."""
    from pydantic import BaseModel

    pipeline = make_pipeline(tiny_synthetic, tmp_path)
    keys = {stage: pipeline.key(stage).digest for stage in ("cam", "irn", "seg")}

    def leaves(node, prefix):
        for name in type(node).model_fields:
            value = getattr(node, name)
            if isinstance(value, BaseModel):
                yield from leaves(value, f"{prefix}{name}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield f"{prefix}{name}={value}"

    overrides = [o for section in ("cam", "irn", "seg") for o in leaves(getattr(pipeline.cfg, section), f"{section}.")]
    assert "irn.crf.gauss_compat=3.0" in overrides
    again = make_pipeline(tiny_synthetic, tmp_path, *overrides)
    assert {stage: again.key(stage).digest for stage in keys} == keys


def test_a_scoring_only_setting_does_not_change_the_key(tiny_synthetic, tmp_path):
    """cam.eval_bg_threshold only scores the CAMs: a new value re-scores the cached artifact."""
    base = make_pipeline(tiny_synthetic, tmp_path).key("cam").digest
    assert make_pipeline(tiny_synthetic, tmp_path, "cam.eval_bg_threshold=0.3").key("cam").digest == base


def test_the_val_split_is_in_the_key_of_the_stage_that_predicts_it_only(tiny_synthetic, tmp_path):
    """cam only scores its classifier on val (re-scored, see test_run_chain), irn and pseudo never
    read it: another val split retrains nothing before seg, which predicts it."""
    base = make_pipeline(tiny_synthetic, tmp_path)
    other = make_pipeline(tiny_synthetic, tmp_path, "data.val_split=train")
    assert [base.key(s).digest == other.key(s).digest for s in ("cam", "irn", "pseudo", "seg")] == [
        True,
        True,
        True,
        False,
    ]
    assert make_pipeline(tiny_synthetic, tmp_path, "data.train_split=val").key("cam").digest != base.key("cam").digest


def test_dataset_change_changes_the_key(tiny_synthetic, tmp_path):
    root = shutil.copytree(tiny_synthetic, tmp_path / "data")
    before = make_pipeline(root, tmp_path).key("cam").digest
    split = root / "splits" / "train.txt"
    split.write_text("".join(split.read_text().splitlines(keepends=True)[:-1]))
    assert make_pipeline(root, tmp_path).key("cam").digest != before


def test_a_weights_file_overwritten_in_place_changes_the_key(tiny_synthetic, tmp_path):
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"first")
    before = make_pipeline(tiny_synthetic, tmp_path, f"cam.weights={weights}").key("cam").digest
    assert make_pipeline(tiny_synthetic, tmp_path, f"cam.weights={weights}").key("cam").digest == before
    weights.write_bytes(b"other")  # same path and size, retrained
    os.utime(weights, ns=(weights.stat().st_mtime_ns + 10**9,) * 2)
    assert make_pipeline(tiny_synthetic, tmp_path, f"cam.weights={weights}").key("cam").digest != before
    seg = make_pipeline(tiny_synthetic, tmp_path, f"seg.encoder_weights={weights}").key("seg").digest
    os.utime(weights, ns=(weights.stat().st_mtime_ns + 10**9,) * 2)
    assert make_pipeline(tiny_synthetic, tmp_path, f"seg.encoder_weights={weights}").key("seg").digest != seg


def test_limit_is_part_of_the_key(tiny_synthetic, tmp_path):
    pipeline = make_pipeline(tiny_synthetic, tmp_path)
    assert pipeline.key("cam", limit=8).digest != pipeline.key("cam").digest


def test_artifact_directory_layout(tiny_synthetic, tmp_path):
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), FakeCam())
    outcome = pipeline.run_stage("cam")
    key = pipeline.key("cam")
    assert outcome.path == tmp_path / "synthetic" / f"cam-{key.short}"
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert manifest["key"] == key.digest and manifest["metrics"] == {"cam_miou": 0.5}
    assert manifest["config"]["cam"]["backbone"] == "resnet18"


# ------------------------------------------------------------------------------ atomic commits


def test_a_stage_that_raises_leaves_only_a_partial_dir(tiny_synthetic, tmp_path):
    failing = FakeCam(fail=RuntimeError("boom"))
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), failing)
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run_stage("cam")
    key = pipeline.key("cam")
    assert pipeline.artifact("cam") is None
    assert not pipeline.store.final_dir(key).exists()
    assert (pipeline.store.partial_dir(key) / "from-failed-run.txt").is_file()
    assert pipeline.status_of("cam").state == "missing"

    good = FakeCam()
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), good)
    outcome = pipeline.run_stage("cam")
    assert outcome.state == "ran" and good.calls == 1
    # a fresh start: nothing of the failed attempt was carried into the result
    assert sorted(p.name for p in outcome.path.iterdir()) == ["half-1.txt", "log.txt", "manifest.json", "result.txt"]
    assert not pipeline.store.partial_dir(key).exists()


def test_keyboard_interrupt_leaves_nothing_reusable(tiny_synthetic, tmp_path):
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), FakeCam(fail=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage("cam")
    assert pipeline.artifact("cam") is None
    again = with_stage(make_pipeline(tiny_synthetic, tmp_path), FakeCam())
    assert again.run_stage("cam").state == "ran"


def test_complete_artifact_is_reused_and_force_recomputes(tiny_synthetic, tmp_path):
    stage = FakeCam()
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), stage)
    first = pipeline.run_stage("cam")
    second = pipeline.run_stage("cam")
    assert (first.state, second.state, stage.calls) == ("ran", "cached", 1)
    assert second.metrics == {"cam_miou": 0.5} and second.path == first.path
    forced = pipeline.run_stage("cam", force=True)
    assert forced.state == "ran" and stage.calls == 2
    assert (forced.path / "half-2.txt").is_file() and not (forced.path / "half-1.txt").exists()


class FakeTrainingCam(FakeCam):
    """Leaves a training checkpoint behind, as the real stages do, and declares it resume state."""

    resume_files = ("checkpoint.pt",)

    def run(self, cfg, dataset, inputs, out, *, resume=False, limit=None) -> StageResult:
        (out / "checkpoint.pt").write_text("model + optimizer after the last epoch")
        (out / "model.pt").write_text("the model")
        return super().run(cfg, dataset, inputs, out, resume=resume, limit=limit)


def test_resume_state_is_deleted_when_the_stage_finishes_and_kept_when_it_fails(tiny_synthetic, tmp_path):
    failing = FakeTrainingCam(fail=RuntimeError("boom"))
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), failing)
    with pytest.raises(RuntimeError):
        pipeline.run_stage("cam")
    assert (pipeline.store.partial_dir(pipeline.key("cam")) / "checkpoint.pt").is_file()  # for --resume
    done = with_stage(make_pipeline(tiny_synthetic, tmp_path), FakeTrainingCam()).run_stage("cam", resume=True)
    assert (done.path / "model.pt").is_file() and not (done.path / "checkpoint.pt").exists()


def test_manifest_with_another_key_is_not_reused(tiny_synthetic, tmp_path):
    stage = FakeCam()
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), stage)
    path = pipeline.run_stage("cam").path
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["key"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert pipeline.artifact("cam") is None
    assert pipeline.run_stage("cam").state == "ran" and stage.calls == 2


def test_status_names_what_changed(tiny_synthetic, tmp_path):
    with_stage(make_pipeline(tiny_synthetic, tmp_path), FakeCam()).run_stage("cam")
    status = with_stage(make_pipeline(tiny_synthetic, tmp_path), FakeCam()).status_of("cam")
    assert status.state == "up to date"
    changed = with_stage(make_pipeline(tiny_synthetic, tmp_path, "cam.weight_decay=0.003"), FakeCam())
    status = changed.status_of("cam")
    assert status.state == "stale"
    assert status.reasons == [f"cam.weight_decay: {load_config(DEMO_CONFIG).cam.weight_decay} -> 0.003"]
    missing = with_stage(make_pipeline(tiny_synthetic, tmp_path / "other"), FakeCam()).status_of("cam")
    assert missing.state == "missing"


def test_status_explains_against_the_closest_artifact_not_the_newest(tiny_synthetic, tmp_path):
    """After a `--limit` try and another setting, the reasons are those of the nearest artifact."""
    with_stage(make_pipeline(tiny_synthetic, tmp_path, "cam.epochs=2"), FakeCam()).run_stage("cam")
    with_stage(make_pipeline(tiny_synthetic, tmp_path, "cam.epochs=3"), FakeCam()).run_stage("cam", limit=4)
    with_stage(make_pipeline(tiny_synthetic, tmp_path, "cam.lr=0.5", "cam.epochs=7"), FakeCam()).run_stage("cam")
    status = with_stage(make_pipeline(tiny_synthetic, tmp_path, "cam.epochs=3"), FakeCam()).status_of("cam")
    assert status.state == "stale" and status.reasons == ["cam.epochs: 2 -> 3"]


# ------------------------------------------------------------------------ the store on its own


def key(stage: str = "cam", value: int = 1) -> StageKey:
    return StageKey(stage, {"config": {"x": value}, "dataset": "d", "upstream": {}, "code": "c"})


def test_store_commit_writes_manifest_last_and_renames(tmp_path):
    store = ArtifactStore(tmp_path, "ds")
    k = key()
    with store.writing(k) as partial:
        (partial / "a.txt").write_text("a")
        assert store.complete(k) is None
        final = store.commit(k, partial, {"metrics": {}})
    assert final == tmp_path / "ds" / f"cam-{k.short}" and store.complete(k) == final
    assert not partial.exists()
    assert store.completed("cam")[0][0] == final


def test_resume_keeps_the_partial_dir_and_fresh_start_clears_it(tmp_path):
    store = ArtifactStore(tmp_path, "ds")
    k = key()
    with store.writing(k) as partial:
        (partial / "checkpoint.pt").write_text("epoch 3")
    with store.writing(k, resume=True) as partial:
        assert (partial / "checkpoint.pt").read_text() == "epoch 3"
    with store.writing(k) as partial:
        assert list(partial.iterdir()) == []


def test_two_writers_of_one_key_are_refused(tmp_path):
    store = ArtifactStore(tmp_path, "ds")
    with store.writing(key()):
        with pytest.raises(CacheError, match="another wss process"):
            with store.writing(key()):
                pass
        with store.writing(key(value=2)):  # another key is independent
            pass


def test_an_artifact_being_read_cannot_be_replaced_and_a_vanished_one_is_named(tmp_path):
    store = ArtifactStore(tmp_path, "ds")
    with store.writing(key()) as partial:
        final = store.commit(key(), partial, {})
    with store.reading([final]):
        with pytest.raises(CacheError, match="or reading it as its input"):
            with store.writing(key()):  # e.g. `--force` in another process
                pass
        with store.reading([final]):  # readers share
            pass
    (final / "manifest.json").unlink()  # as `wss clean` starts removing it
    with pytest.raises(CacheError, match=f"{final} was removed or is incomplete"):
        with store.reading([final]):
            pass


def test_a_stage_holds_its_inputs_while_it_runs(tiny_synthetic, tmp_path):
    """`wss clean` or a `--force` elsewhere cannot take an input away from a running stage."""
    import fcntl

    class FakeIrn(FakeCam):
        name, needs, section = "irn", ("cam",), "irn"

        def run(self, cfg, dataset, inputs, out, *, resume=False, limit=None):
            with open(inputs["cam"].parent / f".{inputs['cam'].name}.lock", "a") as lock:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.checked = True
            return StageResult(metrics={}, headline="")

    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), FakeCam())
    cam = pipeline.run_stage("cam").path
    irn = FakeIrn()
    pipeline.stages["irn"] = irn
    pipeline._keys.clear()
    pipeline.run_stage("irn")
    assert irn.checked
    with open(cam.parent / f".{cam.name}.lock", "a") as lock:  # released afterwards
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_commit_over_an_old_artifact_ignores_a_leftover_of_an_earlier_commit(tmp_path):
    """A commit interrupted between its renames leaves `.name.old<pid>`; PIDs repeat in containers."""
    store = ArtifactStore(tmp_path, "ds")
    for _ in range(2):
        with store.writing(key()) as partial:
            final = store.commit(key(), partial, {})
    leftover = final.with_name(f".{final.name}.old{os.getpid()}")
    leftover.mkdir()
    (leftover / "model.pt").write_text("x")
    with store.writing(key()) as partial:
        (partial / "new.txt").write_text("new")
        assert store.commit(key(), partial, {}) == final
    assert (final / "new.txt").is_file() and store.complete(key()) == final


def test_forked_workers_do_not_keep_a_lock_their_parent_let_go(tmp_path):
    """A killed run's orphaned DataLoader workers would otherwise hold its key locked, and an
    immediate `--resume` (a rescheduled job) would be told another wss process is computing."""
    import fcntl
    import multiprocessing

    store = ArtifactStore(tmp_path, "ds")
    fork = multiprocessing.get_context("fork")
    running, started = fork.Event(), fork.Event()  # running: the child is past its fork hooks
    with store.writing(key()):
        worker = fork.Process(target=lambda: running.set() or started.wait(60))
        worker.start()
        assert running.wait(30)
    try:
        with open(store.lock_path(store.final_dir(key()).name), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the worker held it
        with store.writing(key()):  # and the lock still excludes while held
            with open(store.lock_path(store.final_dir(key()).name), "a") as lock, pytest.raises(BlockingIOError):
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        started.set()
        worker.join(10)


def test_killed_writer_leaves_nothing_reusable(tmp_path):
    """SIGKILL mid-write (no cleanup code runs): the next run starts fresh and can take the lock."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pipeline.cache import ArtifactStore, StageKey
        store = ArtifactStore({str(tmp_path)!r}, "ds")
        key = StageKey("cam", {{"config": {{"x": 1}}, "dataset": "d", "upstream": {{}}, "code": "c"}})
        with store.writing(key) as partial:
            (partial / "cams").mkdir()
            (partial / "cams" / "a.npz").write_text("half")
            print("ready", flush=True)
            time.sleep(60)
            store.commit(key, partial, {{}})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    store = ArtifactStore(tmp_path, "ds")
    k = key()
    assert store.complete(k) is None and store.completed("cam") == []
    assert (store.partial_dir(k) / "cams" / "a.npz").is_file()
    with store.writing(k) as partial:
        assert list(partial.iterdir()) == []
        store.commit(k, partial, {})
    assert store.complete(k) is not None


# ------------------------------------------------- what a failed or interrupted stage leaves


class FailsAtOnce(FakeCam):
    """A stage that stops before writing anything (a missing input found at its start, Ctrl-C)."""

    def run(self, cfg, dataset, inputs, out, *, resume=False, limit=None) -> StageResult:
        (out / "seeds").mkdir()  # an empty folder holds no result either
        raise self.fail


@pytest.mark.parametrize("failure", [StageInputError("cam: no images"), KeyboardInterrupt()])
def test_a_stage_that_fails_before_writing_anything_leaves_no_partial_dir(tiny_synthetic, tmp_path, failure):
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), FailsAtOnce(fail=failure))
    with pytest.raises(type(failure)):
        pipeline.run_stage("cam")
    assert not pipeline.store.partial_dir(pipeline.key("cam")).exists()
    assert pipeline.status_of("cam").state == "missing"


def test_a_resumed_partial_dir_with_work_in_it_stays_when_the_resumed_run_fails_at_once(tiny_synthetic, tmp_path):
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), FakeTrainingCam(fail=RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        pipeline.run_stage("cam")
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), FailsAtOnce(fail=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage("cam", resume=True)
    assert (pipeline.store.partial_dir(pipeline.key("cam")) / "checkpoint.pt").is_file()


class CheckpointingCam(FakeCam):
    """Trains `epochs_done` epochs (a real checkpoint, as the training loop saves it), writes
    `files` CAM files, then is interrupted; resumed, it finishes. `seconds` moves a fake clock."""

    resume_files = (CHECKPOINT,)
    resume_outputs = ("cams",)

    def __init__(
        self, clock=None, seconds: float = 0.0, epochs_done: int | None = 2, files: int = 0, interrupt: bool = True
    ):
        super().__init__()
        self.clock, self.seconds, self.epochs_done, self.files, self.interrupt = (
            clock,
            seconds,
            epochs_done,
            files,
            interrupt,
        )

    def run(self, cfg, dataset, inputs, out, *, resume=False, limit=None) -> StageResult:
        import torch

        from stages.common.model_files import write_checkpoint

        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.seconds
        if self.epochs_done is not None:
            model = torch.nn.Linear(1, 1)
            write_checkpoint(
                out / CHECKPOINT, model, torch.optim.SGD(model.parameters(), lr=0.1), self.epochs_done - 1, []
            )
        (out / "cams").mkdir(exist_ok=True)
        for i in range(self.files):
            (out / "cams" / f"img{i}.npz").write_text("a CAM")
        (out / "cams" / ".img9.tmp.npz").write_text("half a CAM: not counted")
        if self.interrupt:
            raise KeyboardInterrupt
        return StageResult(metrics={"cam_miou": 0.5}, headline="cam_miou")


def test_status_of_an_interrupted_stage_says_what_resume_continues(tiny_synthetic, tmp_path, cli):
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), CheckpointingCam(epochs_done=2))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage("cam")
    status = pipeline.status_of("cam")
    epochs = pipeline.cfg.cam.epochs
    assert (status.state, status.path) == ("interrupted", pipeline.store.partial_dir(pipeline.key("cam")))
    assert status.summary == f"interrupted after epoch 2 of {epochs} (resume with --resume)"

    files_only = with_stage(make_pipeline(tiny_synthetic, tmp_path / "b"), CheckpointingCam(epochs_done=None, files=3))
    with pytest.raises(KeyboardInterrupt):
        files_only.run_stage("cam")
    assert (
        files_only.status_of("cam").summary
        == "interrupted with 3 files in cams/ (resume with --resume, which keeps them)"
    )

    both = with_stage(make_pipeline(tiny_synthetic, tmp_path / "c"), CheckpointingCam(epochs_done=epochs, files=5))
    with pytest.raises(KeyboardInterrupt):
        both.run_stage("cam")
    expected = (
        f"interrupted after epoch {epochs} of {epochs} with 5 files in cams/ (resume with --resume, which keeps them)"
    )
    assert both.status_of("cam").summary == expected


def test_a_rerun_without_resume_says_it_discards_the_interrupted_run(tiny_synthetic, tmp_path, caplog):
    import logging

    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), CheckpointingCam(epochs_done=2))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage("cam")
    partial = pipeline.store.partial_dir(pipeline.key("cam"))
    with caplog.at_level(logging.INFO):
        pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), CheckpointingCam(epochs_done=1))
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_stage("cam")
    warnings = [r.getMessage() for r in caplog.records if "discarding" in r.getMessage()]
    assert warnings == [
        f"cam: starting again: discarding {partial}, an interrupted run (after epoch 2 of "
        f"{pipeline.cfg.cam.epochs}) that `--resume` would continue"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = with_stage(make_pipeline(tiny_synthetic, tmp_path), CheckpointingCam(interrupt=False))
        assert resumed.run_stage("cam", resume=True).state == "ran"
    assert "discarding" not in caplog.text


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_resumed_stage_records_the_time_of_every_run(tiny_synthetic, tmp_path, monkeypatch):
    import time

    clock = FakeClock(1_000_000.0)
    monkeypatch.setattr(time, "time", clock)
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), CheckpointingCam(clock, seconds=30.0))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_stage("cam")
    clock.now += 500  # between the runs: not counted
    pipeline = with_stage(
        make_pipeline(tiny_synthetic, tmp_path), CheckpointingCam(clock, seconds=12.0, interrupt=False)
    )
    outcome = pipeline.run_stage("cam", resume=True)
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert outcome.seconds == manifest["seconds"] == pytest.approx(42.0)
    assert not (outcome.path / "elapsed.json").exists()  # bookkeeping of the partial folder only

    clock.now += 500
    fresh = with_stage(make_pipeline(tiny_synthetic, tmp_path), CheckpointingCam(clock, seconds=7.0, interrupt=False))
    assert fresh.run_stage("cam", force=True).seconds == pytest.approx(7.0)  # a fresh start counts itself


def test_time_up_to_the_last_checkpoint_counts_after_a_kill(tmp_path, monkeypatch):
    """SIGKILL runs no cleanup: the training loop moved the record's end at each checkpoint."""
    import time

    from stages.common.elapsed import mark_elapsed, seconds_spent, start_clock

    clock = FakeClock(5000.0)
    monkeypatch.setattr(time, "time", clock)
    assert start_clock(tmp_path, clock()) == 0.0
    clock.now += 20  # epoch 1 ends with its checkpoint
    mark_elapsed(tmp_path)
    clock.now += 100  # then the kill, and a while before the --resume
    assert start_clock(tmp_path, clock()) == pytest.approx(20.0)
    clock.now += 5
    mark_elapsed(tmp_path)
    assert seconds_spent(tmp_path) == pytest.approx(25.0)
    mark_elapsed(tmp_path / "elsewhere")  # no record: nothing written
    assert not (tmp_path / "elsewhere").exists()


# ----------------------------------------------------------------------------- preflight checks


class CheckedCam(FakeCam):
    def __init__(self, problem: str | None = None):
        super().__init__()
        self.problem, self.checks = problem, 0

    def preflight(self, cfg, dataset) -> None:
        self.checks += 1
        if self.problem:
            raise WssError(self.problem)


def test_run_stage_checks_its_stage_before_it_computes_and_run_checks_each_stage_once(tiny_synthetic, tmp_path):
    bad = CheckedCam("cam.weights: weights file not found: /nowhere.pth")
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), bad)
    with pytest.raises(WssError, match="/nowhere.pth"):
        pipeline.run_stage("cam")
    assert bad.calls == 0
    assert not list(pipeline.store.root.glob(".cam-*.partial")) and not list(pipeline.store.root.glob("cam-*"))
    good = CheckedCam()
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), good)
    assert [o.state for o in pipeline.run(until="cam")] == ["ran"] and good.checks == 1
    again = CheckedCam()
    assert with_stage(make_pipeline(tiny_synthetic, tmp_path), again).run_stage("cam").state == "cached"
    assert again.checks == 0  # an up-to-date stage reads no weights


# ----------------------------------------------------------------------------- strict JSON


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity, as JSON.parse and jq do."""

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_nan_metrics_are_null_in_the_manifest_and_nan_again_when_cached(tiny_synthetic, tmp_path):
    import math

    class NanCam(FakeCam):
        def run(self, cfg, dataset, inputs, out, *, resume=False, limit=None) -> StageResult:
            self.calls += 1
            return StageResult(
                metrics={"cam_miou": 0.5, "cam_iou/boat": math.nan, "cam_x": math.inf}, headline="cam_miou"
            )

    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path), NanCam())
    ran = pipeline.run_stage("cam")
    manifest = strict_json((ran.path / "manifest.json").read_text())
    assert manifest["metrics"] == {"cam_miou": 0.5, "cam_iou/boat": None, "cam_x": None}
    cached = with_stage(make_pipeline(tiny_synthetic, tmp_path), NanCam()).run_stage("cam")
    assert cached.state == "cached" and math.isnan(cached.metrics["cam_iou/boat"])


def test_json_text_writes_null_for_nan_and_infinity_at_any_depth(tmp_path):
    import math

    from data.layout import json_text, write_json_atomic

    value = {"a": math.nan, "b": [1.0, -math.inf, {"c": math.inf}], "d": (2, "x"), "e": None}
    assert strict_json(json_text(value)) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x"], "e": None}
    write_json_atomic(tmp_path / "m.json", value)
    assert strict_json((tmp_path / "m.json").read_text())["a"] is None


@pytest.mark.parametrize("code", ["ENOSYS", "ENOLCK"])  # Lustre without -o flock; NFSv3 without its lock daemon
def test_a_file_system_that_refuses_locks_is_a_one_line_error(
    tiny_synthetic, tmp_path, monkeypatch, cli, demo_overrides, code
):
    import errno
    import fcntl

    number = getattr(errno, code)

    def refuse(file, operation):
        raise OSError(number, os.strerror(number))

    store = ArtifactStore(tmp_path / "work", "ds")
    with store.writing(key()) as partial:
        final = store.commit(key(), partial, {})
    monkeypatch.setattr(fcntl, "flock", refuse)
    for block in (lambda: store.writing(key(value=2)), lambda: store.reading([final])):
        with pytest.raises(
            CacheError,
            match=rf"cannot lock \S+\.lock \({os.strerror(number)}\): the file "
            rf"system of run.workdir does not support flock",
        ):
            with block():
                pass
    result = cli("run-stage", "cam", "-c", DEMO_CONFIG, *demo_overrides(tiny_synthetic, tmp_path / "cli"))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: cannot lock ")
    assert "Traceback" not in result.output

"""`wss clean`: removes exactly the artifacts the config does not use, never one in use.

The cam stage is a fake (tests/test_cache.py's FakeCam) so that artifacts take no training.
"""

from __future__ import annotations

import fcntl

from pipeline.clean import clean, find_unused
from tests.test_cache import FakeCam, make_pipeline, with_stage


class FakeCamWithInference(FakeCam):
    """FakeCam whose `flip` only changes inference, as the real cam stage's."""

    def inference_settings(self, cfg) -> tuple[str, ...]:
        return ("flip",)


def cam_artifact(root, workdir, *overrides, stage=FakeCam):
    pipeline = with_stage(make_pipeline(root, workdir, *overrides), stage())
    return pipeline, pipeline.run_stage("cam").path


def names(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_lists_then_removes_only_what_the_config_does_not_use(tiny_synthetic, tmp_path):
    _, old = cam_artifact(tiny_synthetic, tmp_path, "cam.epochs=2")
    pipeline, current = cam_artifact(tiny_synthetic, tmp_path, "cam.epochs=3")
    (current.parent / "report.md").write_text("not an artifact")
    (current.parent / "compare").mkdir()

    rows, size, busy = clean(pipeline, delete=False)
    assert [(r["stage"], r["what"], r["differs in"]) for r in rows] == [("cam", "complete", "cam.epochs: 2 -> 3")]
    assert size > 0 and not busy and old.is_dir()  # a dry run deletes nothing

    rows, freed, busy = clean(pipeline, delete=True)
    assert len(rows) == 1 and freed == size and not busy
    assert not old.exists() and current.is_dir() and pipeline.artifact("cam") == current
    assert {"report.md", "compare"} <= names(current.parent)
    assert not any(name.startswith(f".{old.name}") for name in names(current.parent))  # its lock file too
    assert clean(pipeline, delete=True) == ([], 0, [])


def test_interrupted_work_of_other_keys_goes_and_of_the_current_key_stays(tiny_synthetic, tmp_path):
    pipeline, _ = cam_artifact(tiny_synthetic, tmp_path, "cam.epochs=3")
    store = pipeline.store
    own_partial = store.partial_dir(pipeline.key("cam"))
    own_partial.mkdir()  # e.g. a --force run that was interrupted: `--resume` continues it
    other_partial = store.root / ".irn-0123456789ab.partial"
    leftover = store.root / ".cam-fedcba987654.old4242"
    # the previous version of the current artifact, left by a commit interrupted between its two renames
    own_leftover = store.root / f".{store.final_dir(pipeline.key('cam')).name}.old4343"
    for folder in (other_partial, leftover, own_leftover):
        folder.mkdir()
        (folder / "model.pt").write_bytes(b"x" * 1000)

    rows, freed, _ = clean(pipeline, delete=True)
    assert sorted(r["what"] for r in rows) == ["commit leftover", "commit leftover", "interrupted"]
    assert freed == 3000
    assert own_partial.is_dir() and not other_partial.exists() and not leftover.exists()
    assert not own_leftover.exists() and pipeline.artifact("cam") is not None


def test_a_key_whose_lock_is_held_is_left_alone(tiny_synthetic, tmp_path):
    _, old = cam_artifact(tiny_synthetic, tmp_path, "cam.epochs=2")
    pipeline, _ = cam_artifact(tiny_synthetic, tmp_path, "cam.epochs=3")
    with open(old.parent / f".{old.name}.lock", "w") as lock:  # as a wss process computing that key
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rows, freed, busy = clean(pipeline, delete=True)
    assert (rows, freed, busy) == ([], 0, [f"{old} (a running wss process holds its lock)"])
    assert (old / "manifest.json").is_file()


def test_an_artifact_another_run_reads_is_left_alone(tiny_synthetic, tmp_path):
    """A run of another config reading `old` as its input holds a shared lock on it."""
    _, old = cam_artifact(tiny_synthetic, tmp_path, "cam.epochs=2")
    pipeline, _ = cam_artifact(tiny_synthetic, tmp_path, "cam.epochs=3")
    with pipeline.store.reading([old]):
        rows, freed, busy = clean(pipeline, delete=True)
    assert (rows, freed, busy) == ([], 0, [f"{old} (a running wss process holds its lock)"])
    assert (old / "manifest.json").is_file()


def test_artifacts_of_another_live_dataset_of_the_same_name_are_left_alone(synthetic_dataset, tmp_path):
    """A development set (another seed, another path) shares the folder `<workdir>/synthetic/`:
    its artifacts are not this config's to delete while that dataset exists."""
    _, other = cam_artifact(synthetic_dataset(n=32, size=64, seed=1), tmp_path, "cam.epochs=2")
    pipeline, _ = cam_artifact(synthetic_dataset(), tmp_path, "cam.epochs=2")
    rows, freed, left = clean(pipeline, delete=True)
    assert rows == [] and freed == 0 and len(left) == 1 and "another prepared dataset" in left[0]
    assert (other / "manifest.json").is_file()


def test_another_dataset_given_as_a_relative_path_is_recognised_from_another_folder(
    synthetic_dataset, tmp_path, monkeypatch
):
    other_root = synthetic_dataset(n=32, size=64, seed=1)
    monkeypatch.chdir(other_root.parent)
    _, other = cam_artifact(other_root.name, tmp_path, "cam.epochs=2")
    monkeypatch.chdir(tmp_path)
    pipeline, _ = cam_artifact(synthetic_dataset(), tmp_path, "cam.epochs=2")
    rows, _, left = clean(pipeline, delete=True)
    assert rows == [] and len(left) == 1 and str(other_root) in left[0]
    assert (other / "manifest.json").is_file()


def test_the_model_the_next_run_reuses_is_kept(tiny_synthetic, tmp_path):
    _, trained = cam_artifact(tiny_synthetic, tmp_path, "cam.flip=false", stage=FakeCamWithInference)
    _, other = cam_artifact(tiny_synthetic, tmp_path, "cam.epochs=5", stage=FakeCamWithInference)
    # flip only changes inference: the next run of this config reuses `trained`'s model
    pipeline = with_stage(make_pipeline(tiny_synthetic, tmp_path, "cam.flip=true"), FakeCamWithInference())
    assert pipeline.artifact("cam") is None and pipeline.trained_twin("cam") == trained
    assert [u.folders for u in find_unused(pipeline)] == [[other]]


def test_cli_dry_run_then_yes(cli, tiny_synthetic, tmp_path, demo_overrides):
    _, old = cam_artifact(tiny_synthetic, tmp_path, "cam.epochs=2")
    args = ["clean", "-c", "configs/demo.yaml", *demo_overrides(tiny_synthetic, tmp_path)]
    listed = cli(*args)
    assert listed.exit_code == 0, listed.output
    assert old.name.split("-")[1] in listed.output and "run again with --yes" in listed.output
    assert old.is_dir()
    removed = cli(*args, "--yes")
    assert removed.exit_code == 0 and "removed" in removed.output and not old.exists()
    assert "nothing to clean" in cli(*args).output

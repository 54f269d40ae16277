"""A workdir wss cannot write to (read-only, no permission, full): one line naming the file, and
what only records results (the run report, re-scored metrics) warns instead of failing the run."""

from __future__ import annotations

import errno

import pytest

from pipeline.cache import ArtifactStore, CacheError
from tests.test_cache import make_pipeline


def test_an_unwritable_file_is_a_one_line_error(cli, monkeypatch, tiny_synthetic, tmp_path):
    from pipeline.runner import Pipeline

    def denied(self, cfg):
        raise PermissionError(errno.EACCES, "Permission denied", "/shared/runs/synthetic/.cam-0123.lock")

    monkeypatch.setattr(Pipeline, "__init__", denied)
    result = cli("run", "-c", "configs/demo.yaml", "-o", f"data.root={tiny_synthetic}", "-o", f"run.workdir={tmp_path}")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: cannot write /shared/runs/synthetic/.cam-0123.lock: Permission denied" in result.output


def test_a_lock_file_that_cannot_be_created_is_a_cache_error(tiny_synthetic, tmp_path):
    pipeline = make_pipeline(tiny_synthetic, tmp_path)
    store = pipeline.store
    store.lock_path = lambda name: tmp_path / "no-such-folder" / f".{name}.lock"
    with pytest.raises(CacheError, match="set run.workdir to a folder you can write to"):
        with store.writing(pipeline.key("cam")):
            pass


def test_a_manifest_that_cannot_be_rewritten_only_warns(tmp_path, caplog):
    store = ArtifactStore(tmp_path, "synthetic")
    assert store.update_manifest(tmp_path / "gone" / "cam-0123456789ab", metrics={"cam_miou": 0.5}) is False
    assert "could not record metrics" in caplog.text


def test_a_full_disk_while_saving_a_model_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError("... (os error 28)") (as seen on a
    full 64 KiB tmpfs); the half-written temporary file goes, and the CLI prints the OSError in
    one line."""
    import torch
    from safetensors import SafetensorError

    import stages.common.model_files as model_files

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"x" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(model_files, "save_file", full)
    with pytest.raises(OSError) as error:
        model_files.write_model_file(tmp_path / "model.safetensors", "cam", {"w": torch.zeros(2)}, {})
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "model.safetensors")
    assert "is the disk full?" in error.value.strerror and list(tmp_path.iterdir()) == []


def test_a_full_disk_without_a_file_name_is_one_line_too(cli, monkeypatch, tiny_synthetic, tmp_path):
    from pipeline.runner import Pipeline

    def full(self, cfg):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Pipeline, "__init__", full)
    result = cli("run", "-c", "configs/demo.yaml", "-o", f"data.root={tiny_synthetic}", "-o", f"run.workdir={tmp_path}")
    assert result.exit_code == 2 and "error: cannot write: No space left on device" in result.output

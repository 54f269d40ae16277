"""Content-addressed stage artifacts with atomic completion.

    <workdir>/<dataset>/<stage>-<key12>/            a complete artifact (manifest.json inside)
    <workdir>/<dataset>/.<stage>-<key12>.partial/   work in progress; never read as a result

The key hashes what determines a stage's output: its config section, the prepared dataset's
fingerprint, the upstream keys and the stage's code version. A stage writes into the partial
directory; the manifest is written last and the directory renamed into place, so a crash or
Ctrl-C leaves nothing that a later run would mistake for a result.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data.errors import WssError
from data.layout import write_json_atomic

log = logging.getLogger("wss.cache")

MANIFEST = "manifest.json"


class CacheError(WssError):
    pass


_held_locks: set[int] = set()  # descriptors of the lock files this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (DataLoader and CRF workers): point the inherited lock descriptors at
    /dev/null. A flock belongs to the open file, which a child shares: after a SIGKILL of the
    parent its orphaned workers would otherwise keep the key locked until they notice, and an
    immediate `--resume` would be refused. Replacing, not closing, keeps the numbers valid for
    the file objects the child inherited."""
    if not _held_locks:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _held_locks:
        try:
            os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextmanager
def held(lock_file):
    """Track a locked file for _drop_inherited_locks while the block runs."""
    _held_locks.add(lock_file.fileno())
    try:
        yield
    finally:
        _held_locks.discard(lock_file.fileno())


def try_lock(lock_file, mode: int, lock_path: Path) -> bool:
    """flock(mode) without waiting: False when another process holds the lock. A file system
    that refuses locks (Lustre mounted without `-o flock`: ENOSYS; NFSv3 without its lock
    daemon: ENOLCK) is a one-line CacheError: without locks two runs could compute one key."""
    try:
        fcntl.flock(lock_file, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        raise CacheError(
            f"cannot lock {lock_path} ({error.strerror}): the file system of run.workdir does not "
            f"support flock (Lustre: mount it with -o flock; see docs/distributed.md)"
        ) from None
    return True


@dataclass
class StageKey:
    stage: str
    parts: dict  # {"config": ..., "dataset": ..., "upstream": {...}, "code": ...}

    @property
    def digest(self) -> str:
        blob = json.dumps({"stage": self.stage, **self.parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def short(self) -> str:
        return self.digest[:12]


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def explain_difference(old: dict, new: dict, section: str) -> list[str]:
    """Human reasons why the parts of an old key differ from the current ones."""
    reasons = []
    old_cfg, new_cfg = flatten(old.get("config", {})), flatten(new.get("config", {}))
    for name in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(name, "<unset>") != new_cfg.get(name, "<unset>"):
            full_name = name if name.split(".")[0] in ("data", "run") else f"{section}.{name}"
            reasons.append(f"{full_name}: {old_cfg.get(name, '<unset>')} -> {new_cfg.get(name, '<unset>')}")
    if old.get("dataset") != new.get("dataset"):
        reasons.append("the prepared dataset changed")
    for name in sorted(set(old.get("upstream", {})) | set(new.get("upstream", {}))):
        if old.get("upstream", {}).get(name) != new.get("upstream", {}).get(name):
            reasons.append(f"upstream {name} changed")
    if old.get("code") != new.get("code"):
        reasons.append("the stage's code changed")
    return reasons


class ArtifactStore:
    def __init__(self, workdir: str | Path, dataset_name: str):
        self.root = Path(workdir) / dataset_name

    def final_dir(self, key: StageKey) -> Path:
        return self.root / f"{key.stage}-{key.short}"

    def partial_dir(self, key: StageKey) -> Path:
        return self.root / f".{key.stage}-{key.short}.partial"

    def lock_path(self, artifact_name: str) -> Path:
        """The lock of the key named `<stage>-<key12>`: held exclusively while the artifact is being
        written (or removed by `wss clean`), shared while a later stage reads it."""
        return self.root / f".{artifact_name}.lock"

    def read_manifest(self, path: Path) -> dict | None:
        try:
            return json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def complete(self, key: StageKey) -> Path | None:
        """The artifact directory for this exact key, if it is complete."""
        path = self.final_dir(key)
        manifest = self.read_manifest(path)
        if manifest is not None and manifest.get("key") == key.digest:
            return path
        return None

    def completed(self, stage: str) -> list[tuple[Path, dict]]:
        """(path, manifest) of every complete artifact of a stage, whatever its key, newest first."""
        found = []
        for path in self.root.glob(f"{stage}-*"):
            manifest = self.read_manifest(path)
            if manifest is not None and manifest.get("stage") == stage:
                found.append((manifest.get("finished", 0), path, manifest))
        return [(path, manifest) for _, path, manifest in sorted(found, key=lambda item: -item[0])]

    @contextmanager
    def writing(self, key: StageKey, resume: bool = False, before_discard: Callable[[Path], None] | None = None):
        """Yield a partial directory to write into; fresh unless resuming. Holds a lock.
        `before_discard(partial)` is called, under the lock, before a fresh start removes the
        partial directory an interrupted run left."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheError(
                f"cannot create the artifact folder {self.root} ({error.strerror}): "
                f"set run.workdir to a folder you can write to"
            ) from None
        lock_path = self.lock_path(self.final_dir(key).name)
        try:
            lock = open(lock_path, "a")
        except OSError as error:  # e.g. a read-only workdir
            raise CacheError(
                f"cannot write in the artifact folder {self.root} ({error.strerror}): "
                f"set run.workdir to a folder you can write to"
            ) from None
        with lock:
            if not try_lock(lock, fcntl.LOCK_EX, lock_path):
                raise CacheError(
                    f"another wss process is computing {self.final_dir(key)} or reading it "
                    f"as its input (lock {lock_path})"
                )
            with held(lock):
                partial = self.partial_dir(key)
                if partial.exists() and not resume:
                    if before_discard is not None:
                        before_discard(partial)
                    shutil.rmtree(partial)
                partial.mkdir(parents=True, exist_ok=True)
                yield partial

    @contextmanager
    def reading(self, artifacts):
        """Hold a shared lock on each input artifact while a stage reads it, so that `wss clean`
        (or a forced recompute) in another process cannot remove it under the reader; checks that
        each is still complete once locked."""
        with ExitStack() as locks:
            for artifact in artifacts:
                artifact = Path(artifact)
                try:
                    lock = locks.enter_context(open(self.lock_path(artifact.name), "a"))
                except OSError:  # a read-only workdir: nobody can remove the artifact through wss either
                    continue
                if not try_lock(lock, fcntl.LOCK_SH, self.lock_path(artifact.name)):
                    raise CacheError(
                        f"{artifact} is being recomputed or removed by another wss process; "
                        f"run again when it has finished"
                    )
                locks.enter_context(held(lock))
                if self.read_manifest(artifact) is None:
                    raise CacheError(f"{artifact} was removed or is incomplete; run again to recompute it")
            yield

    def commit(self, key: StageKey, partial: Path, manifest: dict) -> Path:
        """Write the manifest last, then move the directory into place."""
        manifest = {**manifest, "stage": key.stage, "key": key.digest, "key_parts": key.parts, "finished": time.time()}
        write_json_atomic(partial / MANIFEST, manifest, default=str)
        final = self.final_dir(key)
        if final.exists():
            trash = final.with_name(f".{final.name}.old{os.getpid()}{time.time_ns()}")  # never a leftover's name
            os.replace(final, trash)
            os.replace(partial, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(partial, final)
        return final

    def update_manifest(self, path: Path, **changes) -> bool:
        """Atomically rewrite fields of a complete artifact's manifest (e.g. new metrics). Only a
        record: where the artifact cannot be written (a read-only workdir) it warns and returns False."""
        manifest = self.read_manifest(path) or {}
        manifest.update(changes)
        try:
            write_json_atomic(path / MANIFEST, manifest, default=str)
        except OSError as error:
            log.warning("could not record %s in %s (%s)", ", ".join(changes), path / MANIFEST, error.strerror)
            return False
        return True

"""`wss clean`: free the disk space of artifacts a config no longer uses.

Every changed setting makes new artifacts and leaves the old ones in place (a later run may
come back to them); CAM files and pseudo-labels of a large dataset take gigabytes. Kept for the
given config: each stage's artifact under its current key, complete or in progress (`--resume`
needs it), and a stale artifact whose trained model the next run would reuse (same training
settings, other inference settings). Removed: the other artifacts of the dataset's folder
(older settings, other `wss compare` methods, `--limit` tries), `.partial` folders of
interrupted runs under other keys, leftovers of an interrupted commit, and their lock files.
A key whose lock a running wss process holds is left alone, and so is an artifact of another
prepared dataset that shares the folder's name (a development set made with another seed, at
another path that still exists). Reports, evaluation tables and `compare/` are not artifacts
and stay.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cache import explain_difference, try_lock
from stages.registry import STAGE_ORDER

# <stage>-<key12>, .<stage>-<key12>.partial, .<stage>-<key12>.old<pid>, .<stage>-<key12>.lock
ENTRY = re.compile(
    rf"^\.?(?P<stage>{'|'.join(STAGE_ORDER)})-(?P<key>[0-9a-f]{{12}})"
    rf"(?P<kind>\.partial|\.old\d+|\.lock)?$"
)


@dataclass
class Unused:
    """The folders of one key the config does not use (none when only its lock file is left)."""

    stage: str
    key: str
    folders: list[Path] = field(default_factory=list)
    bytes: int = 0
    why: str = ""
    kept: bool = False  # a key the config uses: only a commit leftover of it goes, its lock file stays
    other_dataset: str = ""  # the root of the live dataset it was computed from, when not this one

    @property
    def what(self) -> str:
        kinds = [
            "complete"
            if not f.name.startswith(".")
            else "interrupted"
            if f.name.endswith(".partial")
            else "commit leftover"
            for f in self.folders
        ]
        return ", ".join(kinds) or "lock file"


def folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:  # removed while we look: it frees nothing more
            pass
    return total


def kept_keys(pipeline) -> set[tuple[str, str]]:
    """(stage, key12) of each stage's current key and of a stale artifact whose model the next run reuses."""
    keep = set()
    for name in STAGE_ORDER:
        key = pipeline.key(name)
        keep.add((name, key.short))
        if pipeline.store.complete(key) is None:
            twin = pipeline.trained_twin(name)
            if twin is not None:
                keep.add((name, ENTRY.match(Path(twin).name)["key"]))
    return keep


def find_unused(pipeline) -> list[Unused]:
    """What `wss clean` would remove for this config, one entry per key, oldest first."""
    root = pipeline.store.root
    if not root.is_dir():
        return []
    keep = kept_keys(pipeline)
    unused: dict[tuple[str, str], Unused] = {}
    for path in sorted(root.iterdir()):
        match = ENTRY.match(path.name)
        if match is None:
            continue
        kept = (match["stage"], match["key"]) in keep
        if kept and not (match["kind"] or "").startswith(".old"):
            continue
        entry = unused.setdefault((match["stage"], match["key"]), Unused(match["stage"], match["key"], kept=kept))
        if path.is_dir():
            entry.folders.append(path)
            entry.bytes += folder_bytes(path)
    for entry in unused.values():
        if entry.kept:
            continue
        complete = next((f for f in entry.folders if not f.name.startswith(".")), None)
        manifest = pipeline.store.read_manifest(complete) if complete is not None else None
        if manifest is not None:
            entry.other_dataset = other_live_dataset(manifest.get("dataset_root"), pipeline.cfg.data.root)
            stage = pipeline.stage(entry.stage)
            reasons = explain_difference(manifest.get("key_parts", {}), pipeline.key(entry.stage).parts, stage.section)
            entry.why = "; ".join(reasons[:2]) + (f" (+{len(reasons) - 2} more)" if len(reasons) > 2 else "")
    return sorted(unused.values(), key=lambda e: min([f.stat().st_mtime for f in e.folders], default=0))


def other_live_dataset(root: str | None, own_root) -> str:
    """`root` when it is a prepared dataset other than `own_root` that still exists, else ""."""
    if not root:
        return ""
    path = Path(root).expanduser()
    if path.resolve() == Path(own_root).expanduser().resolve() or not (path / "dataset.json").is_file():
        return ""
    return str(path)


def remove(entry: Unused, lock_name: Path) -> bool:
    """Delete the key's folders, then its lock file, while holding that lock; False (nothing
    deleted) when a running wss process holds it."""
    with open(lock_name, "a") as lock:
        if not try_lock(lock, fcntl.LOCK_EX, lock_name):
            return False
        for folder in entry.folders:
            # a complete artifact first loses its manifest: half deleted, it is never read as a result
            (folder / "manifest.json").unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
        if not entry.kept:
            lock_name.unlink(missing_ok=True)
    return True


def clean(pipeline, delete: bool) -> tuple[list[dict], int, list[str]]:
    """Rows for the table, bytes freed (or to free) and what was left alone, and why."""
    rows, total, left = [], 0, []
    for entry in find_unused(pipeline):
        name = pipeline.store.root / f"{entry.stage}-{entry.key}"
        if entry.other_dataset:
            left.append(f"{name} (computed from another prepared dataset, {entry.other_dataset})")
            continue
        newest = max([f.stat().st_mtime for f in entry.folders], default=None)
        row = {
            "stage": entry.stage,
            "key": entry.key,
            "what": entry.what,
            "MiB": entry.bytes / 2**20,
            "modified": time.strftime("%Y-%m-%d %H:%M", time.localtime(newest)) if newest else "",
            "differs in": entry.why,
        }
        if delete and not remove(entry, pipeline.store.lock_path(f"{entry.stage}-{entry.key}")):
            left.append(f"{name} (a running wss process holds its lock)")
            continue
        total += entry.bytes
        rows.append(row)
    return rows, total, left

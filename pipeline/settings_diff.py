"""What sets an artifact apart: the settings of its key that differ from the shipped config the
run started from.

The reference is made of the shipped run configs (`configs/*.yaml`, not the method presets of
`configs/methods/`) among the files the run's config was read from, `base:` files included, in
the order they were layered, without the `-o` overrides; a config that builds on no shipped one
is compared with the defaults. Both sides are the settings that make the stage's artifact (its
key's settings: the section's settings the stage reads, the `data` splits, `run.seed`, a
`--limit`), so what only says how to run (`run.workers`) or what another stage reads never
shows. `-c configs/demo.yaml -o irn.sem_seg_bg_threshold=0.3` differs in
`irn.sem_seg_bg_threshold` for the pseudo stage and in nothing for cam and irn; a `wss compare`
method differs in `cam.method` and its preset's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.errors import WssError
from pipeline.cache import flatten
from pipeline.config import Config, load_config
from stages.base import PACKAGE_ROOT

SHIPPED = PACKAGE_ROOT / "configs"


class Absent:
    """A setting one side's key does not hold (another method's option, a `--limit`)."""

    def __repr__(self) -> str:
        return "-"

    __str__ = __repr__


ABSENT = Absent()


@dataclass(frozen=True)
class Difference:
    name: str  # dotted, as `-o` takes it: irn.sem_seg_bg_threshold
    value: Any  # this run's (ABSENT: its key has no such setting)
    reference: Any  # the reference's


def shipped_files(files) -> list[Path]:
    """The shipped run configs among `files` (resolved paths, as Config.files has them)."""
    shipped = SHIPPED.resolve()
    return [Path(f) for f in files if Path(f).parent == shipped and Path(f).suffix in (".yaml", ".yml")]


def reference_config(cfg: Config) -> tuple[str, Config]:
    """(name, Config) of the reference: the shipped configs `cfg` was read from, or the defaults."""
    files = shipped_files(cfg.files)
    if files:
        try:
            return " + ".join(str(f.relative_to(PACKAGE_ROOT)) for f in files), load_config(files)
        except WssError:  # a shipped file that no longer loads alone: the defaults still compare
            pass
    return "the defaults", Config()


def sectioned(key_config: dict, section: str) -> dict:
    """A stage's key settings with its own section's settings under the section's name, as a
    config file has them (`data`, `run` and `limit` are already in place)."""
    own = {k: v for k, v in key_config.items() if k not in ("data", "run", "limit")}
    return {section: own, **{k: v for k, v in key_config.items() if k in ("data", "run", "limit")}}


def differences(current: dict, reference: dict) -> list[Difference]:
    """The dotted settings whose values differ, in `current`'s order, then those only `reference` has."""
    ours, theirs = flatten(current), flatten(reference)
    names = list(dict.fromkeys([*ours, *theirs]))
    found = [Difference(name, ours.get(name, ABSENT), theirs.get(name, ABSENT)) for name in names]
    return [d for d in found if not same(d.value, d.reference)]


def same(a: Any, b: Any) -> bool:
    """Equal as settings: a tuple and a list of the same items are the same setting."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b

"""Run configuration: a YAML file plus dotted command-line overrides, validated into dataclasses.

Each stage owns the dataclass of its section (stages/<name>/config.py); this module composes
them, checks every key and type, and names the file and key in every error.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from data.errors import WssError
from stages.cam.config import CamConfig
from stages.irn.config import IrnConfig
from stages.seg.config import SegConfig


class ConfigError(WssError):
    pass


@dataclass
class DataConfig:
    root: str = "runs/data/synthetic"  # the prepared dataset directory (`wss prepare ...`)
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class RunConfig:
    """How to run, not what to compute: only `seed` enters the cache keys (another seed trains
    other models)."""
    workdir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    workers: int = -1  # data-loader and per-image worker processes; -1 = one per core, max 8
    verbose: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    irn: IrnConfig = field(default_factory=IrnConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})
    overrides: tuple[str, ...] = field(default=(), metadata={"internal": True})

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return {f.name: dataclasses.asdict(getattr(self, f.name))
                for f in dataclasses.fields(self) if not f.metadata.get("internal")}

    def cli_args(self) -> str:
        """`-c FILE -o key=value ...` of this config, for commands that an error message suggests."""
        return " ".join([f"-c {self.source}", *(f"-o {shlex.quote(item)}" for item in self.overrides)])

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(path: str | Path | list | tuple | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read `path` (following `base:` chains), apply `key=value` overrides, validate.

    `path` may be a list: later files are layered over earlier ones (e.g. a dataset config and
    then a method preset). Each file is checked on its own first, so errors name the file.
    """
    paths = [] if path is None else [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    raw: dict = {}
    for one in paths:
        layer = read_yaml_with_base(one)
        build(Config, layer, where=str(one), prefix="")
        raw = deep_merge(raw, layer)
    where = " + ".join(str(p) for p in paths) or "<defaults>"
    config = build(Config, raw, where=where, prefix="")
    for item in overrides:  # one at a time, so that an error names the override, not the file
        key, value = parse_override(item)
        set_dotted(raw, key, value, where=f"override {item!r}", config=config)
        config = build(Config, raw, where=f"override {item!r}", prefix="")
    check_across_fields(config, where + "".join(f" + override {item!r}" for item in overrides))
    config.source = " -c ".join(str(p) for p in paths) or "<defaults>"
    config.overrides = tuple(overrides)
    return config


def check_across_fields(config: Config, where: str) -> None:
    """Rules that tie two settings together, checked once on the whole config: a file layered
    under another, or one override of several, may hold half of a valid pair."""
    irn = config.irn
    if irn.conf_bg_threshold > irn.conf_fg_threshold:  # the pixels between them are the ignored band
        raise ConfigError(f"{where}: irn.conf_bg_threshold ({irn.conf_bg_threshold}) must not be above "
                          f"irn.conf_fg_threshold ({irn.conf_fg_threshold}): the CAM scores between them "
                          f"are the seeds' ignored band")


def read_yaml_with_base(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A file may name `base: other.yaml` (relative to itself); its keys override the base's."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base:` chain loops back on itself")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except DuplicateKeyError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(error)})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {error.start})") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error.strerror})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = raw.pop("base", None)
    build(Config, raw, where=str(path), prefix="")  # before merging, so that an error names this file
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must be the path of one config file, got {base!r}")
    merged = read_yaml_with_base(path.parent / base, seen + (path.resolve(),))
    return deep_merge(merged, raw)


class DuplicateKeyError(yaml.YAMLError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, at any depth: PyYAML keeps the
    last one silently, so a second `cam:` section would drop every setting of the first."""

    def construct_document(self, node: yaml.Node):
        refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)


def refuse_duplicate_keys(node: yaml.Node, prefix: str, visited: set[int]) -> None:
    """Raise DuplicateKeyError naming the dotted key and both lines. Merge keys (`<<: *base`)
    are YAML's way to override and are left alone; an alias is walked once."""
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            name = (key_node.tag, key_node.value)
            if name in lines:
                raise DuplicateKeyError(f"key '{prefix}{key_node.value}' appears twice, at lines {lines[name]} "
                                        f"and {line}; keep one")
            lines[name] = line
            refuse_duplicate_keys(value_node, f"{prefix}{key_node.value}.", visited)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            refuse_duplicate_keys(item, f"{prefix.rstrip('.')}[{index}].", visited)


def deep_merge(base: dict, top: dict, cls: type = None) -> dict:
    """`top` over `base`: sections and nested sections (dataclasses) merge key by key; any other
    value, a mapping-valued setting such as `seg.losses` included, is replaced whole, as `-o`
    replaces it (a base's `{ce: 1, dice: 1}` under `{lovasz: 1}` is lovasz alone)."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in top.items():
        hint = hints.get(key)
        if value is None and dataclasses.is_dataclass(hint):
            value = {}  # a section left empty (its keys commented out) changes nothing
        if isinstance(value, dict) and isinstance(out.get(key), dict) and dataclasses.is_dataclass(hint):
            out[key] = deep_merge(out[key], value, hint)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML, except that a setting that takes text keeps the
    text as typed (`data.train_split=1.10` is '1.10', not the number 1.1 written back as '1.1')."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, (int, float)) and takes_text(field_hint(key)):
        value = text.strip()
    return key, value


def field_hint(dotted_key: str) -> Any:
    """The type of the setting a dotted key names, or None when there is no such setting."""
    hint: Any = Config
    for part in dotted_key.split("."):
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return hint


def takes_text(hint: Any) -> bool:
    return hint is str or (typing.get_origin(hint) in (Union, types.UnionType) and str in typing.get_args(hint))


def yaml_problem(error: yaml.YAMLError) -> str:
    """One line: the problem and where (PyYAML's text spans several lines with a code excerpt)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def set_dotted(raw: dict, key: str, value: Any, where: str, config: Config | None = None) -> None:
    """Set `key` in the raw mapping. A key inside a mapping-valued setting (`seg.losses.dice=2`)
    changes that entry of the setting's current value (file or default), keeping the others; a
    mapping given for a nested section (`irn.crf={gauss_sxy: 5}`) merges into it."""
    parts = key.split(".")
    node, current = raw, config
    for part in parts[:-1]:
        value_now = getattr(current, part, None) if current is not None else None
        if node.get(part) is None:  # absent, or a section the file leaves empty
            node[part] = dict(value_now) if isinstance(value_now, dict) else {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part!r} is not a section")
        node = child
        current = value_now if dataclasses.is_dataclass(value_now) else None
    last = parts[-1]
    target = getattr(current, last, None) if current is not None else None
    if isinstance(value, dict) and isinstance(node.get(last), dict) and dataclasses.is_dataclass(target):
        value = deep_merge(node[last], value, type(target))  # a section merges key by key, as in a file
    node[last] = value


def build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, checking keys and types recursively."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{where}: unknown key '{prefix}{key}'{hint}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = check_value(hints[name], raw[name], where, f"{prefix}{name}")
            check_range(name, values[name], where, f"{prefix}{name}")
    return cls(**values)


# Allowed values by key name, in whichever section the key appears, so that `lr=-1`, `epochs=0`
# or a threshold of 30 (meant 0.30) fail when the config loads, not hours into a run.
# (low, high) inclusive, None = open; keys in ABOVE_LOW must be strictly greater than low.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "epochs": (1, None), "batch_size": (1, None), "crop_size": (16, None), "resize_long": (16, None),
    "predict_size": (16, None), "lr": (0, None), "head_lr_mult": (0, None), "momentum": (0, 1),
    "weight_decay": (0, None), "dropblock_prob": (0, 1), "dropblock_size": (1, None),
    "frozen_stages": (-1, 4),
    "pylon_channels": (1, None), "multiscale_stages": (0, 4), "minmax_k": (0, None),
    "minmax_entropy_weight": (0, None), "minmax_erase_steps": (0, None), "scales": (0, None),
    "eval_bg_threshold": (0, 1), "conf_fg_threshold": (0, 1), "conf_bg_threshold": (0, 1),
    "sem_seg_bg_threshold": (0, 1), "threshold": (0, 1), "holdout_fraction": (0, 0.9),
    "radius": (2, None),  # radius 1 holds no pair: a pair is nearer than the radius
    "walk_radius": (1, None), "beta": (0, None), "exp_times": (0, 16),
    "gt_prob": (0, 0.99), "gauss_sxy": (0, None), "bilateral_sxy": (0, None), "bilateral_srgb": (0, None),
    "gauss_compat": (0, None), "bilateral_compat": (0, None), "iterations": (1, None), "workers": (-1, None),
    "losses": (0, None),  # the weight of each loss
    "seed": (0, None),
}
ABOVE_LOW = {"lr", "head_lr_mult", "minmax_k", "scales", "beta", "gt_prob", "gauss_sxy", "bilateral_sxy",
             "bilateral_srgb", "holdout_fraction"}
NOT_EMPTY = {"scales", "multiscale_stages", "losses"}
DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def check_range(name: str, value: Any, where: str, key: str) -> None:
    if name == "device" and not (value in ("auto", "cpu", "cuda") or
                                 (str(value).startswith("cuda:") and str(value)[5:].isdigit())):
        raise ConfigError(f"{where}: {key} must be {DEVICE_NAMES}, got {value!r}")
    if name == "resize_long" and (len(value) != 2 or value[0] > value[1]):
        raise ConfigError(f"{where}: {key} must be [shortest, longest] long side, got {value!r}")
    if name in NOT_EMPTY and not value:
        raise ConfigError(f"{where}: {key} must not be empty")
    if name not in RANGES or value is None:
        return
    low, high = RANGES[name]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for item in items:
        below = low is not None and (item <= low if name in ABOVE_LOW else item < low)
        if below or (high is not None and item > high):
            bound = (f"> {low}" if name in ABOVE_LOW else f">= {low}") if high is None else \
                f"in {'(' if name in ABOVE_LOW else '['}{low}, {high}]"
            raise ConfigError(f"{where}: {key} must be {bound}, got {item!r}")


def check_value(hint: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(option, value, where, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {key}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        item_hint = args[0] if args else Any
        items = [check_value(item_hint, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return {str(k): check_value(args[1], v, where, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):  # YAML reads 1.10 as 1.1 and 010 as 8: only quotes keep the text
            quoted = " (put it in quotes)" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            raise ConfigError(f"{where}: {key} must be a string{quoted}, got {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported type {hint}")

"""Run configuration: YAML files plus dotted command-line overrides, validated into pydantic models.

Each stage owns the model of its section (stages/<name>/config.py, built from
stages.common.settings); this module composes them with `data` and `run`, reads files (`base:`
chains, layers, duplicate keys) and overrides, and names the file or override and the key in
every error.
"""

from __future__ import annotations

import shlex
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, Field, PrivateAttr, ValidationError
from pydantic_core import PydanticCustomError

from data.errors import WssError
from stages.cam.config import CamConfig
from stages.common.settings import Section, describe_error, section_type
from stages.irn.config import IrnConfig
from stages.seg.config import SegConfig


class ConfigError(WssError):
    pass


class DataConfig(Section):
    """The prepared dataset and the splits the stages use."""

    root: str = Field("runs/data/synthetic", description="A prepared dataset (`wss prepare ...`).")
    train_split: str = Field(
        "train",
        description="Stages 1-2 train on it and are scored on its masks, as in IRNet; the segmenter "
        "trains on its pseudo-labels.",
    )
    val_split: str = Field(
        "val",
        description="The classifier's AUC and the segmenter are scored there. Another of the dataset's "
        "splits re-scores stage 1's classifier and has the trained segmenter predict it: nothing "
        "is retrained. Adding or editing a file in `splits/` changes the dataset's fingerprint, "
        "which retrains every stage.",
    )
    tune_split: Optional[str] = Field(
        None,
        description="A split with masks on which `wss tune` chooses settings that need no retraining "
        "(a few annotated images, e.g. a split of `wss prepare folder --splits`, or VOC's `train` when "
        "`train_aug` trains); null: none. Its images are left out of every stage's scores (scoring "
        "only: a new value re-scores the cached artifacts), and `wss tune` refuses one that is the "
        "train split or shares an image with the val split.",
    )


def device_name(value: str) -> str:
    if not (value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())):
        raise PydanticCustomError("setting", "must be auto, cpu, cuda or cuda:N")
    return value


class RunConfig(Section):
    """How to run, not what to compute: only `seed` enters the cache keys."""

    workdir: str = Field("runs", description="Where artifacts, reports and evaluations go.")
    device: Annotated[str, AfterValidator(device_name)] = Field(
        "auto", description="`auto` (a CUDA GPU if there is one), `cpu`, `cuda` or `cuda:N`."
    )
    seed: int = Field(
        0, ge=0, description="Another seed trains other models; the runs repeat to the last digit with one seed."
    )
    workers: int = Field(
        -1, ge=-1, description="Data-loader and per-image worker processes; -1: one per core, at most 8."
    )
    verbose: bool = Field(False, description="Debug logging.")
    tensorboard: bool = Field(
        True,
        description="TensorBoard event files of every stage in `<workdir>/<dataset>/tensorboard/<stage>-<key12>/` "
        "(`tensorboard --logdir runs/`); without the `tensorboard` package a warning and no files.",
    )


class Config(Section):
    """A whole run config. `source` and `overrides` say where it came from (for commands that an
    error message suggests); they are not settings."""

    data: DataConfig = Field(default_factory=DataConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    cam: CamConfig = Field(default_factory=CamConfig)
    irn: IrnConfig = Field(default_factory=IrnConfig)
    seg: SegConfig = Field(default_factory=SegConfig)
    _source: str = PrivateAttr("<defaults>")
    _overrides: tuple[str, ...] = PrivateAttr(())
    _files: tuple[Path, ...] = PrivateAttr(())

    @property
    def source(self) -> str:
        return self._source

    @property
    def overrides(self) -> tuple[str, ...]:
        return self._overrides

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file the config was read from, `base:` files included, resolved, bases first."""
        return self._files

    def section(self, name: str) -> Any:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return self.model_dump()

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
    files: list[Path] = []
    for one in paths:
        layer = read_yaml_with_base(one, read=files)
        validate(layer, where=str(one))
        raw = deep_merge(raw, layer)
    where = " + ".join(str(p) for p in paths) or "<defaults>"
    config = validate(raw, where=where)
    for item in overrides:  # one at a time, so that an error names the override, not the file
        key, value = parse_override(item)
        set_dotted(raw, key, value, where=f"override {item!r}", config=config)
        config = validate(raw, where=f"override {item!r}")
    check_across_fields(config, where + "".join(f" + override {item!r}" for item in overrides))
    config._source = " -c ".join(str(p) for p in paths) or "<defaults>"
    config._overrides = tuple(overrides)
    config._files = tuple(files)
    return config


def check_across_fields(config: Config, where: str) -> None:
    """Rules that tie two settings together, checked once on the whole config: a file layered
    under another, or one override of several, may hold half of a valid pair."""
    irn = config.irn
    if irn.conf_bg_threshold > irn.conf_fg_threshold:  # the pixels between them are the ignored band
        raise ConfigError(
            f"{where}: irn.conf_bg_threshold ({irn.conf_bg_threshold}) must not be above "
            f"irn.conf_fg_threshold ({irn.conf_fg_threshold}): the CAM scores between them "
            f"are the seeds' ignored band"
        )


def read_yaml_with_base(path: Path, seen: tuple[Path, ...] = (), read: list[Path] | None = None) -> dict:
    """A file may name `base: other.yaml` (relative to itself); its keys override the base's.
    `read` collects the files read, resolved, bases first."""
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
    validate(raw, where=str(path))  # before merging, so that an error names this file
    if base is None:
        if read is not None:
            read.append(path.resolve())
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base must be the path of one config file, got {base!r}")
    merged = read_yaml_with_base(path.parent / base, seen + (path.resolve(),), read)
    if read is not None:
        read.append(path.resolve())
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
                raise DuplicateKeyError(
                    f"key '{prefix}{key_node.value}' appears twice, at lines {lines[name]} and {line}; keep one"
                )
            lines[name] = line
            refuse_duplicate_keys(value_node, f"{prefix}{key_node.value}.", visited)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            refuse_duplicate_keys(item, f"{prefix.rstrip('.')}[{index}].", visited)


def validate(raw: dict, where: str) -> Config:
    """The Config of a raw mapping; the first problem is one line naming `where` and the key."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{where}: {describe_error(error, Config)}") from None


def deep_merge(base: dict, top: dict, model: type[BaseModel] = Config) -> dict:
    """`top` over `base`: sections and nested sections (`irn.crf`) merge key by key; any other
    value, a mapping-valued setting such as `seg.losses` included, is replaced whole, as `-o`
    replaces it (a base's `{ce: 1, dice: 1}` under `{lovasz: 1}` is lovasz alone)."""
    out = dict(base)
    for key, value in top.items():
        section = section_of(model, key)
        if value is None and section is not None:
            value = {}  # a section left empty (its keys commented out) changes nothing
        if isinstance(value, dict) and isinstance(out.get(key), dict) and section is not None:
            out[key] = deep_merge(out[key], value, section)
        else:
            out[key] = value
    return out


def section_of(model: type[BaseModel] | None, key: Any) -> type[BaseModel] | None:
    """The model of `model`'s section `key`, or None when `key` is a setting or unknown."""
    field = model.model_fields.get(key) if model is not None and isinstance(key, str) else None
    return section_type(field.annotation) if field is not None else None


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
    model: type[BaseModel] | None = Config
    hint: Any = None
    for part in dotted_key.split("."):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        hint = field.annotation
        model = section_type(hint)
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
        value_now = setting_value(current, part)
        if node.get(part) is None:  # absent, or a section the file leaves empty
            node[part] = dict(value_now) if isinstance(value_now, dict) else {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part!r} is not a section")
        node = child
        current = value_now if isinstance(value_now, BaseModel) else None
    last = parts[-1]
    target = setting_value(current, last)
    if isinstance(value, dict) and isinstance(node.get(last), dict) and isinstance(target, BaseModel):
        value = deep_merge(node[last], value, type(target))  # a section merges key by key, as in a file
    node[last] = value


def setting_value(section: BaseModel | None, name: str) -> Any:
    """The current value of setting `name` of a section; None for anything that is not a setting."""
    return getattr(section, name) if section is not None and name in type(section).model_fields else None

"""Model and training-checkpoint files that loading cannot turn into running code.

A pickled file (`torch.save`) is a program: unpickling it without torch's restricted loader runs
whatever its author put into it, and trained segmenters and whole run folders are what users
share. Every model and checkpoint wss writes is therefore a safetensors file: a JSON header
and raw tensor bytes. The tensors are the state dicts; everything else (config, classes,
palette, task, epoch, history, the optimizer's settings) is one JSON document in the header's
`__metadata__` map. Reading such a file parses it; nothing in it is ever executed.

One file rather than tensors plus a JSON sidecar: a single rename installs weights and
metadata together, so they can never come from two different runs or be half replaced, and
one copied file is a whole model. The tensors of a model file are its plain state dict, so
any safetensors reader (`safetensors.torch.load_file`) gets the weights.

Model files of earlier versions (`model.pt`, a pickled {"model": state dict, ...}) are read
only through `torch.load(weights_only=True)`, torch's restricted unpickler: tensors and plain
values pass, anything else is refused before it is built.

Every problem with a file (missing, cut short, garbled, of another kind, weights that do not
fit) is one line naming the file and, given the stage that made it, how to recompute it.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data.errors import WssError
from stages.base import StageInputError

FORMAT = "wss"
FORMAT_VERSION = "1"
# torch.save's zip archive; the pickle of torch < 1.6. Tried only when the file is not a
# safetensors file: a safetensors file starts with its header's length, whose first byte is
# 0x80 for one header length in 256 (multiples of 8 ending in 0x80).
LEGACY_MAGIC = (b"PK\x03\x04", b"\x80")
OPTIMIZER = "optimizer/"  # prefix of a checkpoint's optimizer-state tensors (its weights: "model/")
MODEL = "model/"
KIND_NAMES = {
    "cam": "cam model",
    "irn": "IRN model",
    "seg": "segmenter model",
    "checkpoint": "training checkpoint",
    "holdout": "held-out checkpoint",
}


@dataclass
class StateFile:
    """The content of a model or checkpoint file: its tensors and its JSON metadata. `kind` is
    None for a model file of an earlier version (a pickled dict read with weights_only=True)."""

    tensors: dict[str, torch.Tensor]
    meta: dict
    kind: str | None


@dataclass
class Checkpoint:
    """A training checkpoint checked against the model and optimizer it is to be loaded into."""

    weights: dict[str, torch.Tensor]
    optimizer: dict  # an optimizer state dict, for optimizer.load_state_dict
    epoch: int  # the last epoch trained (0-based)
    history: list[dict]


class FileRefused(Exception):
    """Why a file cannot be used; `refusal` turns it into the caller's one-line error."""


def refusal(path: Path, what: str, reason: str, stage: str | None, error: type[WssError] = StageInputError) -> WssError:
    advice = f"; recompute it with wss run --force {stage}" if stage else ""
    return error(f"{path}: unreadable {what} ({reason}){advice}")


# ------------------------------------------------------------------------------------- writing


def write_state_file(path: Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write `tensors` and the JSON-able `meta` as a safetensors file of `kind` (e.g. "cam",
    "checkpoint"), through a temporary name: a reader sees the old file or the whole new one.
    A full disk (or any write error) is an OSError naming `path`, which the CLI prints in one line."""
    path = Path(path)
    header = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "meta": json.dumps(meta)}
    tensors = standalone(tensors)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb"):  # the permissions any new file gets here (the umask's), which
            mode = os.stat(tmp).st_mode & 0o777  # safetensors' own private temporary file lacks
        save_file(tensors, str(tmp), metadata=header)
        os.chmod(tmp, mode)
    except (OSError, SafetensorError) as error:
        tmp.unlink(missing_ok=True)
        raise save_error(error, path) from None
    os.replace(tmp, path)


def save_error(error: Exception, path: Path) -> OSError:
    """safetensors reports a write failure as SafetensorError("... I/O error: No space left on
    device (os error 28)"): an OSError with that errno, naming the file."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    code = getattr(error, "errno", None)
    found = re.search(r"os error (\d+)", reason)
    if code is None and found:
        code = int(found.group(1))
    code = code or errno.EIO
    hint = "; is the disk full?" if code == errno.ENOSPC else ""
    return OSError(code, f"could not save ({reason}){hint}", str(path))


def standalone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing memory with another (safetensors stores
    each tensor's bytes once and refuses shared or strided ones; a channels_last weight becomes
    contiguous, its values unchanged)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not torch.is_tensor(tensor):
            raise TypeError(f"a model file holds named tensors, got {name!r}: {type(tensor).__name__}")
        tensor = tensor.detach().to("cpu").contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer and pointer in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def write_model_file(path: Path, kind: str, model: torch.nn.Module | dict, meta: dict) -> None:
    """A trained model (or its state dict) with what rebuilding it needs (`meta`)."""
    weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
    write_state_file(path, kind, weights, meta)


def write_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int, history: list[dict]
) -> None:
    """The state `--resume` continues from: weights, optimizer state, last epoch, epoch log.

    The optimizer's state dict is flattened: its tensors (momentum buffers, Adam moments and
    steps) become `optimizer/<param index>/<name>`, and its param groups (learning rates,
    betas, the parameter indices) and any non-tensor state go into the JSON metadata."""
    tensors = {MODEL + name: value for name, value in model.state_dict().items()}
    state = optimizer.state_dict()
    plain_state: dict[str, dict] = {}
    for index, values in state["state"].items():
        plain_state[str(index)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{OPTIMIZER}{index}/{name}"] = value
            else:
                plain_state[str(index)][name] = value
    meta = {
        "epoch": epoch,
        "history": history,
        "optimizer": {"param_groups": state["param_groups"], "state": plain_state},
    }
    write_state_file(path, "checkpoint", tensors, meta)


# ------------------------------------------------------------------------------------- reading


def read_state_file(
    path: Path, kind: str, what: str, stage: str | None, error: type[WssError] = StageInputError, legacy: bool = False
) -> StateFile:
    """The tensors and metadata of a file `write_state_file` wrote as `kind`, on the CPU.

    `legacy`: a pickled model file of an earlier version is read too, with weights_only=True
    only. A missing, cut-short, garbled or foreign file, or one of another kind, raises `error`
    in one line naming the file and (given the `stage` that made it) how to recompute it."""
    path = Path(path)
    try:
        return _read(path, kind, legacy)
    except FileRefused as reason:
        raise refusal(path, what, str(reason), stage, error) from None


def _read(path: Path, kind: str, legacy: bool) -> StateFile:
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as problem:
        raise FileRefused(f"{type(problem).__name__}: {problem.strerror or problem}") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as problem:  # SafetensorError and friends: the header does not parse or fit the file
        if legacy and head.startswith(LEGACY_MAGIC):
            return _read_legacy(path)
        detail = str(problem).splitlines()[0] if str(problem) else ""
        raise FileRefused(f"not a complete safetensors file: {type(problem).__name__}: {detail}") from None
    if header.get("format") != FORMAT or "meta" not in header:
        raise FileRefused("a safetensors file without wss metadata: not a file wss wrote")
    if header.get("version") != FORMAT_VERSION:
        raise FileRefused(f"wss file format version {header.get('version')!r}; this wss reads {FORMAT_VERSION}")
    if header.get("kind") != kind:
        found = KIND_NAMES.get(header.get("kind"), repr(header.get("kind")))
        raise FileRefused(f"it is a wss {found} file, not a {KIND_NAMES.get(kind, kind)} file")
    try:
        meta = json.loads(header["meta"])
    except ValueError as problem:
        raise FileRefused(f"its metadata is not JSON: {problem}") from None
    if not isinstance(meta, dict):
        raise FileRefused("its metadata is not a JSON object")
    return StateFile(tensors, meta, kind)


def _read_legacy(path: Path) -> StateFile:
    """A `model.pt` of an earlier version, through torch's restricted unpickler only."""
    try:  # an open file: torch.load would hand a path named *.safetensors to another reader
        with open(path, "rb") as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as problem:  # torch's own text advises loading it unsafely: not repeated
        named = re.search(r"GLOBAL ([\w.]+)", str(problem))
        detail = f" (it would call or build {named.group(1)})" if named else ""
        raise FileRefused(
            f"a pickled file that torch's safe loader (weights_only=True) refuses{detail}; "
            f"loading it otherwise could run code in it"
        ) from None
    except Exception as problem:  # a cut-short archive, EOFError, ...
        detail = str(problem).splitlines()[0] if str(problem) else ""
        raise FileRefused(f"{type(problem).__name__}: {detail}") from None
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise FileRefused("a pickled file without the {'model': state dict} of a wss model file")
    try:  # tuples become lists, as in the metadata of a current file; tensors etc. are refused
        meta = json.loads(json.dumps({k: v for k, v in state.items() if k != "model"}))
    except (TypeError, ValueError) as problem:
        raise FileRefused(f"a pickled file whose metadata is not plain values ({problem})") from None
    return StateFile(dict(weights), meta, None)


def checkpoint_epoch(path: Path) -> int | None:
    """The last epoch (0-based) a training checkpoint holds, read from its header alone (no
    tensor is loaded): what `wss status` says an interrupted stage would resume after. None when
    the file is not a readable wss checkpoint (a `--resume` then trains from the start)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
        if header.get("format") != FORMAT or header.get("kind") != "checkpoint":
            return None
        epoch = json.loads(header["meta"]).get("epoch")
    except Exception:  # noqa: BLE001 - any unreadable header means the same: nothing to resume from
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else None


def read_model_file(
    path: Path,
    kind: str,
    what: str,
    stage: str | None,
    error: type[WssError] = StageInputError,
    required: dict[str, type | tuple] | None = None,
) -> StateFile:
    """A model file of `kind` (a pickled one of an earlier version too, read safely), its
    metadata checked to hold `required` {key: type(s)}."""
    state = read_state_file(path, kind, what, stage, error, legacy=True)
    for key, types in (required or {}).items():
        value = state.meta.get(key)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            names = "/".join(t.__name__ for t in _as_tuple(types))
            raise refusal(path, what, f"its metadata has no {names} {key!r}", stage, error)
    return state


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def weights_problem(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> str | None:
    """Why `weights` cannot be loaded into `model` exactly (names, shapes, dtypes), or None."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = [
            f"{len(names)} {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for label, names in (("missing", missing), ("unexpected", unexpected))
            if names
        ]
        return "weights " + " and ".join(parts)
    for name, want in expected.items():  # in the model's order
        tensor = weights[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            return (
                f"weight {name} is {tuple(tensor.shape)} {tensor.dtype}, the model's {tuple(want.shape)} {want.dtype}"
            )
    return None


def load_weights(
    model: torch.nn.Module,
    weights: dict[str, torch.Tensor],
    path: Path,
    what: str,
    stage: str | None,
    error: type[WssError] = StageInputError,
) -> None:
    """Load `weights` into `model` after checking that every name, shape and dtype fits (a
    model is never left half loaded); otherwise `error` in one line naming `path`."""
    problem = weights_problem(model, weights)
    if problem is not None:
        advice = f"; recompute it with wss run --force {stage}" if stage else ""
        raise error(f"{path}: {problem}: they do not fit the {what}{advice}")
    model.load_state_dict(weights)


def read_checkpoint_file(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """A checkpoint `write_checkpoint` wrote, checked against `model` and `optimizer` (names,
    shapes and dtypes of the weights; group sizes and state shapes of the optimizer) so that
    loading it cannot fail half way. Raises StageInputError in one line."""
    state = read_state_file(path, "checkpoint", "checkpoint", None)
    try:
        return _checkpoint(state, model, optimizer)
    except FileRefused as reason:
        raise refusal(path, "checkpoint", str(reason), None) from None


def _checkpoint(state: StateFile, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    meta = state.meta
    epoch, history, saved = meta.get("epoch"), meta.get("history"), meta.get("optimizer")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise FileRefused(f"epoch {epoch!r} is not a count")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise FileRefused("its epoch history is not a list of records")
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("param_groups"), list)
        or not isinstance(saved.get("state"), dict)
    ):
        raise FileRefused("no optimizer state")
    weights = {k[len(MODEL) :]: v for k, v in state.tensors.items() if k.startswith(MODEL)}
    problem = weights_problem(model, weights)
    if problem is not None:
        raise FileRefused(f"{problem}: it is the checkpoint of another model")
    return Checkpoint(weights, optimizer_state(state.tensors, saved, optimizer), epoch, history)


def optimizer_state(tensors: dict[str, torch.Tensor], saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state dict `write_checkpoint` flattened, rebuilt for `optimizer`: the
    parameter indices as ints again and a group value that the optimizer keeps as a tuple
    (Adam's betas) a tuple again, as JSON cannot tell them from lists."""
    live = optimizer.param_groups
    groups = saved["param_groups"]
    if len(groups) != len(live) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) and len(g["params"]) == len(live_group["params"])
        for g, live_group in zip(groups, live)
    ):
        raise FileRefused("its optimizer parameter groups do not fit the model's")
    param_of = {}
    rebuilt_groups = []
    for group, current in zip(groups, live):
        group = {
            k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v for k, v in group.items()
        }
        for key, value in current.items():
            if key != "params" and not same_kind(group.get(key, KeyError), value):
                raise FileRefused(f"optimizer setting {key!r} is {group.get(key, 'missing')!r}, not like {value!r}")
        rebuilt_groups.append(group)
        param_of.update(zip(group["params"], current["params"]))
    state: dict[int, dict] = {}
    for index, values in saved["state"].items():
        if not index.isdigit() or int(index) not in param_of or not isinstance(values, dict):
            raise FileRefused(f"optimizer state for an unknown parameter {index!r}")
        state[int(index)] = dict(values)
    for name, tensor in tensors.items():
        if not name.startswith(OPTIMIZER):
            continue
        index, _, key = name[len(OPTIMIZER) :].partition("/")
        if not index.isdigit() or int(index) not in state or not key:
            raise FileRefused(f"optimizer tensor {name} of no parameter")
        param = param_of[int(index)]
        if tensor.dim() and tensor.shape != param.shape:
            raise FileRefused(f"optimizer tensor {name} is {tuple(tensor.shape)}, its parameter {tuple(param.shape)}")
        state[int(index)][key] = tensor
    return {"state": state, "param_groups": rebuilt_groups}


def same_kind(saved, current) -> bool:
    """Whether a saved optimizer setting can stand where the optimizer has `current` (numbers
    for numbers, a flag for a flag, a tuple for a tuple; None where either is unset)."""
    if saved is KeyError:
        return False
    if saved is None or current is None:
        return True
    if isinstance(current, bool) or isinstance(saved, bool):
        return isinstance(saved, bool) and isinstance(current, bool)
    if isinstance(current, (int, float)):
        return isinstance(saved, (int, float))
    if isinstance(current, tuple):
        return (
            isinstance(saved, tuple)
            and len(saved) == len(current)
            and all(same_kind(s, c) for s, c in zip(saved, current))
        )
    return isinstance(saved, type(current))

"""What every config section is made of: a strict pydantic base model, the value types with their
YAML spellings, the training settings (bounds and descriptions written once, each section giving
only its defaults), and the wording of a validation error as one line naming the key.

Bounds belong to a field's type (`Annotated[float, Field(gt=0)]`), never to a name: two sections
may each have a `threshold` with its own range. Torch-free: `wss config show` and `wss prepare`
read configs without importing torch.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    """A config section: unknown keys are errors, and types are strict as the YAML has them (an
    integer is never read from `2.5` or `true`, nor a string from a number) except that an
    integer is a float and YAML 1.1's `1e-4` (a string to PyYAML) is the number. Defaults are
    validated too: a default that breaks its own bounds fails as soon as the section is built."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def empty_section_is_no_settings(cls, value: Any) -> Any:
        """A section whose keys are all commented out reads as null: it sets nothing."""
        return {} if value is None else value


def yaml_number(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string: a string that spells a float is that
    float. Anything else goes on to the type check unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def text_keys(value: Any) -> Any:
    """A mapping setting's keys are names: `{1: ...}` is the name "1"."""
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


def shortest_then_longest(value: list[int]) -> list[int]:
    if len(value) != 2 or value[0] > value[1]:
        raise PydanticCustomError("setting", "must be [shortest, longest] long side")
    return value


Float = Annotated[float, BeforeValidator(yaml_number)]
Keywords = Annotated[dict[str, Any], BeforeValidator(text_keys)]  # a library's keyword arguments
NamedWeights = Annotated[
    dict[str, Annotated[Float, Field(ge=0)]],
    BeforeValidator(text_keys),  # e.g. seg.losses
    Field(min_length=1),
]

# The training settings of the cam, irn and seg sections. Each section writes `epochs: Epochs = 5`.
Epochs = Annotated[int, Field(ge=1, description="Training epochs.")]
BatchSize = Annotated[int, Field(ge=1, description="Images per training step.")]
Optimizer = Annotated[Literal["sgd", "adamw"], Field(description="The optimizer, with a poly learning-rate schedule.")]
LearningRate = Annotated[Float, Field(gt=0, description="The learning rate.")]
HeadLrMult = Annotated[Float, Field(gt=0, description="The new head's learning rate is `lr * head_lr_mult`.")]
Momentum = Annotated[
    Float,
    Field(
        ge=0, le=1, description="SGD's momentum (AdamW reads none: left out of the cache key under `optimizer: adamw`)."
    ),
]
WeightDecay = Annotated[Float, Field(ge=0, description="Weight decay.")]
CropSize = Annotated[int, Field(ge=16, description="Side of the square random training crop, in pixels.")]
ResizeLong = Annotated[
    list[Annotated[int, Field(ge=16)]],
    AfterValidator(shortest_then_longest),
    Field(description="`[shortest, longest]` long side of the random rescale before the crop, in pixels."),
]


# ------------------------------------------------------------------------------ reading a field's type
def field_type(field: FieldInfo) -> Any:
    """The field's annotation with its metadata (bounds, validators, markers) put back on."""
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


def unwrap(hint: Any) -> tuple[Any, list]:
    """(the bare type, the constraints and markers of every Annotated layer); Optional[X] is X."""
    metadata: list = []
    while True:
        if typing.get_origin(hint) is Annotated:
            for item in hint.__metadata__:
                metadata.extend(item.metadata if isinstance(item, FieldInfo) else [item])
            hint = hint.__origin__
        elif typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(hint):
            options = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(options) != 1:
                return hint, metadata
            hint = options[0]
        else:
            return hint, metadata


def section_type(hint: Any) -> type[Section] | None:
    bare, _ = unwrap(hint)
    plain_class = inspect.isclass(bare) and typing.get_origin(bare) is None  # not list[int] and the like
    return bare if plain_class and issubclass(bare, BaseModel) else None


def item_type(hint: Any) -> Any:
    """The type of a list's items or a mapping's values."""
    args = typing.get_args(unwrap(hint)[0])
    return args[-1] if args else Any


def bounds(hint: Any) -> str | None:
    """`> 0`, `>= 1`, `in [0, 1]`, `in (0, 0.99]`: the bounds as the field declares them."""
    low = high = None
    open_low = False
    for item in unwrap(hint)[1]:
        if isinstance(item, annotated_types.Gt):
            low, open_low = item.gt, True
        elif isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Le):
            high = item.le
    if low is None and high is None:
        return None
    if high is None:
        return f"{'>' if open_low else '>='} {low}"
    if low is None:
        return f"<= {high}"
    return f"in {'(' if open_low else '['}{low}, {high}]"


def literal_choices(hint: Any) -> tuple | None:
    bare = unwrap(hint)[0]
    return typing.get_args(bare) if typing.get_origin(bare) is Literal else None


# ------------------------------------------------------------------------------ errors as one line
TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}
RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def describe_error(error: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first problem of a failed validation, in one line: `cam.lr must be > 0, got -1.0`.
    First in the order the sections and keys are declared, a section's unknown keys before its
    values (a misspelt key often explains the rest)."""
    problems = error.errors(include_url=False)
    return describe_problem(min(problems, key=lambda problem: reading_order(model, problem["loc"])), model, prefix)


def reading_order(model: type[BaseModel], loc: tuple) -> list[int]:
    """The declared position of each section and key along `loc`; -1 for an unknown key."""
    order: list[int] = []
    section: type[BaseModel] | None = model
    for part in loc:
        if section is None:
            break
        names = list(section.model_fields)
        if part not in names:
            order.append(-1)
            break
        order.append(names.index(part))
        section = section_type(field_type(section.model_fields[part]))
    return order


def describe_problem(problem: dict, model: type[BaseModel], prefix: str = "") -> str:
    setting, key, owner, hint = locate(model, problem["loc"], prefix)
    kind, value = problem["type"], problem.get("input")
    if kind == "extra_forbidden":
        known = list(owner.model_fields)
        name = str(problem["loc"][-1])
        parent = key[: len(key) - len(name)].rstrip(".")
        close = difflib.get_close_matches(name, known, n=1)
        hint_text = (
            f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)"
            if close
            else f" (known: {', '.join(known)})"
        )
        return f"unknown key '{key}'{hint_text}"
    if kind in RANGE_ERRORS:  # a bound is the setting's, whichever item broke it
        if unwrap(hint)[0] is float:  # the value as read: the error may hold the input before conversion
            value = float(yaml_number(value))
        return f"{setting} must be {bounds(hint) or problem['msg']}, got {value!r}"
    if kind == "too_short":
        return f"{setting} must not be empty"
    if kind == "literal_error":
        choices = literal_choices(hint) or ()
        return f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}"
    if kind == "string_type":  # YAML reads 1.10 as 1.1 and 010 as 8: only quotes keep the text
        quoted = " (put it in quotes)" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        return f"{key} must be a string{quoted}, got {value!r}"
    if kind in TYPE_WORDS:
        return f"{key} must be {TYPE_WORDS[kind]}, got {value!r}"
    if kind == "setting":  # a rule of the field's own (PydanticCustomError): its text says what
        return f"{key} {problem['msg']}, got {value!r}"
    return f"{key}: {problem['msg'][:1].lower()}{problem['msg'][1:]}, got {value!r}"


def locate(model: type[BaseModel], loc: tuple, prefix: str = "") -> tuple[str, str, type[BaseModel], Any]:
    """Where a validation error is: (the setting's dotted key, the key down to the item that
    failed, e.g. `cam.scales[1]` or `seg.losses.ce`, the section holding the setting, the type
    at the item)."""
    section: type[BaseModel] | None = model
    owner: type[BaseModel] = model
    setting = key = prefix.rstrip(".")
    hint: Any = None
    for part in loc:
        if section is not None:
            owner = section
            setting = key = f"{setting}.{part}" if setting else str(part)
            field = section.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return setting, key, owner, None
            hint = field_type(field)
        elif part != "[key]":
            key += f"[{part}]" if isinstance(part, int) else f".{part}"
            hint = item_type(hint)
        section = section_type(hint)
    return setting, key, owner, hint

"""Typed settings: strict value types, sections that refuse unknown keys, and one-line errors.

A field declares its type, range (``Field(gt=...)``) and choices (``Literal``; ``choice`` names them in
the refusal); ``json_schema_extra={"note": ...}`` adds to its error. A rule between fields is a model
validator raising ``Refusal``. ``validated`` words the first error as a one-line ``ConfigError``.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from nepa_scale.errors import ConfigError


def yaml_number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads a float only with a dot and a signed exponent: ``2e-3``, ``1e12`` and
    ``1.0e12`` are strings, ``1.0e+12`` is a number. Take such a string as the number it spells;
    anything else stays as it is, for the caller's own refusal."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def integer(value: Any) -> Any:
    """An int, or a whole float (YAML reads ``1.28e6`` as one); true, "3" and 1.5 are not integers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("int_type", "expected an integer")
    return value


# Strict where coercion would hide a mistake: "yes" and 1 are not booleans, "abc" is not a number.
Bool, Str = Annotated[bool, Strict()], Annotated[str, Strict()]
Float = Annotated[
    float, Strict(), Field(allow_inf_nan=False), BeforeValidator(yaml_number)
]  # an int is one too
Int = Annotated[int, BeforeValidator(integer)]
Probability, BelowOne = Annotated[Float, Field(ge=0, le=1)], Annotated[Float, Field(ge=0, lt=1)]
Fraction, Positive = Annotated[Float, Field(gt=0, le=1)], Annotated[Float, Field(gt=0)]


def choice(default: Any, noun: str) -> Any:
    """A ``Literal`` field's default, its refusal worded "unknown {noun} 'x' (choose from ...)"."""
    return Field(default, json_schema_extra={"noun": noun})


class Refusal(ValueError):
    """A validator's verdict: ``key`` (dotted, below the model that raises it; "" for the model
    itself) cannot be used, for ``reason``."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key = key


class Section(BaseModel):
    """A block of settings: a key it does not know is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data: Any) -> Any:
        return {} if data is None else data  # YAML `logging:` with nothing under it


M = TypeVar("M", bound=BaseModel)
EXPECTED = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",  # .inf, .nan: no setting means either
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
}
BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def validated(model: type[M], data: Any, prefix: str = "") -> M:
    """``model`` read from ``data``, or a ConfigError: one line, ``prefix`` and the dotted key first."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(prefix + _one_line(exc.errors()[0], model)) from None


def _one_line(error: ErrorDetails, model: type[BaseModel]) -> str:
    """One pydantic error in this project's words: ``key: what it may be, got value``."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    if kind == "missing":  # a tuple's item: the list is too short
        loc, kind = loc[:-1], "too_short"
    field = _field_at(model, loc)
    says = (field.json_schema_extra if field else None) or {}
    note = f" {says['note']}" if "note" in says else ""
    if kind == "value_error":  # a Refusal, or a field validator's ValueError
        loc += tuple(part for part in getattr(error["ctx"]["error"], "key", "").split(".") if part)
        text = str(error["ctx"]["error"])
    elif kind in ("too_short", "too_long", "tuple_type"):
        text = f"expected a list of {len(get_args(field.annotation))} values, got {value!r}"
    elif kind == "extra_forbidden":
        known = (parent.annotation if (parent := _field_at(model, loc[:-1])) else model).model_fields
        text = f"unknown key (known: {', '.join(sorted(known))})"
    elif kind == "literal_error":  # pydantic's "'a', 'b' or 'c'", without the quotes
        choices = error["ctx"]["expected"].replace("'", "")
        text = f"must be {choices}{note}, got {value!r}"
        if "noun" in says:
            text = f"unknown {says['noun']} {value!r} (choose from {choices.replace(' or ', ', ')})"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = {k: getattr(m, k) for m in field.metadata for k in BOUNDS if hasattr(m, k)} or error["ctx"]
        low, high = bounds.get("gt", bounds.get("ge")), bounds.get("lt", bounds.get("le"))
        span = " ".join(f"{BOUNDS[k]} {v}" for k, v in bounds.items())
        if low is not None and high is not None:
            span = f"in {'(' if 'gt' in bounds else '['}{low}, {high}{')' if 'lt' in bounds else ']'}"
        text = f"must be {span}{note}, got {value!r}"
    else:
        text = f"expected {EXPECTED.get(kind, error['msg'])}, got {value!r}"
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    return f"{key or 'config'}: {text}"


def _field_at(model: type[BaseModel], loc: tuple) -> FieldInfo | None:
    """The field an error's location points at (an item of a tuple or list included)."""
    field, hint = None, model
    for part in loc:
        if type(None) in get_args(hint):  # X | None: X
            hint = next(arg for arg in get_args(hint) if arg is not type(None))
        if isinstance(part, str) and isinstance(hint, type) and issubclass(hint, BaseModel):
            field = hint.model_fields.get(part)
        elif isinstance(part, int) and get_args(hint):  # tuple[A, B] or list[A]
            field = FieldInfo.from_annotation(get_args(hint)[min(part, len(get_args(hint)) - 1)])
        else:
            return None
        hint = field.annotation if field is not None else None
    return field

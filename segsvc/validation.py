"""Readable messages from pydantic validation errors, each naming its dotted key.

Recipes and dataset specs are checked by pydantic models; a user should read
``train.epochs: expected an integer, got 'three'`` or ``train.epocs: unknown key
(did you mean 'epochs'?)``, not pydantic's own wording. ``explain`` turns a
``ValidationError`` into such lines, walking the model's annotations to name
keys (union member tags in pydantic's locations are skipped) and to list the
valid keys or values.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

_TYPE_PHRASES = {
    "int_type": "expected an integer", "int_parsing": "expected an integer", "int_from_float": "expected an integer",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "string_type": "expected a string", "list_type": "expected a list", "tuple_type": "expected a list",
    "dict_type": "expected a mapping", "mapping_type": "expected a mapping", "model_type": "expected a mapping",
    "dataclass_type": "expected a mapping", "dataclass_exact_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}  # fmt: skip
_UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")
_MAPPINGS = (dict, collections.abc.Mapping)


def one_of(tp: Any, description: str) -> Any:
    """``tp`` (a union) reported as one error, ``expected <description>``, instead of one per member."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise _custom("one_of", f"expected {description}, got {value!r}") from None

    return Annotated[tp, WrapValidator(check)]


def fixed_length(tp: Any, length: int, noun: str) -> Any:
    """A list of exactly ``length`` items, reported as ``expected 2 integers, got [64]``."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != length:
            raise _custom("fixed_length", f"expected {length} {noun}, got {value!r}")
        return handler(value)

    return Annotated[tp, WrapValidator(check)]


def _custom(kind: str, message: str) -> PydanticCustomError:
    # the message travels as context so braces in the user's value are never read as a template
    return PydanticCustomError(kind, "{message}", {"message": message})


def explain(exc: ValidationError, root: Any) -> list[str]:
    """One ``key: problem`` line per distinct error of validating data against ``root``."""
    lines: list[str] = []
    for error in exc.errors():
        key, annotation = _locate(root, error["loc"])
        line = f"{key or '(top level)'}: {_problem(error, root, annotation)}"
        if line not in lines:
            lines.append(line)
    return lines


def _problem(error: Any, root: Any, annotation: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "missing required key"
    if kind in _UNKNOWN_KEY:
        name = str(error["loc"][-1])
        _, parent = _locate(root, error["loc"][:-1])
        valid = _keys_of(parent)
        hint = difflib.get_close_matches(name, valid, n=1)
        text = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        return text + (f"; valid keys here: {', '.join(valid)}" if valid else "")
    if kind == "literal_error" and typing.get_origin(annotation) is Literal:
        return f"expected one of {list(typing.get_args(annotation))}, got {error['input']!r}"
    if kind in _TYPE_PHRASES:
        return f"{_TYPE_PHRASES[kind]}, got {error['input']!r}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _locate(root: Any, loc: tuple[Any, ...]) -> tuple[str, Any]:
    """The dotted key of pydantic location ``loc`` and the annotation found there (None when unknown)."""
    key, tp = "", root
    for part in loc:
        tp = _unwrap(tp)
        if _is_union(tp) and isinstance(part, str):
            tp = None  # a member tag such as "tuple[float, ...]": not part of the key
            continue
        if isinstance(part, int):
            key += f"[{part}]"
            tp = _item_type(tp, part)
        elif part == "[key]":
            key += " (key)"
        else:
            key = f"{key}.{part}" if key else str(part)
            tp = _child_type(tp, part)
    return key, _unwrap(tp)


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` down to ``X``."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        elif _is_union(tp) and type(None) in typing.get_args(tp):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(rest) != 1:
                return Union[tuple(rest)]
            tp = rest[0]
        else:
            return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _child_type(tp: Any, name: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return typing.get_type_hints(tp, include_extras=True).get(name)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(name)
        return None if field is None else _annotated(field.annotation, field.metadata)
    if typing.get_origin(tp) in _MAPPINGS:
        return typing.get_args(tp)[1] if typing.get_args(tp) else None
    return None


def _item_type(tp: Any, index: int) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and args:
        return args[0] if len(args) == 2 and args[1] is Ellipsis else (args[index] if index < len(args) else None)
    if origin is list and args:
        return args[0]
    if origin in _MAPPINGS and args:
        return args[1]
    return None


def _keys_of(tp: Any) -> list[str]:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return [f.name for f in dataclasses.fields(tp)]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _annotated(annotation: Any, metadata: list[Any]) -> Any:
    return Annotated[(annotation, *metadata)] if metadata else annotation

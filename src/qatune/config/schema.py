"""Reading the schema itself: the field at a key, its type in words, the valid keys beside it."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from qatune.config.root import QatuneConfig


def field_at(loc: tuple) -> Any:
    """The pydantic FieldInfo at a location, or None (list indices and dict keys are stepped over)."""
    model: Any = QatuneConfig
    info = None
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = inner_model(info.annotation)
    return info


def inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        inner = inner_model(arg)
        if inner is not None:
            return inner
    return None


def valid_keys(loc: tuple) -> list[str]:
    if not [p for p in loc if not isinstance(p, int)]:
        return list(QatuneConfig.model_fields)
    info = field_at(loc)
    model = inner_model(info.annotation) if info else None
    return list(model.model_fields) if model else []




def type_name(annotation: Any) -> str:
    """A short readable type name: `integer`, `one of 'a', 'b'`, `list of string`..."""
    origin = get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(annotation))
    if origin in (list, tuple):
        return f"list of {type_name(get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    names = {int: "integer", float: "number", str: "string", bool: "true/false"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


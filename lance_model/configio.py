"""Typed config objects from plain mappings: the one conversion every config family goes through.

Configs are dataclasses. `from_dict` builds one from a plain mapping, recursing into nested
dataclass fields, turning lists into tuples where the field is a tuple, and failing on unknown
keys with a message that names the dotted path, the value and the known fields. Every config
class validates itself (`validate()`), naming the field, value and expectation.

It lives here, at the bottom, because the model's own config (`config.json` of a checkpoint) needs
it; YAML files and command-line overrides are read by `lance_platform.config`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what was expected."""


def _dataclass_type(hint: Any) -> type | None:
    """The dataclass inside a hint like `X`, `X | None`, `Optional[X]`; else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def _is_tuple(hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(hint))
    return hint is tuple or typing.get_origin(hint) is tuple


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping (nested dataclasses included)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}={data!r}: expected a mapping of "
                          f"{cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        shown = ", ".join(f"{prefix}{k}={data[k]!r}" for k in unknown)
        raise ConfigError(f"{shown}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints.get(key)
        sub = _dataclass_type(hint)
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, f"{prefix}{key}.")
        elif isinstance(value, list) and _is_tuple(hint):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)

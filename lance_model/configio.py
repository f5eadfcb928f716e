"""Typed config objects from plain mappings: the one conversion every config family goes through.

Configs are stdlib dataclasses declared with `@configclass`, which adds the pydantic settings
(`CONFIG`: unknown keys rejected, numbers accepted where a string is expected) so that `from_dict`
can validate a plain mapping through `pydantic.TypeAdapter`: every field is type-checked and
coerced (`"1e-4"` -> float for a float field, lists -> tuples, nested mappings -> nested configs,
`Literal` choices, `X | None`), and ranges declared with pydantic constraints (the aliases below,
e.g. `PositiveInt`) are checked. Integers are strict: `True`, `"64"` or `2.0` are not integers.

A failure is ONE `ConfigError` line naming the dotted field (with the caller's prefix, e.g.
`pt.optim.lr`), the value and what was expected. Rules that relate several fields stay in each
config's `validate()`, written with `require`.

It lives here, at the bottom, because the model's own config (`config.json` of a checkpoint) needs
it; YAML files and command-line overrides are read by `lance_platform.config`.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Annotated, Any, Literal, TypeVar

import annotated_types
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

T = TypeVar("T")

CONFIG = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

# Field types with their ranges (pydantic constraints); integers never come from bools or strings.
Int = Annotated[int, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, description="a fraction in [0, 1]")]
Probability = Annotated[float, Field(ge=0, lt=1, description="a probability in [0, 1)")]
NonEmptyStr = Annotated[str, Field(min_length=1)]


_LEADING_FIELD = re.compile(r"[A-Za-z_][\w.*\[\]]*(?=[=:])")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and what was expected.

    `field` is the dotted field name when the error is about one field (then the message starts with
    it), so a caller that loads the config under a prefix can name it in full (`prefixed`)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def prefixed(self, prefix: str) -> ConfigError:
        """The same error with `prefix` (e.g. `pt.`) in front of the field name."""
        message = str(self)
        if not prefix:
            return self
        field = self.field
        if field is None:  # a message that starts with a field name: `reward.weights.x: ...`
            match = _LEADING_FIELD.match(message)
            field = match.group(0) if match else None
        if field is not None and message.startswith(field):
            return ConfigError(prefix + message, prefix + field)
        return ConfigError(f"{prefix.rstrip('.')}: {message}", None)


def require(cond: bool, field: str, value: Any, expected: str) -> None:
    """A cross-field rule of a config's `validate()`: raise `ConfigError` naming field, value, expectation."""
    if not cond:
        raise ConfigError(f"{field}={value!r}: expected {expected}", field)


def shard_size_fits(shard_size: int, workers: int) -> bool:
    """An FSDP shard-group size for `workers` ranks: 0 (all of them) or a divisor of `workers` up to it."""
    return shard_size == 0 or (0 < shard_size <= workers and workers % shard_size == 0)


def configclass(cls: type[T] | None = None, **kwargs: Any) -> Any:
    """`@dataclass` plus the pydantic settings `from_dict` validates with (`CONFIG`)."""

    def wrap(c: type[T]) -> type[T]:
        c.__pydantic_config__ = CONFIG  # type: ignore[attr-defined]
        return dataclasses.dataclass(**kwargs)(c)

    return wrap if cls is None else wrap(cls)


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    if not (dataclasses.is_dataclass(cls) and getattr(cls, "__pydantic_config__", None)):
        raise TypeError(f"{cls.__name__} is not a config class (declare it with @configclass)")
    return TypeAdapter(cls)


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build config dataclass `cls` from a mapping (nested configs included), type-checked and coerced.

    `prefix` (e.g. `"pt."`) goes in front of every field name in the error."""
    if isinstance(data, cls):
        return data
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise validation_error(cls, exc, prefix, data) from None


def check_types(cfg: Any, prefix: str = "") -> None:
    """Re-validate a config object built or changed in code (fields set by attribute) like `from_dict`."""
    from_dict(type(cfg), dataclasses.asdict(cfg), prefix)


# ---------------------------------------------------------------------------------- error text
_MISSING = object()


def validation_error(cls: type, exc: ValidationError, prefix: str = "", data: Any = _MISSING) -> ConfigError:
    """pydantic's errors -> one `ConfigError` line: `field=value: expected ...` per wrong field
    (`data`, the validated input, gives the value of a field reported as a whole)."""
    found = [(err, *_walk(cls, err["loc"])) for err in exc.errors(include_url=False)]
    paths = [tuple(f[1]) for f in found]
    lines: list[str] = []
    first_field: str | None = None
    for err, path, hint, owner in found:
        if any(len(p) > len(path) and p[:len(path)] == tuple(path) for p in paths):
            continue  # a follow-up of a more precise error inside this value

        field = prefix + ".".join(str(p) for p in path) if path else (prefix.rstrip(".") or cls.__name__)
        value = _lookup(data, path, err.get("input"))
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            known = sorted(f.name for f in dataclasses.fields(owner)) if owner is not None else []
            name = owner.__name__ if owner is not None else "config"
            line = f"{field}={value!r}: unknown {name} field; known: {known}"
        elif err["type"] in ("missing", "missing_argument") and len(path) == len(err["loc"]):
            line = f"{field}: required, expected {describe(hint)}"
        else:
            line = f"{field}={value!r}: expected {describe(hint) if hint is not None else _pydantic_text(err)}"
        if line not in lines:
            lines.append(line)
            first_field = first_field or field
    return ConfigError("; ".join(lines), first_field if len(lines) == 1 else None)


def _lookup(data: Any, path: list, default: Any) -> Any:
    """The value at `path` inside the input (mappings and lists), else `default`."""
    node = data
    for part in path:
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            node = node[part]
        elif dataclasses.is_dataclass(node) and isinstance(part, str) and hasattr(node, part):
            node = getattr(node, part)
        else:
            return default
    return default if node is _MISSING else node


def _pydantic_text(err: dict) -> str:
    msg = err.get("msg", "a valid value")
    return msg.removeprefix("Input should be ")


def _strip(hint: Any) -> tuple[Any, list[Any], bool]:
    """(bare type, constraint metadata, nullable) of a hint like `Annotated[X, ...] | None`; a
    `Field(description=...)` among the metadata is kept as a `str` (the words `describe` uses)."""
    meta: list[Any] = []
    nullable = False
    while True:
        origin = typing.get_origin(hint)
        if origin is Annotated:
            args = typing.get_args(hint)
            hint = args[0]
            for m in args[1:]:
                if isinstance(m, FieldInfo) and m.description:
                    meta.append(m.description)
                meta.extend(getattr(m, "metadata", None) or [m])
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(args) < len(typing.get_args(hint)):
                nullable = True
                if len(args) == 1:
                    hint = args[0]
                    continue
                hint = typing.Union[tuple(args)]
        return hint, meta, nullable


def _walk(cls: type, loc: tuple) -> tuple[list, Any, type | None]:
    """Follow an error location through the types: (field path, hint of the last field, the
    dataclass that owns it). A union member tag in the location ends the path at the union."""
    hint: Any = cls
    owner: type | None = None
    path: list = []
    for part in loc:
        bare, meta, _ = _strip(hint)
        if any(isinstance(m, str) for m in meta):  # a described field is reported as a whole
            return path, hint, owner
        origin = typing.get_origin(bare)
        if dataclasses.is_dataclass(bare) and isinstance(bare, type):
            owner = bare
            hints = typing.get_type_hints(bare, include_extras=True)
            path.append(part)
            hint = hints.get(part) if isinstance(part, str) else None
            if hint is None:  # an unknown key
                return path, None, owner
        elif origin is dict:
            if part == "[key]":
                return path, typing.get_args(bare)[0], owner
            path.append(part)
            hint = typing.get_args(bare)[1]
        elif origin in (tuple, list) and isinstance(part, int):
            path.append(part)
            args = typing.get_args(bare)
            hint = args[0] if len(args) == 2 and args[1] is Ellipsis or origin is list else (
                args[part] if part < len(args) else Any)
        else:  # a union member tag, or a location inside a free-form value
            return path, hint, owner
    return path, hint, owner


def _range(meta: list[Any], noun: str) -> str:
    lo = hi = None
    lo_open = hi_open = False
    for m in meta:
        if isinstance(m, annotated_types.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, annotated_types.Ge):
            lo = m.ge
        elif isinstance(m, annotated_types.Lt):
            hi, hi_open = m.lt, True
        elif isinstance(m, annotated_types.Le):
            hi = m.le
    if lo is not None and hi is not None:
        return f"{noun} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo == 0:
        return f"a {'positive' if lo_open else 'non-negative'} {noun.split(' ', 1)[1]}"
    if lo is not None:
        return f"{noun} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{noun} {'<' if hi_open else '<='} {hi}"
    return noun


def describe(hint: Any) -> str:
    """What a value of type `hint` looks like, in words (for error messages)."""
    bare, meta, nullable = _strip(hint)
    origin = typing.get_origin(bare)
    words = [m for m in meta if isinstance(m, str)]
    if words:
        text = words[0]
    elif bare is bool:
        text = "true or false"
    elif bare is int:
        text = _range(meta, "an integer")
    elif bare is float:
        text = _range(meta, "a number")
    elif bare is str:
        text = "a string"
    elif origin is Literal:
        text = f"one of {list(typing.get_args(bare))}"
    elif dataclasses.is_dataclass(bare) and isinstance(bare, type):
        text = f"a {bare.__name__} mapping"
    elif origin is dict:
        text = f"a mapping of names to {_plural(describe(typing.get_args(bare)[1]))}"
    elif origin in (tuple, list):
        args = typing.get_args(bare)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            least = [m.min_length for m in meta if isinstance(m, annotated_types.MinLen)]
            text = f"a {'non-empty ' if least and least[0] > 0 else ''}list of {_plural(describe(args[0]))}"
        elif args and len(set(args)) == 1:
            text = f"a list of {len(args)} {_plural(describe(args[0]))}"
        else:
            text = f"a list of {len(args)} items ({', '.join(describe(a) for a in args)})"
    elif origin in (typing.Union, types.UnionType):
        text = " or ".join(describe(a) for a in typing.get_args(bare))
    elif bare is Any or bare is None:
        text = "a value"
    else:
        text = f"a {getattr(bare, '__name__', bare)}"
    return f"{text}, or null" if nullable else text


def _plural(text: str) -> str:
    """'an integer' -> 'integers', 'a positive number' -> 'positive numbers' (word by word, simply)."""
    if text.startswith("one of "):
        return "values among " + text[len("one of "):]
    for article in ("an ", "a "):
        if text.startswith(article):
            text = text[len(article):]
            break
    head, sep, rest = text.partition(" in ")
    head = head if head.endswith("s") or " or " in head else head + "s"
    return head + sep + rest


__all__ = ["CONFIG", "ConfigError", "Fraction", "Int", "NonEmptyStr", "NonNegativeFloat", "NonNegativeInt", "PositiveFloat",
           "PositiveInt", "Probability", "check_types", "configclass", "describe", "from_dict", "require", "validation_error"]

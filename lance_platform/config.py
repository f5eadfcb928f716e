"""Config loading for every config family: YAML files and `key.sub=value` overrides -> typed objects.

    cfg = load_config(StageConfig, "configs/stages/pt.yaml", ["optim.lr=1e-4", "steps=10"])

Overrides are parsed as YAML scalars (`steps=10` is an int, `name=pt` a string, `betas=[0.9,0.95]`
a list) and merged into the file's mapping; `from_dict` (lance_model.configio, pydantic) turns the
mapping into the config dataclass, type-checking and coercing every field (`lr=1e-4`, which YAML
reads as a string, becomes 0.0001) and checking declared ranges; the config's own `validate()`
checks the cross-field rules. Every failure is ONE `ConfigError` line naming the field (under the
caller's `prefix`, e.g. `pt.` for the demo's `pt.steps=...`), the value and what was expected.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lance_model.configio import ConfigError, from_dict

__all__ = ["ConfigError", "apply_overrides", "flatten", "from_dict", "load_config", "load_yaml", "merge",
           "to_dict"]

T = TypeVar("T")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], prefix: str = "") -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested mapping (creating intermediate mappings); errors
    show each override as the user wrote it, under `prefix`."""
    out = _deep_copy(data)
    for item in overrides:
        shown = prefix + item
        if "=" not in item:
            raise ConfigError(f"override {shown!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {shown!r}: empty key component")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {shown!r}: {prefix}{'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None, validate: bool = True, prefix: str = "") -> T:
    """YAML file (optional) over `base` defaults, then overrides, then `validate()` if defined
    (unless `validate=False`, for callers that validate with arguments of their own). `prefix`
    (e.g. `"pt."`) goes in front of every field an error names."""
    data = _deep_copy(base or {})
    if path is not None:
        data = merge(data, load_yaml(path))
    data = apply_overrides(data, overrides or [], prefix)
    cfg = from_dict(cls, data, prefix)
    check = getattr(cfg, "validate", None)
    if validate and callable(check):
        try:
            check()
        except ConfigError as exc:
            raise exc.prefixed(prefix) from None
    return cfg


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b.c": value} (for MLflow params)."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix.rstrip(".")] = data
    return out

"""YAML configs with dotted overrides into nested dataclasses, typed and checked by pydantic."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from lance_model.configio import NonNegativeFloat, PositiveInt, Probability, configclass, from_dict, require
from lance_platform.config import ConfigError, apply_overrides, flatten, load_config


@configclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)


@configclass
class Stage:
    name: str = "pt"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    shards: str | None = None

    def validate(self):
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps!r}: expected a positive integer")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "stage.yaml"
    path.write_text("name: ct\noptim:\n  lr: 0.001\n")
    cfg = load_config(Stage, path, ["steps=5", "optim.betas=[0.8, 0.9]", "shards=/data/x"])
    assert cfg == Stage(name="ct", steps=5, optim=Optim(lr=0.001, betas=(0.8, 0.9)), shards="/data/x")
    assert flatten(cfg)["optim.betas"] == (0.8, 0.9)


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr=0\.1: unknown Optim field"):
        load_config(Stage, None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"steps=0: expected a positive integer"):
        load_config(Stage, None, ["steps=0"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(Stage, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Stage, bad)


# ------------------------------------------------------------------ the typed loader (pydantic)


@configclass
class Inner:
    size: PositiveInt = 4
    ratio: Probability = 0.5
    dims: tuple[int, ...] = (1, 2)


@configclass
class Outer:
    kind: Literal["a", "b"] = "a"
    lr: float = 1e-3
    flag: bool = False
    limit: PositiveInt | None = None
    inner: Inner = field(default_factory=Inner)
    items: tuple[Inner, ...] = ()
    weights: dict[str, NonNegativeFloat] = field(default_factory=dict)
    label: str = "x"

    def validate(self):
        require(self.limit is None or self.limit >= self.inner.size, "limit", self.limit,
                f"at least inner.size ({self.inner.size})")


def test_each_kind_of_value_is_coerced():
    cfg = load_config(Outer, None, ["lr=1e-4", "flag=yes", "limit=8", "inner.dims=[3, 4, 5]", "kind=b",
                                    "items=[{size: 2}, {ratio: 0.25}]", "weights={ocr: 1}", "label=42"])
    assert cfg.lr == 0.0001 and isinstance(cfg.lr, float)          # YAML reads 1e-4 as a string
    assert cfg.flag is True and cfg.limit == 8 and cfg.kind == "b"
    assert cfg.inner.dims == (3, 4, 5) and isinstance(cfg.inner.dims, tuple)
    assert cfg.items == (Inner(size=2), Inner(ratio=0.25)) and all(isinstance(i, Inner) for i in cfg.items)
    assert cfg.weights == {"ocr": 1.0} and isinstance(cfg.weights["ocr"], float)
    assert cfg.label == "42"
    assert load_config(Outer, None, ["limit=null"]).limit is None


@pytest.mark.parametrize("override, message", [
    ("lr=abc", "lr='abc': expected a number"),
    ("inner.size=lots", "inner.size='lots': expected a positive integer"),
    ("inner.size=0", "inner.size=0: expected a positive integer"),
    ("inner.size=true", "inner.size=True: expected a positive integer"),   # no bools for ints
    ("inner.size=2.5", "inner.size=2.5: expected a positive integer"),
    ("inner.ratio=1.0", "inner.ratio=1.0: expected a probability in [0, 1)"),
    ("kind=c", "kind='c': expected one of ['a', 'b']"),
    ("flag=maybe", "flag='maybe': expected true or false"),
    ("limit=x", "limit='x': expected a positive integer, or null"),
    ("inner=5", "inner=5: expected a Inner mapping"),
    ("items=[{size: 1}, {size: -1}]", "items.1.size=-1: expected a positive integer"),
    ("weights={ocr: -1}", "weights.ocr=-1: expected a non-negative number"),
    ("inner.sise=3", "inner.sise=3: unknown Inner field; known: ['dims', 'ratio', 'size']"),
    ("limit=2", "limit=2: expected at least inner.size (4)"),                # a cross-field rule
])
def test_a_bad_value_is_one_line_naming_field_value_and_expectation(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(Outer, None, [override])
    assert str(exc.value) == message
    with pytest.raises(ConfigError) as exc:  # under a caller's prefix (the demo's `pt.`)
        load_config(Outer, None, [override], prefix="pt.")
    assert str(exc.value) == "pt." + message and "\n" not in str(exc.value)


def test_several_bad_fields_are_named_on_one_line():
    with pytest.raises(ConfigError) as exc:
        from_dict(Outer, {"lr": "x", "inner": {"size": 0}})
    assert str(exc.value) == "lr='x': expected a number; inner.size=0: expected a positive integer"


def test_override_errors_show_the_prefixed_override():
    with pytest.raises(ConfigError, match=r"override 'pt.inner.size.x=1': pt.inner.size is not a section"):
        load_config(Outer, None, ["inner.size=1", "inner.size.x=1"], prefix="pt.")


def test_a_plain_dataclass_is_refused():
    @dataclass
    class Plain:
        x: int = 1

    with pytest.raises(TypeError, match="configclass"):
        from_dict(Plain, {"x": 1})

"""YAML configs with dotted overrides into nested dataclasses."""
from __future__ import annotations

from dataclasses import field

import pytest

from lance_model.configio import configclass
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

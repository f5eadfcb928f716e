"""lance_model: the Lance unified multimodal model (MoT backbone, encoders, packing, checkpoints).

Pure PyTorch: no Ray, no MLflow, nothing from the other packages of the platform. The configs
(`lance_model.config`, `lance_model.configio`) import without torch; `Lance` and `LanceLoss` are
imported from `lance_model.model` on first use.
"""
from __future__ import annotations

from typing import Any

from .config import ConfigError, LanceConfig, TextConfig, VaeConfig, VitConfig

__all__ = ["ConfigError", "Lance", "LanceConfig", "LanceLoss", "TextConfig", "VaeConfig", "VitConfig"]


def __getattr__(name: str) -> Any:
    if name in ("Lance", "LanceLoss"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

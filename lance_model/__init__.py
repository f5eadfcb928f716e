"""lance_model: the Lance unified multimodal model (MoT backbone, encoders, packing, checkpoints).

Pure PyTorch: no Ray, no MLflow, nothing from the other packages of the platform.
"""
from .config import ConfigError, LanceConfig, TextConfig, VaeConfig, VitConfig
from .model import Lance, LanceLoss

__all__ = ["ConfigError", "Lance", "LanceConfig", "LanceLoss", "TextConfig", "VaeConfig", "VitConfig"]

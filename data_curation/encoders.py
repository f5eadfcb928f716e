"""The model's own frozen encoders, built for curation from a model preset or a Lance checkpoint.

Curated latents are only useful to the model whose VAE and ViT produced them, so the encoders are
never configured separately: `model_config` reads the `LanceConfig` of a checkpoint directory (or a
named preset), `build_encoders` builds its VAE (`lance_model.encoders.build_vae`) and its ViT with
the checkpoint's `vit_model.*` weights (or a separate `vit.safetensors`, as in the official release).
A preset has no weights: its ViT is initialised from `ModelRef.seed` under a forked RNG, so every
actor of a pool (and every later refresh) builds the identical tower.

`encoder_description` is the JSON written into every shard and the manifest; a refresh refuses to
append to a dataset whose description differs (latents from two encoders must not mix).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from data_curation.config import BucketConfig, ModelRef
from lance_model.config import LanceConfig
from lance_model.encoders.vae import LatentAutoencoder, build_vae
from lance_platform.config import ConfigError

VIT_PREFIX = "vit_model."


def model_config(ref: ModelRef) -> LanceConfig:
    if ref.checkpoint:
        return LanceConfig.from_pretrained(ref.checkpoint)
    return LanceConfig.from_preset(ref.preset)


def _vit_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    from lance_model.checkpoint import read_tensors, resolve_weights_file

    state = read_tensors(resolve_weights_file(checkpoint, "auto"))
    vit = {k[len(VIT_PREFIX):]: v for k, v in state.items() if k.startswith(VIT_PREFIX)}
    if not vit and (checkpoint / "vit.safetensors").is_file():
        vit = read_tensors(checkpoint / "vit.safetensors")
    if not vit:
        raise FileNotFoundError(f"checkpoint {checkpoint} has no ViT weights ({VIT_PREFIX}* keys or vit.safetensors)")
    return vit


def build_vit_encoder(ref: ModelRef, cfg: LanceConfig) -> nn.Module:
    """The frozen ViT of the referenced model (eval mode, no grad)."""
    if cfg.vit is None:
        raise ConfigError(f"model {ref.checkpoint or ref.preset!r} has no ViT; set encode.vit=false")
    from lance_model.encoders.vit import build_vit  # transformers: only where the ViT is built

    vit_cfg = dataclasses.replace(cfg.vit, trainable=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ref.seed)
        vit = build_vit(vit_cfg)
    if ref.checkpoint:
        vit.load_state_dict(_vit_state(Path(ref.checkpoint)), strict=True)
    return vit.requires_grad_(False).eval()


def build_vae_encoder(cfg: LanceConfig) -> LatentAutoencoder:
    return build_vae(cfg.vae)


def encoder_description(ref: ModelRef, cfg: LanceConfig, buckets: BucketConfig, vae: bool, vit: bool) -> dict:
    """Everything that determines the encoded tensors (written to shards and the manifest)."""
    return {
        "model": {"checkpoint": str(Path(ref.checkpoint).resolve()) if ref.checkpoint else None,
                  "preset": None if ref.checkpoint else ref.preset,
                  "seed": None if ref.checkpoint else ref.seed},
        "vae": dataclasses.asdict(cfg.vae) if vae else None,
        "vit": dataclasses.asdict(cfg.vit) if vit and cfg.vit is not None else None,
        "tokenizer": cfg.tokenizer,
        "buckets": dataclasses.asdict(buckets),
    }

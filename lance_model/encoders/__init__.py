"""Frozen visual encoders of a Lance model: the Qwen2.5-VL vision tower (semantic ViT tokens for the
understanding expert) and the latent autoencoders (Wan2.2 VAE or a pixel space-to-depth stand-in)
whose latents the generation expert denoises.

The names below are imported from their submodule on first use: the ViT module imports
`transformers` (seconds), which a process that only needs the VAE (a curation VAE actor, an image
decode) should not pay for."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "lance_model.encoders.vae": (
        "PIXEL_LATENT_SCALE", "WAN22_LATENTS_MEAN", "WAN22_LATENTS_STD", "LatentAutoencoder", "PixelVae",
        "VaeWeightsError", "WanVae", "build_vae", "convert_official_state_dict", "load_vae",
        "official_to_diffusers_key",
    ),
    "lance_model.encoders.vit": (
        "CLIP_MEAN", "CLIP_STD", "build_vit", "encode_vit", "vit_grid", "vit_patches", "vit_token_count",
    ),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from lance_model.encoders.vae import (
        PIXEL_LATENT_SCALE,
        WAN22_LATENTS_MEAN,
        WAN22_LATENTS_STD,
        LatentAutoencoder,
        PixelVae,
        VaeWeightsError,
        WanVae,
        build_vae,
        convert_official_state_dict,
        load_vae,
        official_to_diffusers_key,
    )
    from lance_model.encoders.vit import (
        CLIP_MEAN,
        CLIP_STD,
        build_vit,
        encode_vit,
        vit_grid,
        vit_patches,
        vit_token_count,
    )


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""Frozen visual encoders of a Lance model: the Qwen2.5-VL vision tower (semantic ViT tokens for the
understanding expert) and the latent autoencoders (Wan2.2 VAE or a pixel space-to-depth stand-in)
whose latents the generation expert denoises."""
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

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "PIXEL_LATENT_SCALE", "WAN22_LATENTS_MEAN", "WAN22_LATENTS_STD",
    "LatentAutoencoder", "PixelVae", "VaeWeightsError", "WanVae", "build_vae", "build_vit",
    "convert_official_state_dict", "encode_vit", "load_vae", "official_to_diffusers_key",
    "vit_grid", "vit_patches", "vit_token_count",
]

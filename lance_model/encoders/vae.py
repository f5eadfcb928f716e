"""The latent autoencoders that turn pixels into the generation expert's latents and back.

`LatentAutoencoder` is the common, always-frozen interface: `encode(video [B,3,F,H,W] in [-1,1])`
-> normalised latents [B,C,F',H',W'] and `decode(latents)` -> pixels clamped to [-1,1]. Two kinds:

- `PixelVae`: parameter-free space-to-depth with stride s (3*s*s channels, temporal stride 1).
  Latents are the pixels times `PIXEL_LATENT_SCALE` = 2.0, which takes natural images (per-channel
  std about 0.45 in [-1,1]) to roughly unit variance; a power of two, so decode is bit-exact.
- `WanVae`: diffusers `AutoencoderKLWan` configured as the Wan2.2 (TI2V-5B) VAE: patchify 2, three
  spatial downsamples (x16), temporal x4 (first frame alone, then groups of 4), 48 latent channels.
  Encode keeps the posterior MEAN and normalises it per channel exactly as the official Wan2.2 code
  does: z = (mu - mean) * (1/std) with the constants below (from the official `wan/modules/vae2_2.py`,
  identical in diffusers' conversion script); decode inverts it: mu = z / (1/std) + mean.

Weights (`load_vae`): none -> random init (warning); a directory -> diffusers `from_pretrained`
(local only); a `.pth`/`.safetensors` file in the OFFICIAL Wan2.2 naming -> keys converted to the
diffusers naming by `official_to_diffusers_key` (a file already in diffusers naming is taken as is)
and loaded strictly, with unknown/missing keys and shape mismatches reported by name.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from lance_model.config import VaeConfig

logger = logging.getLogger(__name__)

PIXEL_LATENT_SCALE = 2.0


class VaeWeightsError(ValueError):
    """VAE weights do not fit the model: the message names the keys (and shapes) that are wrong."""

# Wan2.2 VAE per-channel latent statistics (48 + 48).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
WAN22_Z_DIM = 48
WAN22_PATCH_SIZE = 2


# ====================================================================== base class
class LatentAutoencoder(nn.Module):
    """Frozen pixel <-> latent codec. Subclasses implement `_encode` / `_decode`."""

    latent_channels: int
    spatial_stride: int
    temporal_stride: int

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LatentAutoencoder:
        """Always stays in eval mode (a parent's `.train()` must not change it)."""
        return super().train(False)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F', H', W') of the latents of F frames of H x W pixels."""
        self.check_pixel_size(num_frames, height, width)
        frames = 1 + (num_frames - 1) // self.temporal_stride
        return (self.latent_channels, frames, height // self.spatial_stride, width // self.spatial_stride)

    def check_pixel_size(self, num_frames: int, height: int, width: int) -> None:
        s, t = self.spatial_stride, self.temporal_stride
        if height % s or width % s:
            raise ValueError(f"VAE input size {height}x{width} (HxW) is not divisible by the "
                             f"spatial stride {s}")
        if num_frames < 1 or (num_frames - 1) % t:
            raise ValueError(f"VAE input has {num_frames} frames; expected 1 + k*{t} (k >= 0)")

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, C, F', H', W']."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"VAE input must be [B, 3, F, H, W]; got shape {tuple(video.shape)}")
        self.check_pixel_size(*video.shape[2:])
        return self._encode(video)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, C, F', H', W'] -> pixels [B, 3, F, H, W] clamped to [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"VAE latents must be [B, {self.latent_channels}, F, H, W]; "
                             f"got shape {tuple(latents.shape)}")
        return self._decode(latents).clamp(-1.0, 1.0)

    def _encode(self, video: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError


# ====================================================================== pixel "VAE"
class PixelVae(LatentAutoencoder):
    """Parameter-free space-to-depth: channel index = c*s*s + i*s + j for pixel (i, j) of a cell."""

    def __init__(self, spatial_stride: int) -> None:
        super().__init__()
        if spatial_stride < 1:
            raise ValueError(f"pixel VAE spatial_stride={spatial_stride}: expected a positive integer")
        self.spatial_stride = spatial_stride
        self.temporal_stride = 1
        self.latent_channels = 3 * spatial_stride * spatial_stride
        self._freeze()

    def _encode(self, video: Tensor) -> Tensor:
        b, c, f, h, w = video.shape
        s = self.spatial_stride
        x = video.reshape(b, c, f, h // s, s, w // s, s).permute(0, 1, 4, 6, 2, 3, 5)
        return x.reshape(b, c * s * s, f, h // s, w // s) * PIXEL_LATENT_SCALE

    def _decode(self, latents: Tensor) -> Tensor:
        b, _, f, h, w = latents.shape
        s = self.spatial_stride
        x = (latents / PIXEL_LATENT_SCALE).reshape(b, 3, s, s, f, h, w).permute(0, 1, 4, 5, 2, 6, 3)
        return x.reshape(b, 3, f, h * s, w * s)


# ====================================================================== Wan2.2 VAE
def _wan_temporal_downsample(num_levels: int, temporal_stride: int) -> list[bool]:
    """Wan2.2 downsamples time in the LAST log2(stride) levels: [False, True, True] for x4."""
    k = int(math.log2(temporal_stride))
    if 2 ** k != temporal_stride or k > num_levels:
        raise ValueError(f"vae.temporal_stride={temporal_stride}: expected a power of two <= 2^{num_levels}")
    return [False] * (num_levels - k) + [True] * k


def wan_diffusers_kwargs(cfg: VaeConfig) -> dict:
    """`AutoencoderKLWan` constructor arguments for a Wan2.2-style VAE sized by `cfg`."""
    if cfg.latent_channels != WAN22_Z_DIM:
        raise ValueError(f"vae.latent_channels={cfg.latent_channels}: the Wan2.2 VAE has {WAN22_Z_DIM}")
    levels = len(cfg.dim_mult) - 1
    spatial = WAN22_PATCH_SIZE * 2 ** levels
    if spatial != cfg.spatial_stride:
        raise ValueError(f"vae.spatial_stride={cfg.spatial_stride}: dim_mult={list(cfg.dim_mult)} with patch "
                         f"{WAN22_PATCH_SIZE} gives {spatial}")
    return {
        "base_dim": cfg.base_dim,
        "decoder_base_dim": getattr(cfg, "decoder_base_dim", None),
        "z_dim": WAN22_Z_DIM,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "temperal_downsample": _wan_temporal_downsample(levels, cfg.temporal_stride),
        "latents_mean": list(WAN22_LATENTS_MEAN),
        "latents_std": list(WAN22_LATENTS_STD),
        "is_residual": True,
        "in_channels": 3 * WAN22_PATCH_SIZE ** 2,
        "out_channels": 3 * WAN22_PATCH_SIZE ** 2,
        "patch_size": WAN22_PATCH_SIZE,
        "scale_factor_temporal": cfg.temporal_stride,
        "scale_factor_spatial": cfg.spatial_stride,
    }


class WanVae(LatentAutoencoder):
    """Wraps a diffusers `AutoencoderKLWan` (Wan2.2 layout) with the Wan2.2 latent normalisation."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        mcfg = model.config
        self.latent_channels = int(mcfg.z_dim)
        self.spatial_stride = int(mcfg.scale_factor_spatial)
        self.temporal_stride = int(mcfg.scale_factor_temporal)
        mean = torch.tensor(mcfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(mcfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        # Not persistent: the statistics are constants of the VAE, not trained state.
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_inv_std", inv_std, persistent=False)
        self._freeze()

    def posterior_mean(self, video: Tensor) -> Tensor:
        """The raw (un-normalised) posterior mean of the diffusers model."""
        dtype = next(self.model.parameters()).dtype
        return self.model.encode(video.to(dtype)).latent_dist.mean

    def _encode(self, video: Tensor) -> Tensor:
        mu = self.posterior_mean(video)
        return ((mu.float() - self.latents_mean.float()) * self.latents_inv_std.float()).to(mu.dtype)

    def _decode(self, latents: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        mu = latents.float() / self.latents_inv_std.float() + self.latents_mean.float()
        return self.model.decode(mu.to(dtype)).sample


# ====================================================================== official -> diffusers key names
_RESNET_PARTS = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_TOP_LEVEL = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_CODER_STEMS = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out"}
_SAMPLER_PREFIXES = ("resample.", "time_conv.")
_BLOCK_RE = re.compile(
    r"^(encoder|decoder)\.(downsamples|upsamples)\.(\d+)\.(downsamples|upsamples)\.(\d+)\.(.+)$")
_MIDDLE_RE = re.compile(r"^(encoder|decoder)\.middle\.([012])\.(.+)$")


def _resnet_part(rest: str) -> str | None:
    return _RESNET_PARTS.get(rest)


def _block_key(m: re.Match) -> str | None:
    coder, outer, i, inner, j, rest = m.groups()
    if (coder == "encoder") != (outer == "downsamples") or outer != inner:
        return None
    blocks = "down_blocks" if coder == "encoder" else "up_blocks"
    if rest.startswith(_SAMPLER_PREFIXES):
        sampler = "downsampler" if coder == "encoder" else "upsampler"
        return f"{coder}.{blocks}.{i}.{sampler}.{rest}"
    part = _resnet_part(rest)
    return None if part is None else f"{coder}.{blocks}.{i}.resnets.{j}.{part}"


def _middle_key(m: re.Match) -> str | None:
    coder, idx, rest = m.groups()
    if idx == "1":
        return f"{coder}.mid_block.attentions.0.{rest}"
    part = _resnet_part(rest)
    return None if part is None else f"{coder}.mid_block.resnets.{int(idx) // 2}.{part}"


def official_to_diffusers_key(key: str) -> str | None:
    """One official Wan2.2 VAE key -> the diffusers `AutoencoderKLWan` key (None if not recognised).

    Rules: top `conv1`/`conv2` -> `quant_conv`/`post_quant_conv`; `{encoder,decoder}.conv1` -> `conv_in`,
    `head.0` -> `norm_out`, `head.2` -> `conv_out`; `middle.0`/`middle.2` -> `mid_block.resnets.0/1`,
    `middle.1` -> `mid_block.attentions.0`; `encoder.downsamples.i.downsamples.j` ->
    `encoder.down_blocks.i.resnets.j` (or `.downsampler` for its resample/time_conv entry);
    `decoder.upsamples.i.upsamples.j` -> `decoder.up_blocks.i.resnets.j` (or `.upsampler`); inside a
    residual block `residual.0/3.gamma` -> `norm1/norm2.gamma`, `residual.2/6` -> `conv1/conv2`,
    `shortcut` -> `conv_shortcut`."""
    head, _, tail = key.partition(".")
    if head in _TOP_LEVEL and tail in ("weight", "bias"):
        return f"{_TOP_LEVEL[head]}.{tail}"
    if m := _BLOCK_RE.match(key):
        return _block_key(m)
    if m := _MIDDLE_RE.match(key):
        return _middle_key(m)
    if head in ("encoder", "decoder"):
        for stem, new in _CODER_STEMS.items():
            if tail.startswith(stem + "."):
                return f"{head}.{new}.{tail[len(stem) + 1:]}"
    return None


def convert_official_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an official Wan2.2 VAE state dict; unrecognised keys raise VaeWeightsError naming them."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        new = official_to_diffusers_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise VaeWeightsError(f"unrecognised keys in the official Wan2.2 VAE state dict: {sorted(unknown)}")
    return out


# ====================================================================== loading
def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        return torch.load(str(path), map_location="cpu", weights_only=True)
    raise ValueError(f"VAE weights file {path}: expected a .pth or .safetensors file, "
                     "or a diffusers directory")


def _load_strict(model: nn.Module, state_dict: dict[str, Tensor], source: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise VaeWeightsError(f"VAE weights {source} do not match the model: missing keys {missing}; "
                       f"unexpected keys {unexpected}")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise VaeWeightsError(f"VAE weights {source}: shape mismatch for {key}: checkpoint "
                             f"{tuple(tensor.shape)} vs model {tuple(own[key].shape)}")
    model.load_state_dict(state_dict, strict=True)


def _build_wan_model(cfg: VaeConfig) -> nn.Module:
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan(**wan_diffusers_kwargs(cfg))


def _load_wan_file(cfg: VaeConfig, path: Path) -> nn.Module:
    state_dict = _read_state_dict(path)
    if "quant_conv.weight" not in state_dict:  # official naming (the usual case)
        state_dict = convert_official_state_dict(state_dict)
    model = _build_wan_model(cfg)
    _load_strict(model, state_dict, path)
    return model


def _check_loaded_matches(model: nn.Module, cfg: VaeConfig, path: Path) -> None:
    mcfg = model.config
    got = (int(mcfg.z_dim), int(mcfg.scale_factor_spatial), int(mcfg.scale_factor_temporal))
    want = (cfg.latent_channels, cfg.spatial_stride, cfg.temporal_stride)
    if got != want:
        raise ValueError(f"VAE directory {path} has (latent_channels, spatial_stride, temporal_stride) = "
                         f"{got}; the config asks for {want}")


def load_vae(cfg: VaeConfig) -> WanVae:
    """The Wan2.2 VAE: random (weights None), a diffusers directory, or an official weights file."""
    if cfg.weights is None:
        logger.warning("vae.weights is None: the Wan2.2 VAE is randomly initialised (tests/debug only)")
        return WanVae(_build_wan_model(cfg))
    path = Path(cfg.weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"VAE weights not found: {path}")
    if path.is_dir():
        from diffusers import AutoencoderKLWan
        model = AutoencoderKLWan.from_pretrained(str(path), local_files_only=True)
        _check_loaded_matches(model, cfg, path)
        return WanVae(model)
    return WanVae(_load_wan_file(cfg, path))


def build_vae(cfg: VaeConfig) -> LatentAutoencoder:
    """Dispatch on `cfg.kind`: "pixel" -> `PixelVae`, "wan2.2" -> `load_vae(cfg)`."""
    if cfg.kind == "pixel":
        if cfg.latent_channels != 3 * cfg.spatial_stride ** 2 or cfg.temporal_stride != 1:
            want = 3 * cfg.spatial_stride ** 2
            raise ValueError(f"pixel VAE needs latent_channels = 3*stride^2 = {want} and temporal_stride 1; "
                             f"got {cfg.latent_channels}, {cfg.temporal_stride}")
        return PixelVae(cfg.spatial_stride)
    if cfg.kind == "wan2.2":
        return load_vae(cfg)
    raise ValueError(f"vae.kind={cfg.kind!r}: expected 'pixel' or 'wan2.2'")

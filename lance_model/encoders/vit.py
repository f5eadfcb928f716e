"""The semantic visual encoder: the Qwen2.5-VL vision tower (windowed ViT + 2x2 patch merger).

The tower itself is `transformers`' `Qwen2_5_VisionTransformerPretrainedModel`, built from our
`VitConfig` with the "sdpa" attention implementation, so its state-dict keys are the Qwen2.5-VL
vision-tower names (`patch_embed.proj.weight`, `blocks.N.*`, `merger.ln_q/mlp.0/mlp.2`) and a
Qwen2.5-VL `visual.*` / Lance `vit_model.*` checkpoint loads into it after stripping the prefix.

Pixel preparation (`vit_patches`) is ours and mirrors the HF Qwen2-VL image/video processors
without resizing: frames in [0, 1] are normalised with the OpenAI CLIP mean/std, the frame count
is padded to a multiple of the temporal patch (an image T=1 is duplicated to 2 frames, an odd
video repeats its last frame), and patches are flattened grouped by merge window:
(t, h/m, w/m, m, m) rows, each row laid out (channel, temporal, patch_h, patch_w). Sizes must
already be multiples of patch*merge (28); resizing/bucketing belongs to the data pipeline.

The tower's parameters follow `VitConfig.trainable`; `encode_vit` runs under no_grad when no
parameter requires grad.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from lance_model.config import VitConfig

# OpenAI CLIP normalisation (the Qwen2-VL image processor's image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ATTN_IMPLEMENTATION = "sdpa"


def vision_config(cfg: VitConfig) -> Qwen2_5_VLVisionConfig:
    """Our `VitConfig` -> the transformers vision config (rope theta stays at its default 10000)."""
    return Qwen2_5_VLVisionConfig(
        depth=cfg.depth,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size,
        spatial_merge_size=cfg.spatial_merge_size,
        window_size=cfg.window_size,
        fullatt_block_indexes=list(cfg.fullatt_block_indexes),
        out_hidden_size=cfg.out_hidden_size,
        in_channels=cfg.in_channels,
        hidden_act=cfg.hidden_act,
        attn_implementation=ATTN_IMPLEMENTATION,
    )


def build_vit(cfg: VitConfig) -> nn.Module:
    """A randomly initialised Qwen2.5-VL vision tower; trainable iff `cfg.trainable`."""
    hf_cfg = vision_config(cfg)
    model = Qwen2_5_VisionTransformerPretrainedModel(hf_cfg)
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    model.requires_grad_(cfg.trainable)
    if not cfg.trainable:
        model.eval()
    return model


def _check_size(height: int, width: int, cfg: VitConfig) -> None:
    stride = cfg.stride
    if height % stride or width % stride:
        raise ValueError(f"ViT input size {height}x{width} (HxW) is not divisible by patch*merge = {stride}")


def _padded_frames(num_frames: int, cfg: VitConfig) -> int:
    if num_frames < 1:
        raise ValueError(f"ViT input has {num_frames} frames; expected at least 1")
    tp = cfg.temporal_patch_size
    return math.ceil(num_frames / tp) * tp


def vit_grid(num_frames: int, height: int, width: int, cfg: VitConfig) -> tuple[int, int, int]:
    """The tower's grid (t, h, w) in patch units: (ceil(T/2), H/14, W/14) for the released ViT."""
    _check_size(height, width, cfg)
    grid_t = _padded_frames(num_frames, cfg) // cfg.temporal_patch_size
    return grid_t, height // cfg.patch_size, width // cfg.patch_size


def vit_token_count(num_frames: int, height: int, width: int, cfg: VitConfig) -> int:
    """Merged ViT tokens for T frames of H x W: ceil(T/2) * (H/28) * (W/28)."""
    grid_t, grid_h, grid_w = vit_grid(num_frames, height, width, cfg)
    return grid_t * grid_h * grid_w // cfg.spatial_merge_size ** 2


def _normalise(frames: Tensor) -> Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    return (frames - mean) / std


def _pad_time(frames: Tensor, cfg: VitConfig) -> Tensor:
    pad = _padded_frames(frames.shape[0], cfg) - frames.shape[0]
    if pad == 0:
        return frames
    return torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)


def vit_patches(frames: Tensor, cfg: VitConfig) -> tuple[Tensor, Tensor]:
    """Frames [T, C, H, W] in [0, 1] -> (patches [N, C*tp*p*p] float32, grid_thw LongTensor [3]).

    N = ceil(T/tp) * (H/p) * (W/p); rows are grouped by merge window in the tower's order."""
    if frames.dim() != 4 or frames.shape[1] != cfg.in_channels:
        raise ValueError(f"ViT frames must be [T, {cfg.in_channels}, H, W]; got shape {tuple(frames.shape)}")
    grid_t, grid_h, grid_w = vit_grid(frames.shape[0], frames.shape[2], frames.shape[3], cfg)
    x = _pad_time(_normalise(frames.float()), cfg)
    p, m, tp, c = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size, cfg.in_channels
    x = x.reshape(grid_t, tp, c, grid_h // m, m, p, grid_w // m, m, p)
    # -> (t, h/m, w/m, m_h, m_w, channel, temporal, patch_h, patch_w)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(grid_t * grid_h * grid_w, c * tp * p * p).contiguous()
    return patches, torch.tensor([grid_t, grid_h, grid_w], dtype=torch.long)


def _merged_output(out: object) -> Tensor:
    # transformers >= 5 returns BaseModelOutputWithPooling (merged tokens in pooler_output);
    # 4.x returned the merged tensor itself.
    return out if isinstance(out, Tensor) else out.pooler_output


def encode_vit(model: nn.Module, patches: Tensor, grid_thw: Tensor) -> Tensor:
    """Run the tower on one or several items -> merged tokens [N_merged, out_hidden_size].

    `patches` is the concatenation of the items' `vit_patches` rows; `grid_thw` is [3] or [n, 3]."""
    grid_thw = grid_thw.reshape(-1, 3).to(dtype=torch.long)
    expected = int(grid_thw.prod(dim=1).sum())
    if patches.dim() != 2 or patches.shape[0] != expected:
        raise ValueError(f"ViT patches have shape {tuple(patches.shape)}; grid_thw {grid_thw.tolist()} "
                         f"needs {expected} rows")
    param = next(model.parameters())
    patches = patches.to(device=param.device, dtype=param.dtype)
    trainable = any(p.requires_grad for p in model.parameters())
    with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
        out = model(patches, grid_thw=grid_thw.to(param.device))
    return _merged_output(out)

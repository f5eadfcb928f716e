"""The semantic visual encoder: the Qwen2.5-VL vision tower (windowed ViT + 2x2 patch merger).

The tower itself is `transformers`' `Qwen2_5_VisionTransformerPretrainedModel`, built from our
`VitConfig`, so its state-dict keys are the Qwen2.5-VL vision-tower names (`patch_embed.proj.weight`,
`blocks.N.*`, `merger.ln_q/mlp.0/mlp.2`) and a Qwen2.5-VL `visual.*` / Lance `vit_model.*`
checkpoint loads into it after stripping the prefix.

Attention: every layer is ONE attention call over its packed sequence. The window layers attend
within 112-pixel windows and the full layers within each frame (temporal patch pair), i.e. a
block-diagonal attention described by transformers' `cu_seqlens`. The stock "sdpa" path loops in
Python over the blocks (one SDPA call per window: ~1,400 per layer-stack for a 756^2 image); we
register `vit_varlen_attention` with transformers' `AttentionInterface` under VARLEN_ATTN (the name
contains "flash", so the tower hands it `cu_seqlens` instead of splitting), and it runs:
  * CUDA, fp16/bf16: PyTorch's bundled varlen FlashAttention (`torch_flash_varlen`) over the blocks;
  * otherwise (CPU, fp32): one SDPA call, either on the blocks padded to the longest one with a
    key-padding mask ([blocks, heads, longest, dim]) or on the whole sequence with a block-diagonal
    mask, whichever scores fewer query-key pairs.
The result equals the stock implementation (tests/lance_model/test_vit_attention.py);
`set_vit_attention(model, STOCK_ATTN)` switches a tower back (benchmarks compare the two).

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
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from lance_model.attention import torch_flash_varlen
from lance_model.config import VitConfig

# OpenAI CLIP normalisation (the Qwen2-VL image processor's image_mean / image_std).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

STOCK_ATTN = "sdpa"  # transformers' own path: one SDPA call per window / frame
# "flash" in the name is what makes the tower pass cu_seqlens to the attention function.
VARLEN_ATTN = "lance_flash_varlen"
ATTN_IMPLEMENTATION = VARLEN_ATTN
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _block_layout(cu_seqlens: Tensor, total: int) -> tuple[Tensor, Tensor, list[int]]:
    """Block index and position-in-block of every token, and the block lengths (host list)."""
    cu = cu_seqlens.to(dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths <= 0).any()):
        raise ValueError(f"ViT cu_seqlens must rise strictly from 0 to the sequence length {total}; "
                         f"got {cu_seqlens.tolist()}")
    block = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    pos = torch.arange(total, device=cu.device) - cu[:-1][block]
    return block, pos, lengths.tolist()


def block_diagonal_sdpa(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float | None = None) -> Tensor:
    """Attention of q/k/v [L, H, D] within the blocks cu_seqlens delimits, as ONE SDPA call -> [L, H, D].

    Equal blocks are a reshape ([blocks, H, len, D], no mask); unequal ones are padded to the
    longest (a key-padding mask; padded query rows are dropped) when that scores fewer pairs than
    the whole sequence under a block-diagonal mask, else the latter."""
    total, heads, _ = q.shape
    block, pos, lengths = _block_layout(cu_seqlens, total)
    n, longest = len(lengths), max(lengths)
    if n * longest == total:  # all blocks equal (windows of a window-aligned image, frames of a clip)
        def split(x: Tensor) -> Tensor:
            return x.reshape(n, longest, heads, x.shape[-1]).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
        return out.transpose(1, 2).reshape(total, heads, v.shape[-1])
    if n * longest * longest <= total * total:
        def pad(x: Tensor) -> Tensor:  # [L, H, D] -> [n, H, longest, D]
            padded = x.new_zeros(n, longest, heads, x.shape[-1])
            padded[block, pos] = x
            return padded.transpose(1, 2)

        keep = torch.arange(longest, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]
        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=keep[:, None, None, :], scale=scale)
        return out.transpose(1, 2)[block, pos]
    mask = block[:, None] == block[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def vit_varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                         attention_mask: Tensor | None = None, scaling: float | None = None,
                         dropout: float = 0.0, cu_seq_lens_q: Tensor | None = None,
                         cu_seq_lens_k: Tensor | None = None, max_length_q: int | None = None,
                         max_length_k: int | None = None, is_causal: bool = False,
                         **kwargs: object) -> tuple[Tensor, None]:
    """transformers attention-interface function for the vision tower: q/k/v [1, H, L, D] ->
    ([1, L, H, D], None), block-diagonal over `cu_seq_lens_q` (== `cu_seq_lens_k`), one kernel call."""
    if cu_seq_lens_q is None or attention_mask is not None or is_causal or dropout:
        raise ValueError("vit_varlen_attention serves the ViT's non-causal packed attention only "
                         "(cu_seqlens given, no attention_mask, no dropout)")
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k,
                                                                                             cu_seq_lens_q):
        raise ValueError("vit_varlen_attention needs the same blocks for queries and keys")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [L, H, D]
    if q.is_cuda and q.dtype in _FLASH_DTYPES and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        cu = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
        longest = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        out = torch_flash_varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest,
                                 causal=False, scale=scaling)
    else:
        out = block_diagonal_sdpa(q, k, v, cu_seq_lens_q, scale=scaling)
    return out.unsqueeze(0), None


AttentionInterface.register(VARLEN_ATTN, vit_varlen_attention)


def set_vit_attention(model: nn.Module, implementation: str) -> nn.Module:
    """Select the tower's attention: VARLEN_ATTN (one call per layer) or STOCK_ATTN (per window)."""
    if implementation not in (VARLEN_ATTN, STOCK_ATTN):
        raise ValueError(f"ViT attention {implementation!r}: expected {VARLEN_ATTN!r} or {STOCK_ATTN!r}")
    model.config._attn_implementation = implementation
    return model


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
        attn_implementation=STOCK_ATTN,  # validated by transformers; build_vit selects ours after
    )


def build_vit(cfg: VitConfig, attention: str = ATTN_IMPLEMENTATION) -> nn.Module:
    """A randomly initialised Qwen2.5-VL vision tower; trainable iff `cfg.trainable`; `attention`
    as in `set_vit_attention` (default: one varlen / block-diagonal call per layer)."""
    hf_cfg = vision_config(cfg)
    model = Qwen2_5_VisionTransformerPretrainedModel(hf_cfg)
    set_vit_attention(model, attention)
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

"""Multimodal rotary embedding (M-RoPE) over MaPE (t, h, w) positions.

The head dimension's D/2 rotary frequencies are divided into three contiguous sections
(`mrope_section`, [16, 24, 24] for the released model): the first section rotates by the temporal
coordinate, the second by the height coordinate and the third by the width coordinate. The usual
half-split layout (`rotate_half`) duplicates the D/2 angles over both halves of the head.
"""
from __future__ import annotations

import torch


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, mrope_section: tuple[int, int, int],
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: long [3, L] (t, h, w). Returns cos, sin of shape [L, head_dim] (fp32 math)."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, device=positions.device, dtype=torch.float32) * 2 / head_dim))
    axis = torch.repeat_interleave(torch.arange(3, device=positions.device),
                                   torch.tensor(mrope_section, device=positions.device))
    pos = positions.float()[axis]  # [half, L]: the coordinate each frequency rotates by
    angles = pos.transpose(0, 1) * inv_freq[None, :]  # [L, half]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [L, H, D]; cos/sin: [L, D]."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin

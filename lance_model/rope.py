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
    inv_freq, axis = _rope_tables(positions.device, head_dim, float(theta), tuple(mrope_section))
    pos = positions.float()[axis]  # [half, L]: the coordinate each frequency rotates by
    angles = pos.transpose(0, 1) * inv_freq[None, :]  # [L, half]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _rope_tables(device: torch.device, head_dim: int, theta: float, section: tuple[int, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse frequencies [half], axis of each frequency [half]) on `device`, made once: building
    them per forward copied host data to the GPU, a stream sync in every decode or denoising step."""
    key = (str(device), head_dim, theta, section)
    if key not in _TABLES:
        half = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float32) * 2 / head_dim))
        axis = torch.tensor([i for i, n in enumerate(section) for _ in range(n)], dtype=torch.long)
        if axis.numel() != half:
            raise ValueError(f"mrope_section {section} sums to {axis.numel()}, expected head_dim / 2 = {half}")
        _TABLES[key] = (inv_freq.to(device), axis.to(device))
    return _TABLES[key]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [L, H, D]; cos/sin: [L, D]."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin

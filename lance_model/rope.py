"""Multimodal rotary embedding (M-RoPE) over MaPE (t, h, w) positions.

The head dimension's D/2 rotary frequencies are divided among the three coordinates
(`mrope_section`: how many each, [16, 24, 24] for the released model). In the released (Qwen2.5-VL)
layout the sections are contiguous: the highest frequencies rotate by the temporal coordinate, the
middle ones by the height and the lowest by the width. At theta 1e6 the width's fastest frequency is
then ~2e-4 rad per token: attention can hardly tell an image's columns apart by position, and a
model trained from scratch (which has no pretrained ViT content to lean on) cannot learn the order of
the letters it reads or draws. The interleaved layout (`interleaved=True`, Qwen3-VL's) assigns the
frequencies to t, h, w in turn, each coordinate keeping its section's count, so every coordinate gets
fast and slow frequencies. The usual half-split layout (`rotate_half`) duplicates the D/2 angles over
both halves of the head.
"""
from __future__ import annotations

import torch


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, mrope_section: tuple[int, int, int],
                   dtype: torch.dtype = torch.float32, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: long [3, L] (t, h, w). Returns cos, sin of shape [L, head_dim] (fp32 math)."""
    inv_freq, axis = _rope_tables(positions.device, head_dim, float(theta), tuple(mrope_section), interleaved)
    pos = positions.float()[axis]  # [half, L]: the coordinate each frequency rotates by
    angles = pos.transpose(0, 1) * inv_freq[None, :]  # [L, half]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def frequency_axes(section: tuple[int, ...], interleaved: bool = False) -> list[int]:
    """The coordinate (0 t, 1 h, 2 w) each of the sum(section) frequencies rotates by, fastest first:
    contiguous sections, or interleaved (t, h, w, t, h, w, ...; a coordinate whose count is used up
    drops out of the cycle)."""
    if not interleaved:
        return [i for i, n in enumerate(section) for _ in range(n)]
    left, axes = list(section), []
    while any(left):
        for i in range(len(left)):
            if left[i]:
                axes.append(i)
                left[i] -= 1
    return axes


def _rope_tables(device: torch.device, head_dim: int, theta: float, section: tuple[int, ...],
                 interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(inverse frequencies [half], axis of each frequency [half]) on `device`, made once: building
    them per forward copied host data to the GPU, a stream sync in every decode or denoising step."""
    key = (str(device), head_dim, theta, section, interleaved)
    if key not in _TABLES:
        half = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float32) * 2 / head_dim))
        axis = torch.tensor(frequency_axes(section, interleaved), dtype=torch.long)
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

"""Heads outside the backbone: timestep embedding and the frozen 3D sin-cos latent position table."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT-style sinusoid of raw t in [0, 1]: cos half then sin half. t: [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden, bias=True), nn.SiLU(), nn.Linear(hidden, hidden, bias=True))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_frequencies(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[len(pos), dim]: sin half then cos half, frequencies 1/10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_3d_table(frames: int, size: int, hidden: int) -> torch.Tensor:
    """Rows indexed by t*size^2 + h*size + w; channels split t/h/w = d, d, hidden-2d (d = hidden//3, even)."""
    d = (hidden // 3) // 2 * 2
    dims = (d, d, hidden - 2 * d)
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(size), torch.arange(size), indexing="ij")
    parts = [sincos_1d(dim, axis.flatten()) for dim, axis in zip(dims, (t, h, w))]
    return torch.cat(parts, dim=1).float()


class PositionEmbedding3D(nn.Module):
    """Frozen table (`pos_embed`, shape [frames*size^2, hidden]); rebuilt at load, never trusted from disk."""

    def __init__(self, frames: int, size: int, hidden: int) -> None:
        super().__init__()
        self.frames, self.size, self.hidden = frames, size, hidden
        self.pos_embed = nn.Parameter(torch.empty(frames * size * size, hidden), requires_grad=False)
        self.reset_table()

    def reset_table(self) -> None:
        if self.pos_embed.is_meta:
            return
        with torch.no_grad():
            self.pos_embed.copy_(sincos_3d_table(self.frames, self.size, self.hidden))

    def forward(self, pos_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[pos_ids]

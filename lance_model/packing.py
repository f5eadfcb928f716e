"""Packer: several rendered samples -> one `PackedBatch` carrying every index the forward needs.

Storage order is expert-sorted: all understanding tokens (text + ViT, in rendered order), then all
generation tokens (VAE latents, in rendered order). The forward then runs each expert on one
contiguous slice; `MaskLayout.order` keeps the rendered order for causality.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .attention import NOISE, MaskLayout
from .config import LanceConfig
from .sequence import RenderedSample, Sample, SequenceBuilder


@dataclass
class PackedBatch:
    num_tokens: int
    num_und: int  # storage [0, num_und) = text + ViT tokens; [num_und, num_tokens) = VAE tokens
    layout: MaskLayout
    positions: torch.Tensor  # long [3, L] MaPE positions (storage order)
    text_ids: torch.Tensor  # long [Nt]
    text_index: torch.Tensor  # long [Nt] storage index of each text token
    vit_index: torch.Tensor  # long [Nv] storage index of each ViT token
    vit_tokens: torch.Tensor | None  # [Nv, H] precomputed ViT tokens, or None
    vit_patches: torch.Tensor | None  # [Np, 3*tp*p*p] patches to run the tower on, or None
    vit_grids: torch.Tensor  # long [n_vit_items, 3] ViT patch grids (for the tower)
    vae_latents: torch.Tensor  # [Ng, C] clean latent tokens (zeros where unknown, e.g. inference targets)
    vae_pos_ids: torch.Tensor  # long [Ng] row of the latent position table
    vae_item: torch.Tensor  # long [Ng] target-item index of each token, -1 for clean condition tokens
    vae_noisy: torch.Tensor  # bool [Ng] token is part of a noisy target (gets timestep t and MSE)
    num_items: int  # number of noisy target items
    ce_index: torch.Tensor  # long [Nc] storage index of positions that predict a label
    ce_labels: torch.Tensor  # long [Nc]
    sample_lens: list[int]
    tasks: list[str]

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedBatch:
        """A copy with `fn` applied to every tensor, the mask layout's included."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, MaskLayout):
                v = v.map(fn)
            elif isinstance(v, torch.Tensor):
                v = fn(v)
            out[f.name] = v
        return PackedBatch(**out)

    def pin_memory(self) -> PackedBatch:
        """A copy with every tensor in page-locked host memory (DataLoader's `pin_memory` calls this)."""
        return self.map_tensors(torch.Tensor.pin_memory)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PackedBatch:
        """On `device`; floating tensors also cast to `dtype` when given."""
        return self.map_tensors(lambda t: t.to(device, dtype=dtype) if dtype is not None and t.is_floating_point()
                                else t.to(device))


def pack_rendered(rendered: list[RenderedSample], config: LanceConfig) -> PackedBatch:
    """Concatenate rendered samples into one expert-sorted packed batch."""
    max_latent_size, max_latent_frames = config.max_latent_size, config.max_latent_frames
    channels = config.vae.latent_channels
    TEXT, VIT, VAE = 0, 1, 2
    kind_parts: list[torch.Tensor] = []  # per split: kind code of each rendered token
    text_ids: list[int] = []  # text tokens in rendered order
    ce_rendered: list[int] = []  # rendered positions that predict a label
    ce_labels: list[int] = []
    vit_tokens, vit_patches, vit_grids = [], [], []
    vae_lat, vae_pos, vae_item, vae_noisy = [], [], [], []
    sample_splits, positions = [], []
    n_items = 0
    offset = 0  # rendered index of the current split's first token
    for r in rendered:
        sample_splits.append([(s.mode, len(s)) for s in r.splits])
        positions.append(r.positions)
        sample_start = offset
        for s in r.splits:
            n_split = len(s)
            if s.kind == "text":
                kind_parts.append(torch.zeros(n_split, dtype=torch.long))
                text_ids += s.text_ids
                if s.ce:
                    if offset == sample_start:
                        raise ValueError("an answer split cannot open a sample")
                    # the token before each answer token predicts it
                    ce_rendered += range(offset - 1, offset + n_split - 1)
                    ce_labels += s.text_ids
                offset += n_split
                continue
            n = n_split - 2
            code = VIT if s.kind == "vit" else VAE
            kinds = torch.full((n_split,), code, dtype=torch.long)
            kinds[0] = kinds[-1] = TEXT  # <|vision_start|> / <|vision_end|> are text tokens
            kind_parts.append(kinds)
            text_ids += s.text_ids[:2]
            offset += n_split
            v = s.visual
            if s.kind == "vit":
                if v.vit_tokens is not None:
                    if v.vit_tokens.shape[0] != n:
                        raise ValueError(f"ViT tokens {tuple(v.vit_tokens.shape)} do not match grid {v.vit_grid} "
                                         f"({n} merged tokens)")
                    vit_tokens.append(v.vit_tokens)
                elif v.vit_patches is not None:
                    vit_patches.append(v.vit_patches)
                else:
                    raise ValueError("a ViT block needs vit_tokens or vit_patches")
                vit_grids.append(v.vit_grid)
            else:
                t, h, w = s.grid
                if t > max_latent_frames or h > max_latent_size or w > max_latent_size:
                    raise ValueError(f"latent grid {s.grid} exceeds the position table "
                                     f"(max_latent_frames={max_latent_frames}, max_latent_size={max_latent_size})")
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                vae_pos.append((tt * max_latent_size ** 2 + hh * max_latent_size + ww).flatten())
                if v.latent is not None:
                    if v.latent.shape[0] != channels:
                        raise ValueError(f"latent has {v.latent.shape[0]} channels; the model expects {channels}")
                    vae_lat.append(v.latent.flatten(1).transpose(0, 1).float())
                else:
                    vae_lat.append(torch.zeros(n, channels))
                noisy = s.mode == NOISE
                mask = torch.full((n,), noisy, dtype=torch.bool)
                if noisy and v.clean_frames:
                    mask[: v.clean_frames * h * w] = False
                vae_noisy.append(mask)
                vae_item.append(torch.full((n,), n_items if noisy else -1, dtype=torch.long))
                n_items += int(noisy)

    kinds_t = torch.cat(kind_parts)
    is_gen = kinds_t == VAE
    perm = torch.cat([torch.nonzero(~is_gen).flatten(), torch.nonzero(is_gen).flatten()])  # storage -> rendered
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))  # rendered -> storage
    rendered_pos = torch.cat(positions, dim=1)

    return PackedBatch(
        num_tokens=len(kinds_t),
        num_und=int((~is_gen).sum()),
        layout=MaskLayout.from_splits(sample_splits, perm),
        positions=rendered_pos[:, perm],
        text_ids=torch.tensor(text_ids, dtype=torch.long),
        text_index=inv[kinds_t == TEXT],
        vit_index=inv[kinds_t == VIT],
        vit_tokens=torch.cat(vit_tokens) if vit_tokens else None,
        vit_patches=torch.cat(vit_patches) if vit_patches else None,
        vit_grids=torch.tensor(vit_grids, dtype=torch.long).reshape(-1, 3),
        vae_latents=torch.cat(vae_lat) if vae_lat else torch.zeros(0, channels),
        vae_pos_ids=torch.cat(vae_pos) if vae_pos else torch.zeros(0, dtype=torch.long),
        vae_item=torch.cat(vae_item) if vae_item else torch.zeros(0, dtype=torch.long),
        vae_noisy=torch.cat(vae_noisy) if vae_noisy else torch.zeros(0, dtype=torch.bool),
        num_items=n_items,
        ce_index=inv[torch.tensor(ce_rendered, dtype=torch.long)],
        ce_labels=torch.tensor(ce_labels, dtype=torch.long),
        sample_lens=[len(r) for r in rendered],
        tasks=[r.task for r in rendered],
    )


def pack_samples(samples: list[Sample], builder: SequenceBuilder, config: LanceConfig, caption_dropout: float = 0.0, condition_dropout: float = 0.0,
                 rng: random.Random | None = None) -> PackedBatch:
    """Render + pack, applying CFG dropout with `rng` (training) when the probabilities are > 0."""
    rng = rng or random.Random(0)
    rendered = []
    for s in samples:
        generation = s.target is not None and s.task not in ("i2t", "v2t")
        drop_caption = generation and caption_dropout > 0 and rng.random() < caption_dropout
        drop_condition = generation and s.source is not None and condition_dropout > 0 and rng.random() < condition_dropout
        rendered.append(builder.render(s, drop_caption=drop_caption, drop_condition=drop_condition, rng=rng))
    return pack_rendered(rendered, config)

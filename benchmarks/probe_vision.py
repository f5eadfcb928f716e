"""Vision probe: how fast does the vision path alone learn glyphs, against a small CNN?

The third reading diagnostic beside `probe_reading.py` (the whole model answering in text) and
`probe_rendering.py` (t2i): here a classifier reads one letter straight off an image encoder, no
language model in between, on renders made anew every step. `--encoder vit`: the model's own
Qwen2.5-VL-style tower of `--preset` (trainable, random init), its merged tokens pooled (`--head
pool`) or flattened in grid order (`--head flat`, which knows each token's place); `--encoder cnn`:
three 3x3 conv + GELU + max-pool layers on the 64 x 64 pixels, flattened. Tasks: `single` (a lone
letter drawn large), `first` (the first letter of a word: finding the leftmost glyph). `--grey`
turns every render into contrast-stretched grey (one polarity per image still random), to tell the
cost of random colours apart.

    python benchmarks/probe_vision.py --encoder cnn --task first --layout cells
    python benchmarks/probe_vision.py --encoder vit --head flat --task first --layout cells --steps 1200
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.append(str(Path(__file__).resolve().parents[1]))

from data_curation.synthetic import render_styled_text, resolve_fonts, vocabulary_split
from lance_model.config import LanceConfig
from lance_model.encoders.vit import build_vit, encode_vit, vit_patches

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def render(a: argparse.Namespace, fonts: tuple[str, ...], word: str, seed: int) -> np.ndarray:
    drawn = word[0] if a.task == "single" else word
    image = render_styled_text(drawn, a.size, a.size, seed, fonts, tuple(a.backgrounds.split(",")), 0.8,
                               layout=a.layout, cells=a.cells)
    if a.grey:
        g = image.astype(np.float32).mean(axis=2, keepdims=True)
        g = (g - g.min()) / max(float(g.max() - g.min()), 1.0) * 255
        image = np.repeat(g, 3, axis=2).astype(np.uint8)
    return image


class VitReader(nn.Module):
    def __init__(self, config: LanceConfig, head: str, vit_size: int) -> None:
        super().__init__()
        self.config, self.head, self.vit_size = config, head, vit_size
        self.vit = build_vit(config.vit)
        tokens = (vit_size // config.vit.stride) ** 2
        width = config.vit.out_hidden_size
        self.out = nn.Linear(width * (tokens if head == "flat" else 1), len(LETTERS))

    def forward(self, images: list[np.ndarray]) -> torch.Tensor:
        patches, grids = [], []
        for im in images:
            frames = torch.from_numpy(im.copy()).permute(2, 0, 1)[None].float() / 255
            frames = F.interpolate(frames, size=(self.vit_size, self.vit_size), mode="bicubic", antialias=True,
                                   align_corners=False).clamp(0, 1)
            p, g = vit_patches(frames, self.config.vit)
            patches.append(p)
            grids.append(g)
        tokens = encode_vit(self.vit, torch.cat(patches), torch.stack(grids)).reshape(len(images), -1,
                                                                                    self.config.vit.out_hidden_size)
        return self.out(tokens.mean(1) if self.head == "pool" else tokens.flatten(1))


class CnnReader(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                                 nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                                 nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2), nn.Flatten(),
                                 nn.Linear(64 * (size // 8) ** 2, len(LETTERS)))

    def forward(self, images: list[np.ndarray]) -> torch.Tensor:
        x = torch.stack([torch.from_numpy(im.copy()).permute(2, 0, 1) for im in images]).float() / 255 - 0.5
        return self.net(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="vit", choices=("vit", "cnn"))
    p.add_argument("--head", default="pool", choices=("pool", "flat"), help="ViT tokens pooled or flattened")
    p.add_argument("--preset", default="tiny", help="the model preset whose ViT is probed")
    p.add_argument("--vit", default="{}", help="ViT overrides as JSON, e.g. '{\"hidden_size\": 64}'")
    p.add_argument("--task", default="single", choices=("single", "first"))
    p.add_argument("--layout", default="fitted", choices=("fitted", "cells"))
    p.add_argument("--cells", type=int, default=6)
    p.add_argument("--fonts", default="default")
    p.add_argument("--backgrounds", default="plain")
    p.add_argument("--grey", action="store_true", help="contrast-stretched grey renders")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--vit-size", type=int, default=168, help="ViT input size (a multiple of 28)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-n", type=int, default=96)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if a.encoder == "vit":
        config = LanceConfig.from_preset(a.preset, vit={**json.loads(a.vit), "trainable": True})
        model: nn.Module = VitReader(config, a.head, a.vit_size)
    else:
        model = CnnReader(a.size)
    fonts = resolve_fonts(a.fonts.split(","))
    train, heldout = vocabulary_split(2400, 200, 0)
    evals = [(render(a, fonts, w, 10_000_000 + i), LETTERS.index(w[0])) for i, w in enumerate(heldout[: a.eval_n])]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(1)
    start = time.time()
    for step in range(1, a.steps + 1):
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, step / 50)
        words = [rng.choice(train) for _ in range(a.bs)]
        images = [render(a, fonts, w, rng.getrandbits(31)) for w in words]
        loss = F.cross_entropy(model(images), torch.tensor([LETTERS.index(w[0]) for w in words]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % a.eval_every == 0:
            with torch.no_grad():
                guess = model([im for im, _ in evals]).argmax(1)
            acc = (guess == torch.tensor([y for _, y in evals])).float().mean().item()
            print(f"step {step} loss {loss.item():.3f} held-out accuracy {acc:.3f} ({time.time() - start:.0f}s)",
                  flush=True)


if __name__ == "__main__":
    main()

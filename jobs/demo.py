"""`lance-pipeline demo`: the platform's main job at toy scale, on embedded defaults, offline.

What runs today: a synthetic rendered-text corpus -> the model's own encoders (pixel VAE + ViT) ->
mixed t2i / i2t / image-edit packs -> training of a `tiny` (or `nano`) Lance -> a checkpoint in
the official key layout, re-loaded and checked. Stages of the full pipeline (Ray Data curation,
Ray Train PT/CT/SFT, GRPO) plug in here as they land.
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data_curation.synthetic import text_image_records
from lance_model import Lance, LanceConfig
from lance_model.encoders.vae import build_vae
from lance_model.encoders.vit import encode_vit, vit_patches
from lance_model.packing import pack_samples
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    steps: int
    first_loss: float
    final_loss: float
    checkpoint: Path
    seconds: float


def encode_records(model: Lance, records: list[dict]) -> list[Visual]:
    """Each image -> Visual with its VAE latent and ViT tokens (the frozen encoders of `model`)."""
    vae = build_vae(model.config.vae)
    out = []
    for rec in records:
        pixels = torch.from_numpy(rec["image"].copy()).permute(2, 0, 1).float() / 255.0  # [3, H, W] in [0, 1]
        latent = vae.encode((pixels * 2 - 1)[None, :, None])[0]  # [C, 1, h, w]
        patches, grid = vit_patches(pixels[None], model.config.vit)
        tokens = encode_vit(model.vit_model, patches, grid)
        out.append(Visual(latent=latent, vit_tokens=tokens, vit_grid=tuple(grid.tolist())))
    return out


def make_samples(records: list[dict], visuals: list[Visual], rng: random.Random) -> list[Sample]:
    samples = []
    for i, (rec, vis) in enumerate(zip(records, visuals)):
        samples.append(Sample("t2i", rec["caption"], target=vis))
        samples.append(Sample("i2t", "What does the sign say?", answer=rec["text"], source=vis))
        j = rng.randrange(len(records))
        if records[j]["text"] != rec["text"]:
            samples.append(Sample("image_edit", f'change the text to "{records[j]["text"]}"', source=vis,
                                  target=Visual(latent=visuals[j].latent)))
    return samples


def run_demo(workdir: str | Path = "runs/demo", preset: str = "tiny", steps: int = 60, images: int = 8,
             pack_size: int = 6, lr: float = 2e-3, seed: int = 0) -> DemoResult:
    for name, value in (("steps", steps), ("images", images), ("pack_size", pack_size)):
        if value < 1:
            raise ValueError(f"demo: --{name.replace('_', '-')}={value}: expected a positive integer")
    start = time.time()
    workdir = Path(workdir)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = LanceConfig.from_preset(preset, freeze_embeddings=False, freeze_lm_head=False)
    model = Lance(config)
    model.init_weights()
    stride = math.lcm(config.vit.stride, config.vae.spatial_stride)  # image sides fit both encoders
    records = text_image_records(images, 2 * stride, 3 * stride, seed=seed)
    samples = make_samples(records, encode_records(model, records), rng)
    builder = SequenceBuilder(load_tokenizer(config.tokenizer), config.vit.spatial_merge_size)
    log.info("demo: %d samples (t2i / i2t / image_edit) from %d rendered-text images", len(samples), images)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc=f"train {preset}", unit="step")
    for _ in bar:
        batch = pack_samples(rng.sample(samples, min(pack_size, len(samples))), builder, config,
                             config.caption_dropout, config.condition_dropout, rng)
        out = model(batch, generator=gen)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", ce=f"{out.ce.item():.3f}", mse=f"{out.mse.item():.3f}")

    ckpt = workdir / "checkpoints" / "final"
    model.save_pretrained(ckpt)
    reloaded = Lance.from_pretrained(ckpt)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        if not torch.equal(a, b):
            raise RuntimeError(f"checkpoint round trip changed {name}")
    window = max(1, min(10, steps // 4))
    return DemoResult(steps, sum(losses[:window]) / window, sum(losses[-window:]) / window, ckpt, time.time() - start)


def cmd_demo(args: argparse.Namespace) -> int:
    r = run_demo(workdir=args.workdir, preset=args.preset, steps=args.steps, images=args.images, seed=args.seed)
    print(f"\n{'stage':<8} {'steps':>6} {'first loss':>11} {'final loss':>11}  checkpoint")
    print(f"{'train':<8} {r.steps:>6} {r.first_loss:>11.4f} {r.final_loss:>11.4f}  {r.checkpoint}")
    print(f"done in {r.seconds:.1f} s; the checkpoint loads with Lance.from_pretrained('{r.checkpoint}')")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo at toy scale (CPU, offline)",
                       description="Synthetic corpus -> encoders -> training -> checkpoint, on embedded defaults.")
    p.add_argument("--workdir", default="runs/demo", help="where checkpoints and logs go (default: runs/demo)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "nano"], help="model preset (default: tiny)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    p.add_argument("--images", type=int, default=8, help="synthetic images to render (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_demo)

"""Rendering probe: can a model trained from scratch learn to write rendered text legibly (t2i)?

The t2i twin of `probe_reading.py`, a diagnostic for the text-rendering recipe outside the pipeline
so that one variable can change at a time: a fresh Lance of `--preset` is trained on t2i samples
of the training words rendered anew for every step (so no image repeats) with the recipe's styled
captions, under FSDP2 with bf16 compute on one GPU as the recipe's stages run (fp32 on CPU). Every
`--eval-every` steps it draws the held-out words (words training never sees) with the deterministic
ODE sampler and text CFG, and RapidOCR reads them: printed is the recipe's `t2i_ocr_accuracy` (1 -
capped edit distance per letter, rl.rewards' `ocr`), exact reads, legible reads (`rl.rewards.ocr_legible`:
as many letters as asked for, right or wrong: the model draws letters, whichever) and the samples per second.

Curriculum: `--grow N` draws (and captions) the word's first k letters, k growing from 1 to the
whole word over N steps, fitted to the image, as `probe_reading.py --grow` does for reading; the
evaluation then also scores the held-out words as drawn at that step's stage.

`--memorize N` trains on N fixed images instead (the first N training words, one style each, the same
pixels every time) and scores those: a check of the sampling path (ODE sampler, CFG, VAE decode, OCR)
apart from generalisation. With `--grow` the fixed images are the words as the curriculum draws them
(`--grow 1000000000`: their first letters), scored as drawn at that step's stage. `tiny` on CPU writes
4 memorised words exactly after 2,000 steps.

What can change: the layout of the text (`--layout fitted|cells`), the rotary layout
(`--override '{"text": {"mrope_interleaved": true}}'`), model size, batch, learning rate, fonts and
backgrounds. `--minutes` bounds the training time (evaluations not counted), so runs that share a
GPU can be compared at equal wall time; `--grid PATH` writes the last evaluation's first 16 images (with
`--grow`, of the words as the curriculum's stage draws them).

    python benchmarks/probe_rendering.py --device cuda --layout cells --minutes 8 --workers 3
    python benchmarks/probe_rendering.py --preset tiny --steps 4 --eval-every 2 --eval-n 4   # CPU smoke
    python benchmarks/probe_rendering.py --preset tiny --memorize 4 --fonts DejaVuSans-Bold --backgrounds plain \
        --bs 16 --lr 1e-3 --warmup 50 --steps 3000 --eval-every 1000 --cfg 4.5,1.0            # CPU, 11 min
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))

from data_curation.synthetic import (
    image_caption,
    render_styled_text,
    resolve_fonts,
    styled_caption,
    vocabulary_split,
)
from lance_model.config import LanceConfig
from lance_model.encoders.vae import build_vae
from lance_model.generation import SamplerOptions, sample_latents
from lance_model.model import Lance
from lance_model.packing import pack_samples
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer


class Renders:
    """t2i samples: a word drawn with a style from `seed`, its styled caption, its pixel-VAE latent."""

    def __init__(self, a: argparse.Namespace, config: LanceConfig) -> None:
        self.a, self.config = a, config
        self.fonts = resolve_fonts(a.fonts.split(","))
        self.backgrounds = tuple(a.backgrounds.split(","))
        self.vae = build_vae(config.vae)
        self.palette = tuple(a.palette.split(",")) if a.palette else None

    def image(self, word: str, seed: int) -> np.ndarray:
        a = self.a
        return render_styled_text(word, a.size, a.size, seed, self.fonts, self.backgrounds, a.min_scale,
                                  named_colours=True, layout=a.layout, cells=a.cells, palette=self.palette,
                                  jitter=a.jitter)

    def caption(self, word: str, seed: int) -> str:
        if self.a.caption == "plain":
            return image_caption(word)
        if self.a.caption == "bare":
            return f'"{word}"'
        return styled_caption(word, seed, self.fonts, self.backgrounds, self.a.min_scale,
                              text_last=self.a.caption == "styled_text_last", palette=self.palette)

    def sample(self, word: str, seed: int) -> Sample:
        pixels = torch.from_numpy(self.image(word, seed).copy()).permute(2, 0, 1).float() / 127.5 - 1
        latent = self.vae.encode(pixels[None, :, None])[0]
        return Sample("t2i", self.caption(word, seed), target=Visual(latent=latent))


class Batches(torch.utils.data.IterableDataset):
    """Endless packed batches of fresh renders of training words and phrases (one seed stream per
    worker), with the model's caption dropout (the unconditional branch of CFG)."""

    def __init__(self, renders: Renders, words: tuple[str, ...], builder: SequenceBuilder) -> None:
        self.renders, self.words, self.builder = renders, words, builder

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(1 + (info.id if info else 0) * 7777)
        if info is not None:
            torch.set_num_threads(1)
        a, cfg = self.renders.a, self.renders.config
        workers, batches = (info.num_workers if info else 1), 0
        while True:
            progress = batches * workers / a.grow if a.grow else 1.0  # about the training step's share of --grow
            batches += 1
            samples = []
            for _ in range(a.bs):
                if a.memorize:  # the same N images over and over
                    i = rng.randrange(a.memorize)
                    samples.append(self.renders.sample(grown(self.words[i], progress) if a.grow else self.words[i],
                                                       MEMORIZED_SEED + i))
                    continue
                word = rng.choice(self.words)
                if rng.random() < a.phrases:
                    word = f"{word} {rng.choice(self.words)}"
                samples.append(self.renders.sample(grown(word, progress), rng.getrandbits(31)))
            yield pack_samples(samples, self.builder, cfg, caption_dropout=cfg.caption_dropout, rng=rng)


MEMORIZED_SEED = 5_000_000  # --memorize: training word i is always drawn with style seed MEMORIZED_SEED + i


def grown(word: str, progress: float) -> str:
    """`--grow`: the word's first k letters, k growing linearly from 1 (progress 0) to all (progress 1)."""
    return word[: max(1, round(1 + min(max(progress, 0.0), 1.0) * (len(word) - 1)))]


def setup(device: torch.device) -> None:
    """A one-process group, so the model runs under FSDP2's mixed precision as a recipe stage does."""
    import torch.distributed as dist

    if device.type == "cuda" and not dist.is_initialized():
        with tempfile.NamedTemporaryFile(prefix="probe-rendering-", delete=False) as f:
            store = f.name
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--layout", default="fitted", choices=("fitted", "cells"))
    p.add_argument("--cells", type=int, default=6, help="letter cells across the image (--layout cells)")
    p.add_argument("--steps", type=int, default=10**9, help="at most this many steps")
    p.add_argument("--minutes", type=float, default=0.0, help="train this long (evaluations not counted); 0: --steps")
    p.add_argument("--bs", type=int, default=64, help="samples per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-n", type=int, default=64, help="held-out words evaluated")
    p.add_argument("--eval-steps", type=int, default=20, help="ODE sampler steps")
    p.add_argument("--cfg", default="4.5", help="text CFG scales, comma-separated")
    p.add_argument("--sample-shift", default="3.5",
                   help="the sampler's time shift (its steps' spacing; the recipe's evaluation uses 3.5), comma-separated")
    p.add_argument("--fonts", default="default,DejaVuSans-Bold,DejaVuSerif-Bold,DejaVuSansMono-Bold")
    p.add_argument("--backgrounds", default="plain,gradient,noise")
    p.add_argument("--grow", type=int, default=0,
                   help="curriculum: over this many steps the drawn text grows from the word's first letter to the "
                        "whole word (evaluation on whole words, and on the words as drawn at that step's stage)")
    p.add_argument("--memorize", type=int, default=0,
                   help="train on N fixed images (the first N training words, one style each) and evaluate on "
                        "those: can the model write what it has memorised? (a check of the sampling path)")
    p.add_argument("--caption", default="styled", choices=("styled", "styled_text_last", "plain", "bare"),
                   help="styled: the text then its style; styled_text_last: the style then the text, the text "
                        "at the caption's end; plain: the text alone (a sign that says \"BALO\"); bare: the "
                        "quoted text and nothing else (\"BALO\")")
    p.add_argument("--palette", default="",
                   help="draw the colours from these named colours only (e.g. black,white); default: all of them")
    p.add_argument("--min-scale", type=float, default=0.8)
    p.add_argument("--jitter", type=float, default=0.5,
                   help="--layout fitted: the text's offset, a share of the free space around the middle (0: centred)")
    p.add_argument("--phrases", type=float, default=0.0, help="share of two-word phrases (two lines)")
    p.add_argument("--size", type=int, default=64, help="image size (pixels, square)")
    p.add_argument("--override", default="{}", help="LanceConfig overrides as JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes rendering and packing")
    p.add_argument("--compile", action="store_true", help="compile the decoder layers")
    p.add_argument("--grid", default="", help="write the last evaluation's first 16 images here (PNG)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "2")))
    device = torch.device(a.device)
    setup(device)

    from lance_model.backbone import compile_layers
    from lance_platform import parallel
    from pipelines.train_loop import unsharded_copy
    from rl.ocr import build_ocr_engine
    from rl.rewards import OcrReward, ocr_legible

    overrides = {"freeze_embeddings": False, "freeze_lm_head": False, "timestep_shift": 2.0}
    for key, value in json.loads(a.override).items():
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
    config = LanceConfig.from_preset(a.preset, **overrides)
    torch.manual_seed(a.seed)
    model = Lance(config)
    model.init_weights()
    if model.vit_model is not None:  # t2i never runs the tower
        model.vit_model.requires_grad_(False)
    if a.compile:
        compile_layers(model)
    model.to(device)
    if device.type == "cuda":
        parallel.apply_fsdp(model, device, bf16=True)
    model.train()
    builder = SequenceBuilder(ByteTokenizer())
    train, heldout = vocabulary_split(2400, 200, 0)
    renders = Renders(a, config)
    if a.memorize:
        words = train[: a.memorize]
    else:
        words = heldout[: a.eval_n]
    seed0 = MEMORIZED_SEED if a.memorize else 10_000_000  # the evaluated images' style seeds
    prompts = [renders.caption(w, seed0 + i) for i, w in enumerate(words)]
    scales = [float(s) for s in a.cfg.split(",")]
    shifts = [float(s) for s in a.sample_shift.split(",")]
    reward = OcrReward(build_ocr_engine())
    vae = build_vae(config.vae).to(device)

    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    loader = iter(torch.utils.data.DataLoader(Batches(renders, train, builder), batch_size=None,
                                              num_workers=a.workers, pin_memory=device.type == "cuda"))
    print(f"probe_rendering: {a.preset} layout={a.layout} overrides={json.dumps(overrides)} bs={a.bs} lr={a.lr} "
          f"params={sum(q.numel() for q in params) / 1e6:.1f}M", flush=True)

    def evaluate(step: int, trained_s: float, samples: int) -> None:
        t0 = time.time()
        copy = unsharded_copy(model, config, device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        staged = bool(a.grow) and step < a.grow
        line = score(copy, words, prompts, grid=not staged)
        if staged:  # the held-out words as the curriculum draws them at this step
            now = [grown(w, step / a.grow) for w in words]
            line += f" || at this step's stage ({step / a.grow:.2f}): " + score(
                copy, now, [renders.caption(w, seed0 + i) for i, w in enumerate(now)], grid=True)
        del copy
        print(f"EVAL step {step} trained {trained_s:.0f}s samples {samples} | " + line
              + f" ({time.time() - t0:.0f}s)", flush=True)

    def score(copy: Lance, targets: list[str], prompts: list[str], grid: bool) -> str:
        shape = (1, a.size // config.vae.spatial_stride, a.size // config.vae.spatial_stride)
        requests = [Sample("t2i", q, target=Visual(latent_shape=shape)) for q in prompts]
        parts = []
        for scale, shift in [(c, f) for f in shifts for c in scales]:
            options = SamplerOptions(num_steps=a.eval_steps, text_scale=scale, noise_level=None, shift=shift)
            latents = torch.cat([sample_latents(copy, builder, requests[i:i + 64], list(range(i, i + 64))[:len(requests[i:i + 64])],
                                                options).latents for i in range(0, len(requests), 64)])
            pixels = ((vae.decode(latents.float()) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            images = [im[:, 0].permute(1, 2, 0).cpu().numpy() for im in pixels]
            scored = reward(images, prompts)
            acc = float(np.mean(scored.components["ocr"]))
            exact = float(np.mean(scored.components["ocr_exact"]))
            where = f"cfg {scale}" + (f" shift {shift}" if len(shifts) > 1 else "")
            # against `exact`, legible reads tell drawing letters apart from drawing the right ones
            legible = float(np.mean([ocr_legible(t, w) for t, w in zip(scored.texts, targets)]))
            parts.append(f"{where}: ocr {acc:.3f} exact {exact:.3f} legible {legible:.3f} e.g. {scored.texts[:4]}")
            if grid and a.grid and scale == scales[0] and shift == shifts[0]:
                from PIL import Image

                Image.fromarray(np.concatenate(images[:16], axis=1)).save(a.grid)
        return " | ".join(parts) + f" | vs {list(targets[:4])}"

    trained, samples, start, losses = 0.0, 0, time.time(), []
    step = 0
    while step < a.steps and (a.minutes <= 0 or trained < a.minutes * 60):
        step += 1
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, step / a.warmup)
        batch = next(loader).to(device)
        out = model(batch, text_vocab=len(builder.tok))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        samples += a.bs
        if step % 25 == 0:
            losses.append(float(out.mse))
            trained += time.time() - t0
            print(f"step {step} mse {np.mean(losses[-4:]):.4f} {samples / max(trained, 1e-9):.0f} samples/s "
                  f"({trained:.0f}s)", flush=True)
        else:
            trained += time.time() - t0
        if step % a.eval_every == 0:
            evaluate(step, trained, samples)
    if step % a.eval_every:
        evaluate(step, trained, samples)
    print(f"done: {step} steps, {samples} samples, {trained:.0f}s training, {time.time() - start:.0f}s in all", flush=True)


if __name__ == "__main__":
    main()

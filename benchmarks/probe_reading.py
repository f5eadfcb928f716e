"""Reading probe: can a model trained from scratch learn to read rendered text (i2t)?

A diagnostic for the text-rendering recipe, outside the pipeline so that one variable can change
at a time: a fresh Lance of `--preset` (embeddings, head and ViT trainable) is trained on i2t
samples rendered anew for every step (so no image repeats), then answers held-out renders by
greedy decoding every `--eval-every` steps. Printed per evaluation: character accuracy
(the recipe's `char_accuracy`: 1 - edit distance per letter), exact match, first-letter accuracy and the number of distinct
answers (1 means the answers do not depend on the image).

Tasks (`--task`): `word` (read the word), `first` (its first letter: finding the leftmost glyph),
`single` (a lone letter, drawn large), `prefix2` / `prefix3` (only the word's first 2 / 3 letters
are drawn, larger than a whole word's), `colour` (name the text colour: a global feature).

Curricula: `--grow N` (task `word`) draws the first k letters of the word, k growing from 1 to the
whole word over N steps, fitted to the image (so the glyphs start large and shrink as letters are
added); `--shrink N` fits the text into a box that shrinks from the whole image to `--final-box` of
it; `--letters N` is the recipe's curriculum (1-3 random letters drawn large in place of the word, at
a rate falling from 1 to 0 over N steps). Evaluations then score the held-out words both as finally
drawn and as drawn at that step.

    python benchmarks/probe_reading.py --preset tiny --task first --steps 600
    python benchmarks/probe_reading.py --preset tiny --task word --override '{"text": {"mrope_interleaved": true}}'
    python benchmarks/probe_reading.py --preset tiny --task word --layout cells   # letter i in cell i
    python benchmarks/probe_reading.py --preset small --device cuda --bf16 --workers 6 --bs 64 --lr 5e-4
    python benchmarks/probe_reading.py --preset nano --device cuda --bf16 --workers 2 --bs 64 --lr 5e-4 --task word --grow 3000
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

sys.path.append(str(Path(__file__).resolve().parents[1]))

from data_curation.synthetic import ALPHABET, render_styled_text, resolve_fonts, text_style, vocabulary_split
from jobs.recipe import char_accuracy
from lance_model.config import LanceConfig
from lance_model.encoders.vit import vit_patches
from lance_model.generation import TextOptions, generate_text
from lance_model.heads import sincos_1d
from lance_model.model import Lance
from lance_model.packing import pack_samples
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer

QUESTION = "What does the image say?"
TASKS = ("word", "first", "single", "prefix2", "prefix3", "colour")


class Renders:
    """i2t samples of one task: what is drawn, and the answer."""

    def __init__(self, args: argparse.Namespace, config: LanceConfig) -> None:
        self.args, self.config = args, config
        self.fonts = resolve_fonts(args.fonts.split(","))
        self.backgrounds = tuple(args.backgrounds.split(","))

    def drawn(self, word: str, progress: float = 1.0, seed: int = 0) -> str:
        task = self.args.task
        if self.args.grow:  # curriculum: the word's first k letters, k growing from 1 to all of them
            return word[: max(1, round(1 + min(max(progress, 0.0), 1.0) * (len(word) - 1)))]
        if self.args.letters:  # the recipe's curriculum: 1-3 random letters, less often as training goes on
            rng = random.Random(seed ^ 0x1E77E85)
            if rng.random() < 1.0 - min(max(progress, 0.0), 1.0):
                return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 3)))
        if task == "single":
            return word[0]
        if task.startswith("prefix"):
            return word[: int(task[-1])]
        return word

    def answer(self, word: str, seed: int, progress: float = 1.0) -> str:
        task = self.args.task
        if self.args.grow or self.args.letters:
            return self.drawn(word, progress, seed)
        if task in ("first", "single"):
            return word[0]
        if task.startswith("prefix"):
            return word[: int(task[-1])]
        if task == "colour":
            return text_style(random.Random(seed), self.fonts, self.backgrounds, 0.8, True).fg_name.upper()
        return word

    def sample(self, word: str, seed: int, progress: float = 1.0) -> Sample:
        a = self.args
        height = a.height or a.size
        if a.shrink:
            image = self.shrunk(word, seed, height, progress)
        else:
            image = render_styled_text(self.drawn(word, progress, seed), height, a.size, seed, self.fonts, self.backgrounds, 0.8,
                                       named_colours=a.task == "colour", layout=a.layout, cells=a.cells)
        if a.grey:
            image = grey(image)
        frames = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
        frames = F.interpolate(frames, size=(a.vit_height or a.vit_size, a.vit_size), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0, 1)
        patches, grid = vit_patches(frames, self.config.vit)
        return Sample("i2t", a.question, answer=self.answer(word, seed, progress), system=a.system,
                      source=Visual(vit_patches=patches, vit_grid=tuple(grid.tolist())))


    def shrunk(self, word: str, seed: int, height: int, progress: float) -> np.ndarray:
        """`--shrink`: the text fitted into a box whose side falls linearly from the whole image
        (progress 0) to `--final-box` of it (progress 1), pasted at a random place on the image's
        background (plain backgrounds: the box and the image share the style's colour)."""
        a = self.args
        side = 1.0 - (1.0 - a.final_box) * min(max(progress, 0.0), 1.0)
        bh, bw = max(8, round(height * side)), max(8, round(a.size * side))
        box = render_styled_text(self.drawn(word), bh, bw, seed, self.fonts, self.backgrounds, 0.8,
                                 named_colours=a.task == "colour", layout=a.layout, cells=a.cells)
        image = render_styled_text("", height, a.size, seed, self.fonts, self.backgrounds, 0.8,
                                   named_colours=a.task == "colour", layout=a.layout, cells=a.cells).copy()
        rng = random.Random(seed ^ 0x5EED)
        y, x = rng.randint(0, height - bh), rng.randint(0, a.size - bw)
        image[y:y + bh, x:x + bw] = box
        return image


def grey(image: np.ndarray) -> np.ndarray:
    """Contrast-stretched grey (the text's polarity stays as drawn): the render without its colours."""
    g = image.astype(np.float32).mean(axis=2, keepdims=True)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1.0) * 255
    return np.repeat(g, 3, axis=2).astype(np.uint8)


def add_vit_positions(model: Lance) -> None:
    """A 2-D sin-cos table (row, column of the merged grid) added to the merged ViT tokens before the
    language model, so each token carries its place in its content (the tower's own rotary positions
    are relative, and M-RoPE tells columns apart only by slow frequencies)."""
    plain = model.vit_embeddings
    merge = model.config.vit.spatial_merge_size

    def with_positions(batch):
        out = plain(batch)
        rows = []
        for t, h, w in batch.vit_grids.tolist():
            hh, ww = h // merge, w // merge
            r = torch.arange(hh).repeat_interleave(ww).repeat(t)
            c = torch.arange(ww).repeat(t * hh)
            half = out.shape[1] // 2
            rows.append(torch.cat([sincos_1d(half, r), sincos_1d(out.shape[1] - half, c)], dim=1))
        return out + torch.cat(rows).to(out) if rows else out

    model.vit_embeddings = with_positions


class Batches(torch.utils.data.IterableDataset):
    """Endless packed batches of fresh renders of training words (one seed stream per worker)."""

    def __init__(self, renders: Renders, words: tuple[str, ...], batch_size: int, builder: SequenceBuilder) -> None:
        self.renders, self.words, self.batch_size, self.builder = renders, words, batch_size, builder

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(1 + (info.id if info else 0) * 7777)
        if info is not None:
            torch.set_num_threads(1)
        workers, batches = (info.num_workers if info else 1), 0
        span = self.renders.args.shrink or self.renders.args.grow or self.renders.args.letters
        while True:
            progress = batches * workers / span if span else 1.0  # about the training step's share of --shrink
            batches += 1
            samples = [self.renders.sample(rng.choice(self.words), rng.getrandbits(31), progress)
                       for _ in range(self.batch_size)]
            yield pack_samples(samples, self.builder, self.renders.config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--task", default="word", choices=TASKS)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this much training time (evaluations not counted)")
    p.add_argument("--bs", type=int, default=32, help="samples per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vit-lr-mult", type=float, default=1.0, help="the ViT's learning rate over --lr")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=48, help="held-out words evaluated")
    p.add_argument("--fonts", default="default")
    p.add_argument("--backgrounds", default="plain")
    p.add_argument("--size", type=int, default=64, help="render width (pixels)")
    p.add_argument("--height", type=int, default=0, help="render height (pixels; 0: --size, a square)")
    p.add_argument("--layout", default="fitted", choices=("fitted", "cells"), help="text layout (render_styled_text)")
    p.add_argument("--cells", type=int, default=6, help="letter cells across the image (--layout cells)")
    p.add_argument("--shrink", type=int, default=0,
                   help="curriculum: over this many steps the text's box shrinks from the whole image to --final-box "
                        "(evaluation at --final-box)")
    p.add_argument("--grow", type=int, default=0,
                   help="curriculum (task word): over this many steps the drawn text grows from the word's first "
                        "letter to the whole word, fitted to the image (evaluation on whole words)")
    p.add_argument("--letters", type=int, default=0,
                   help="curriculum (task word), the recipe's: 1-3 random letters drawn large instead of the word, "
                        "at a rate falling linearly from 1 to 0 over this many steps")
    p.add_argument("--final-box", type=float, default=0.25, help="the text box's final side over the image's (--shrink)")
    p.add_argument("--grey", action="store_true", help="contrast-stretched grey renders (no colours)")
    p.add_argument("--vit-positions", action="store_true", help="add a 2-D sin-cos table to the ViT tokens")
    p.add_argument("--vit-size", type=int, default=168, help="ViT input width (a multiple of 28)")
    p.add_argument("--vit-height", type=int, default=0, help="ViT input height (a multiple of 28; 0: --vit-size)")
    p.add_argument("--override", default="{}", help="LanceConfig overrides as JSON")
    p.add_argument("--question", default=QUESTION, help="the i2t question (caption)")
    p.add_argument("--system", default=None, help="the system prompt (default: the released x2t prompt)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes rendering and packing")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    overrides = {"freeze_embeddings": False, "freeze_lm_head": False, "vit": {"trainable": True}}
    for key, value in json.loads(a.override).items():
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
    config = LanceConfig.from_preset(a.preset, **overrides)
    torch.manual_seed(0)
    model = Lance(config)
    model.init_weights()
    if a.vit_positions:
        add_vit_positions(model)
    model.to(device)
    builder = SequenceBuilder(ByteTokenizer())
    train, heldout = vocabulary_split(2400, 200, 0)
    renders = Renders(a, config)
    evals = [renders.sample(w, 10_000_000 + i) for i, w in enumerate(heldout[: a.eval_n])]

    vit = [q for n, q in model.named_parameters() if q.requires_grad and n.startswith("vit_model")]
    rest = [q for n, q in model.named_parameters() if q.requires_grad and not n.startswith("vit_model")]
    opt = torch.optim.AdamW([{"params": rest, "lr": a.lr}, {"params": vit, "lr": a.lr * a.vit_lr_mult}],
                            betas=(0.9, 0.95), weight_decay=0.0)
    base = [g["lr"] for g in opt.param_groups]
    loader = iter(torch.utils.data.DataLoader(Batches(renders, train, a.bs, builder), batch_size=None,
                                              num_workers=a.workers, pin_memory=device.type == "cuda"))
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16)

    def score(samples: list[Sample]) -> str:
        model.eval()
        with torch.no_grad(), autocast():
            outs = [o.text for o in generate_text(model, builder, samples, TextOptions(max_new_tokens=12))]
        model.train()
        truth = [s.answer for s in samples]
        n = len(truth)
        char = sum(char_accuracy(o, t) for o, t in zip(outs, truth)) / n
        exact = sum(o == t for o, t in zip(outs, truth)) / n
        first = sum(bool(o) and o[0] == t[0] for o, t in zip(outs, truth)) / n
        return (f"char {char:.3f} exact {exact:.3f} first {first:.3f} distinct {len(set(outs))} "
                f"e.g. {outs[:4]} vs {truth[:4]}")

    span = a.shrink or a.grow or a.letters

    def evaluate(step: int) -> None:
        line = f"EVAL step {step} {score(evals)}"
        if span and step < span:  # the held-out words as the curriculum draws them at this step
            now = [renders.sample(w, 10_000_000 + i, step / span) for i, w in enumerate(heldout[: a.eval_n])]
            line += f" | at this step's stage ({step / span:.2f}): {score(now)}"
        print(line, flush=True)

    start, losses, trained = time.time(), [], 0.0
    for step in range(1, a.steps + 1):
        if a.minutes > 0 and trained >= a.minutes * 60:
            evaluate(step - 1)
            break
        t0 = time.time()
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = lr * min(1.0, step / a.warmup)
        batch = next(loader).to(device)
        with autocast():
            out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.ce.item())
        trained += time.time() - t0
        if step % 25 == 0:
            print(f"step {step} ce {sum(losses[-25:]) / 25:.3f} {time.time() - start:.0f}s ({trained:.0f}s training)",
                  flush=True)
        if step % a.eval_every == 0:
            evaluate(step)


if __name__ == "__main__":
    main()

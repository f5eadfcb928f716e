"""OCR reward throughput (images/s) at 512x512: the Ray actor pool vs one engine in a loop.

    python benchmarks/bench_rl.py [--images 32] [--actors 2] [--repeats 3]

The reference implementation scores one image at a time with one engine in the training process;
`loop` does exactly that with one RapidOCR engine (1 ONNX thread). `pool` scores the same batch
with `--actors` reward actors (1 CPU and 1 engine each) on a local Ray, engines already loaded (Ray
start and model loading are excluded from both). Images are rendered words (DejaVu, or Pillow's
default font) on varied backgrounds, as the rewards see them. Loop and pool runs alternate `--repeats`
times and the best of each is reported, with the machine's load average (other jobs share these CPUs).
"""
from __future__ import annotations

import argparse
import os
import random
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rl.actors import RewardActorPool
from rl.ocr import OcrConfig, RapidOcrEngine
from rl.prompts import WORDS

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def render(word: str, size: int, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    fg = tuple(255 - c for c in bg)
    font = ImageFont.truetype(FONT, 64) if os.path.isfile(FONT) else ImageFont.load_default(size=64)
    img = Image.new("RGB", (size, size), bg)
    ImageDraw.Draw(img).text((rng.randint(10, size // 3), rng.randint(10, size - 90)), word, fill=fg, font=font)
    return np.asarray(img)


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    words = [WORDS[i % len(WORDS)] for i in range(args.images)]
    images = [render(w, args.size, i) for i, w in enumerate(words)]
    prompts = [f'a sign that says "{w}"' for w in words]

    engine = RapidOcrEngine(OcrConfig(engine="rapidocr", threads=1))
    engine.read(images[:2])  # warm-up (first ONNX runs allocate)

    import ray

    ray.init(num_cpus=args.actors, include_dashboard=False, configure_logging=False, log_to_driver=False)
    pool = RewardActorPool(OcrConfig(engine="rapidocr", threads=1), num_actors=args.actors)
    pool.info()
    pool.score(images[: 2 * args.actors], prompts[: 2 * args.actors])  # warm-up
    # Interleaved, so that load from other jobs on this machine hits both sides alike.
    loop_times, pool_times, scored = [], [], []
    for _ in range(args.repeats):
        loop_times.append(best_of(1, lambda: [engine.read([im]) for im in images]))
        pool_times.append(best_of(1, lambda: scored.append(pool.score(images, prompts))))
    pool.shutdown()
    ray.shutdown()
    loop_s, pool_s = min(loop_times), min(pool_times)
    acc = float(np.mean(scored[-1].components["ocr"]))
    load = os.getloadavg()
    print(f"{args.images} images {args.size}x{args.size}, {os.cpu_count()} CPUs, load avg {load[0]:.1f}")
    print(f"loop (1 engine, 1 image at a time): {loop_s:.2f} s  {args.images / loop_s:.2f} images/s  "
          f"({loop_s / args.images * 1000:.0f} ms/image)")
    print(f"pool ({args.actors} actors x 1 CPU):            {pool_s:.2f} s  {args.images / pool_s:.2f} images/s  "
          f"speed-up {loop_s / pool_s:.2f}x  (mean OCR reward {acc:.3f})")


if __name__ == "__main__":
    main()

"""Video-hours of input curated per GPU-hour: real-looking clips through the whole curation pipeline.

Generates a corpus of videos like a web crawl's (`--width` x `--height`, 24 / 25 / 29.97 / 30 fps, lengths
drawn between `--min-seconds` and `--max-seconds`), each a sequence of shots with hard cuts between
them: a panning textured background, moving shapes and a caption-like text bar, different colours
per shot. Then curates it as users do (`run_curation`, a folder source with `captions.jsonl`): list
-> inspect (decode, scene split, one sample per scene or per clip of a long scene) -> filters ->
dedup -> VAE + ViT encoder pools -> tokenize -> shards, on this machine's CPUs and GPUs.

Reported: input video-hours, wall time of the curation (Ray's start and the encoders' first load
excluded: a warm-up run on one short clip comes first), **video-hours per GPU-hour** (input hours /
(wall hours x GPUs); per CPU-hour when no GPU is used), scenes found against shots made, samples
written. `--images N` also curates N photo-like 768 x 768 images and reports images/s.

On one GPU (random-init encoders of the released shapes: the Wan2.2 VAE and the Qwen2.5-VL ViT):
    python3 benchmarks/bench_video_curation.py --preset lance-3b --clips 60 --images 256 --num-cpus 16
CPU smoke (the `tiny` encoders, small clips):
    python benchmarks/bench_video_curation.py --preset tiny --clips 3 --width 320 --height 180 \
        --min-seconds 5 --max-seconds 8 --images 8
The clips are written with H.264 (imageio-ffmpeg) when it is installed, else MPEG-4 part 2 (OpenCV);
the codec is printed, since decode speed depends on it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.append(str(Path(__file__).resolve().parents[1]))

from data_curation.config import CurationConfig
from data_curation.pipeline import run_curation
from lance_platform.config import load_config

FRAME_RATES = (24.0, 25.0, 30000 / 1001, 30.0)
WORDS = ("SALE", "OPEN", "NEWS", "LIVE", "CITY", "SPORT", "MUSIC", "TRAVEL", "COOKING", "GARDEN")


def shot_frames(rng: random.Random, height: int, width: int, count: int):
    """`count` frames of one shot: a textured background panning back and forth, three shapes moving
    in straight lines and bouncing off the edges, a text bar; everything in this shot's own colours
    (no jump within a shot, so every cut a detector finds between shots is a real one)."""
    import cv2

    g = np.random.default_rng(rng.getrandbits(32))
    base = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
    other = np.array([rng.randint(0, 255) for _ in range(3)], np.float32)
    pad = 64
    yy, xx = np.mgrid[0:height + 2 * pad, 0:width + 2 * pad].astype(np.float32)
    ramp = (xx / (width + 2 * pad))[..., None]
    texture = (base * (1 - ramp) + other * ramp + g.normal(0, 18, (height + 2 * pad, width + 2 * pad, 1))
               + 20 * np.sin(yy / rng.uniform(6, 30))[..., None]).clip(0, 255).astype(np.uint8)
    vx, vy = rng.uniform(-1.5, 1.5), rng.uniform(-1, 1)
    shapes = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-6, 6), rng.uniform(-4, 4),
               rng.randint(height // 12, height // 4), tuple(rng.randint(0, 255) for _ in range(3)), rng.random() < 0.5)
              for _ in range(3)]
    word = rng.choice(WORDS)
    bar = tuple(rng.randint(0, 80) for _ in range(3))
    def bounce(u: float, length: float) -> int:  # a position moving back and forth in [0, length]: no jumps
        return int(length - abs(u % (2 * length) - length))

    for t in range(count):
        ox, oy = bounce(pad + vx * t, 2 * pad), bounce(pad + vy * t, 2 * pad)
        frame = np.ascontiguousarray(texture[oy:oy + height, ox:ox + width])
        for x, y, dx, dy, size, colour, round_ in shapes:
            cx, cy = bounce(x + dx * t, width), bounce(y + dy * t, height)
            if round_:
                cv2.circle(frame, (cx, cy), size // 2, colour, -1)
            else:
                cv2.rectangle(frame, (cx - size // 2, cy - size // 3), (cx + size // 2, cy + size // 3), colour, -1)
        top = height - height // 7
        frame[top:] = (frame[top:] * 0.3 + np.array(bar) * 0.7).astype(np.uint8)
        cv2.putText(frame, word, (width // 20, height - height // 28), cv2.FONT_HERSHEY_SIMPLEX, height / 400,
                    (255, 255, 255), max(1, height // 240), cv2.LINE_AA)
        yield frame


class ClipWriter:
    """H.264 through imageio-ffmpeg when available, else OpenCV's MPEG-4 part 2."""

    def __init__(self, path: Path, fps: float, width: int, height: int) -> None:
        self.codec = codec()
        if self.codec == "h264":
            import imageio.v2 as iio

            self.w = iio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, ffmpeg_log_level="error",
                                    output_params=["-crf", "23", "-preset", "veryfast"], pixelformat="yuv420p")
            self.append = self.w.append_data
        else:
            import cv2

            self.w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
            self.append = lambda frame: self.w.write(frame[..., ::-1])

    def close(self) -> None:
        (self.w.close if self.codec == "h264" else self.w.release)()


def codec() -> str:
    try:
        import imageio_ffmpeg  # noqa: F401

        return "h264"
    except ImportError:
        return "mpeg4"


def make_clip(job: tuple) -> dict:
    """One clip of the corpus (run in a worker process): its file, caption, length and shots."""
    root, index, seed, width, height, lo, hi, shot_lo, shot_hi = job
    rng = random.Random(seed)
    fps = rng.choice(FRAME_RATES)
    total = max(1, round(rng.uniform(lo, hi) * fps))
    path = Path(root) / f"clip_{index:04d}.mp4"
    writer = ClipWriter(path, fps, width, height)
    made, shots = 0, 0
    while made < total:
        count = min(total - made, max(1, round(rng.uniform(shot_lo, shot_hi) * fps)))
        for frame in shot_frames(rng, height, width, count):
            writer.append(frame)
        made += count
        shots += 1
    writer.close()
    return {"path": path.name, "caption": f"a video clip with {shots} shots of moving shapes over a panning "
            f"background and a caption bar", "seconds": total / fps, "shots": shots, "fps": fps}


def make_image(job: tuple) -> dict:
    root, index, seed, size = job
    import cv2

    rng = random.Random(seed)
    frame = next(shot_frames(rng, size, size, 1))
    frame = cv2.GaussianBlur(frame, (0, 0), rng.uniform(0.3, 1.0))
    path = Path(root) / f"image_{index:04d}.png"
    cv2.imwrite(str(path), frame[..., ::-1])
    return {"path": path.name, "caption": "a photo of shapes over a textured background with a caption bar"}


def corpus(root: Path, args: argparse.Namespace, clips: int, images: int, seed: int, workers: int) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), i, seed * 100_000 + i, args.width, args.height, args.min_seconds, args.max_seconds,
             args.min_shot, args.max_shot) for i in range(clips)]
    image_jobs = [(str(root), i, seed * 100_000 + 50_000 + i, 768) for i in range(images)]
    with mp.get_context("spawn").Pool(workers) as pool:
        records = pool.map(make_clip, jobs) + pool.map(make_image, image_jobs)
    with (root / "captions.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps({"path": r["path"], "caption": r["caption"]}) + "\n")
    return records


def config(root: Path, out: Path, args: argparse.Namespace) -> CurationConfig:
    overrides = [f"sources=[{{kind: folder, name: bench, uri: '{root}', captions: captions.jsonl}}]",
                 f"output.dir={out}", "tracking.enabled=false", f"num_cpus={args.num_cpus}",
                 f"model={{preset: {args.preset}, seed: 0}}", "scenes.enabled=true",
                 f"decode.max_seconds={args.clip_seconds}", f"decode.target_fps={args.target_fps}",
                 "filters.min_blur=0", "filters.min_motion=0", f"filters.min_seconds={args.min_clip}",
                 "checks.max_side=4096", *args.set]
    if args.preset != "tiny":  # the released shapes' buckets (the file's are the tiny model's)
        overrides += ["buckets.vae_image_area=589824", "buckets.vae_video_area=409600",
                      "buckets.vit_image_area=200704", "buckets.vit_video_area=112896",
                      "encode.actor_num_cpus=1", f"encode.vae_batch_size={args.vae_batch}",
                      f"encode.vit_batch_size={args.vit_batch}"]
    return load_config(CurationConfig, "configs/curation/synthetic.yaml", overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="lance-3b", help="the model whose encoders curate (random init)")
    p.add_argument("--clips", type=int, default=60)
    p.add_argument("--width", type=int, default=854)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--min-shot", type=float, default=3.0, help="shot length range, seconds")
    p.add_argument("--max-shot", type=float, default=12.0)
    p.add_argument("--clip-seconds", type=float, default=6.0, help="decode.max_seconds: longest sample")
    p.add_argument("--min-clip", type=float, default=1.0, help="filters.min_seconds")
    p.add_argument("--target-fps", type=float, default=12.0)
    p.add_argument("--images", type=int, default=0, help="also curate this many 768 x 768 images (images/s)")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--vae-batch", type=int, default=4)
    p.add_argument("--vit-batch", type=int, default=8)
    p.add_argument("--set", action="append", default=[], help="more curation overrides (key=value)")
    p.add_argument("--dir", default="", help="where the corpus and shards go (default: a temporary directory)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args()

    import torch

    gpus = torch.cuda.device_count()
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        records = corpus(root / "videos", args, args.clips, 0, seed=1, workers=args.num_cpus)
        made_s = time.perf_counter() - t0
        hours = sum(r["seconds"] for r in records) / 3600
        shots = sum(r["shots"] for r in records)
        warm = argparse.Namespace(**{**vars(args), "min_seconds": 2.0, "max_seconds": 3.0})
        corpus(root / "warm", warm, 1, 1, seed=2, workers=1)
        run_curation(config(root / "warm", root / "warm_out", args), "curate")

        t0 = time.perf_counter()
        result = run_curation(config(root / "videos", root / "out", args), "curate")
        seconds = time.perf_counter() - t0
        c = result.counts
        per = gpus or args.num_cpus
        rate = hours / (seconds / 3600) / per
        out = {"device": torch.cuda.get_device_name(0) if gpus else "CPU", "gpus": gpus, "num_cpus": args.num_cpus,
               "preset": args.preset, "codec": codec(), "clips": args.clips, "size": f"{args.width}x{args.height}",
               "video_hours": hours, "shots": shots, "seconds": seconds, "corpus_seconds": made_s,
               "video_hours_per_gpu_hour" if gpus else "video_hours_per_cpu_hour": rate,
               "scenes": c.get("scenes"), "curated": c.get("curated"), "counts": c}
        print(f"device {out['device']} x{gpus} GPU(s), {args.num_cpus} CPUs, preset {args.preset}, {args.clips} clips "
              f"{args.width}x{args.height} ({codec()}), {hours * 60:.1f} min of video in {shots} shots "
              f"(made in {made_s:.0f} s)")
        print(f"curated in {seconds:.1f} s: {c.get('curated')} samples, scenes {c.get('scenes')}; "
              f"{rate:.1f} video-hours per {'GPU' if gpus else 'CPU'}-hour")
        if args.images:
            images = corpus(root / "images", args, 0, args.images, seed=3, workers=args.num_cpus)
            t0 = time.perf_counter()
            result = run_curation(config(root / "images", root / "images_out", args), "curate")
            seconds = time.perf_counter() - t0
            out.update(images=len(images), image_seconds=seconds, images_per_s=len(images) / seconds,
                       image_counts=result.counts)
            print(f"{len(images)} images 768x768 curated in {seconds:.1f} s: {len(images) / seconds:.2f} images/s "
                  f"({result.counts.get('curated')} samples)")
        if args.out:
            Path(args.out).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()

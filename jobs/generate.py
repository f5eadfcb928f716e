"""`lance-pipeline generate`: images, videos and captions from a Lance checkpoint.

    lance-pipeline generate --task t2i --checkpoint DIR --prompt "a red fox" --out results/
    lance-pipeline generate --checkpoint DIR --prompts prompts.json --out results/

A prompts file is a JSON list of objects {task, prompt, image?, video?, height?, width?, frames?,
seed?}; missing fields take the command-line values, and prompt i's seed defaults to --seed + i.
Everything the user can get wrong (checkpoint directory, unreadable image/video, a size the VAE
cannot take, a frame count that is not 1 + 4k for the Wan VAE) is checked before the model loads.
Outputs: PNG per image, MP4 per video (imageio + ffmpeg, 12 fps default), a .txt per x2t answer,
and `results.json` listing every request with its output file (and text).
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.errors import UsageError
from lance_model.config import LanceConfig

if TYPE_CHECKING:
    import torch

    from lance_model.generation import Request

log = logging.getLogger(__name__)

# The --task choices: lance_model.generation's VISUAL_TASKS + TEXT_TASKS + its aliases (written out
# so that parsing the command line does not import torch; a test keeps them equal).
TASK_CHOICES = ("t2i", "t2v", "i2v", "image_edit", "video_edit", "i2t", "v2t", "x2t_image", "x2t_video")

IMAGE_INPUT_TASKS = ("i2v", "image_edit", "i2t")
VIDEO_INPUT_TASKS = ("video_edit", "v2t")
MAX_V2T_FRAMES = 32
PROMPT_FIELDS = {"task", "prompt", "image", "video", "height", "width", "frames", "seed"}


# ------------------------------------------------------------------------------------------ inputs
def read_image(path: Path, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """An image file -> [1, 3, H, W] in [0, 1], resized to height x width when both are given."""
    import numpy as np
    import torch
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if height and width and im.size != (width, height):
                im = im.resize((width, height), Image.BICUBIC)
            array = np.asarray(im, dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise UsageError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0


def read_video(path: Path, frames: int | None, frame_stride: int, height: int | None = None,
               width: int | None = None, max_frames: int | None = None) -> torch.Tensor:
    """A video file -> [T, 3, H, W] in [0, 1]. T = `frames` (the video must have that many) or the
    largest 1 + k*frame_stride available (capped at `max_frames`)."""
    import imageio.v2 as imageio
    import numpy as np
    import torch
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    want = frames if frames else max_frames
    out = []
    try:
        with imageio.get_reader(str(path), "ffmpeg") as reader:
            for frame in reader:
                out.append(np.asarray(frame)[..., :3])
                if want and len(out) >= want:
                    break
    except (OSError, ValueError, RuntimeError, IndexError) as exc:
        raise UsageError(f"cannot read video {path}: {exc}") from None
    if not out:
        raise UsageError(f"cannot read video {path}: no frames")
    if frames and len(out) < frames:
        raise UsageError(f"video {path} has {len(out)} frames; frames={frames} were asked for")
    if not frames:
        out = out[: 1 + (len(out) - 1) // frame_stride * frame_stride]
    if height and width:
        out = [np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in out]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0


# ------------------------------------------------------------------------------------------ outputs
def write_png(path: Path, frame: torch.Tensor) -> None:
    from PIL import Image

    Image.fromarray(frame.numpy()).save(path)


def write_mp4(path: Path, frames: torch.Tensor, fps: int) -> None:
    import imageio.v2 as imageio

    with imageio.get_writer(str(path), fps=fps, codec="libx264", macro_block_size=1,
                            ffmpeg_log_level="error") as writer:
        for frame in frames.numpy():
            writer.append_data(frame)


# ------------------------------------------------------------------------------------------ requests
@dataclass
class PromptSpec:
    task: str
    prompt: str
    image: str | None
    video: str | None
    height: int | None
    width: int | None
    frames: int | None
    seed: int


def prompt_specs(args: argparse.Namespace) -> list[PromptSpec]:
    from lance_model.generation import canonical_task

    if bool(args.prompt is not None) == bool(args.prompts):
        raise UsageError("give exactly one of --prompt TEXT or --prompts FILE.json")
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        try:
            entries = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"prompts file {path}: not valid JSON ({exc})") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise UsageError(f"prompts file {path}: expected a JSON list of objects")
        base = path.parent
    else:
        entries, base = [{"prompt": args.prompt}], Path.cwd()
    specs = []
    for i, e in enumerate(entries):
        unknown = sorted(set(e) - PROMPT_FIELDS)
        if unknown:
            raise UsageError(f"prompt {i}: unknown field(s) {unknown}; known: {sorted(PROMPT_FIELDS)}")
        task = e.get("task", args.task)
        if task is None:
            raise UsageError(f"prompt {i}: no task (give --task or a 'task' field)")
        if task not in TASK_CHOICES:
            raise UsageError(f"prompt {i}: task={task!r}: expected one of {list(TASK_CHOICES)}")
        specs.append(PromptSpec(
            task=canonical_task(task), prompt=str(e.get("prompt", "")),
            image=_resolve(e.get("image", args.image), base), video=_resolve(e.get("video", args.video), base),
            height=e.get("height", args.height), width=e.get("width", args.width),
            frames=e.get("frames", args.frames), seed=int(e.get("seed", args.seed + i))))
    return specs


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None or Path(path).is_absolute() or Path(path).exists():
        return path
    return str(base / path)


def build_request(spec: PromptSpec, config: LanceConfig, index: int) -> Request:
    """Read the spec's inputs and check the request against the model config (no weights needed)."""
    from lance_model.generation import EDIT_TASKS
    task = spec.task
    source = None
    if task in IMAGE_INPUT_TASKS:
        if spec.image is None:
            raise UsageError(f"prompt {index}: task {task} needs --image")
        source = read_image(Path(spec.image), spec.height, spec.width)
    elif task in VIDEO_INPUT_TASKS:
        if spec.video is None:
            raise UsageError(f"prompt {index}: task {task} needs --video")
        stride = config.vae.temporal_stride if task in EDIT_TASKS else 1
        cap = (config.max_latent_frames - 1) * stride + 1 if task in EDIT_TASKS else MAX_V2T_FRAMES
        source = read_video(Path(spec.video), spec.frames, stride, spec.height, spec.width, cap)
    if task in ("t2i", "t2v") and (spec.height is None or spec.width is None):
        raise UsageError(f"prompt {index}: task {task} needs --height and --width")
    frames = spec.frames if spec.frames is not None else 1
    if task in ("t2v", "i2v") and spec.frames is None:
        raise UsageError(f"prompt {index}: task {task} needs --frames (1 + {config.vae.temporal_stride}k)")
    from lance_model.generation import Request, validate_request

    req = Request(task, spec.prompt, spec.height, spec.width, frames, spec.seed, source)
    try:
        validate_request(req, config)
    except ValueError as exc:  # the request's documented check: a size or frame count the model cannot take
        raise UsageError(f"prompt {index}: {exc}") from None
    return req


# ------------------------------------------------------------------------------------------ command
def _device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    import torch

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    return device, dtype


def cmd_generate(args: argparse.Namespace) -> int:
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    config = LanceConfig.from_pretrained(checkpoint)
    from lance_model.generation import SamplerOptions, TextOptions

    try:  # the options' documented checks: values out of range
        sampler = SamplerOptions(args.steps, args.shift, args.cfg_text, args.cfg_image, tuple(args.cfg_interval),
                                 args.cfg_renorm, args.cfg_renorm_min).validate()
        text = TextOptions(args.max_new_tokens, args.temperature, args.top_p).validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.fps < 1 or args.batch_size < 1:
        raise UsageError(f"--fps={args.fps} and --batch-size={args.batch_size}: expected positive integers")
    requests = [build_request(spec, config, i) for i, spec in enumerate(prompt_specs(args))]

    from lance_model.generation import LanceGenerator

    device, dtype = _device_dtype(args)
    log.info("loading %s on %s (%s)", checkpoint, device, dtype)
    generator = LanceGenerator.from_pretrained(checkpoint, device=device, dtype=dtype)
    outputs = generator.generate(requests, sampler, text, batch_size=args.batch_size,
                                 use_cache=not args.no_kv_cache, progress=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    for i, out in enumerate(outputs):
        req = out.request
        entry = {"index": i, "task": req.task, "prompt": req.prompt, "seed": req.seed}
        if out.text is not None:
            path = out_dir / f"{i:03d}_{req.task}.txt"
            path.write_text(out.text.text + "\n", encoding="utf-8")
            entry.update(text=out.text.text, finished=out.text.finished)
        elif out.frames.shape[0] == 1 and req.task in ("t2i", "image_edit"):
            path = out_dir / f"{i:03d}_{req.task}.png"
            write_png(path, out.frames[0])
        else:
            path = out_dir / f"{i:03d}_{req.task}.mp4"
            write_mp4(path, out.frames, args.fps)
        entry["file"] = path.name
        manifest.append(entry)
        print(f"{req.task:<11} {path}")
    (out_dir / "results.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    tasks = TASK_CHOICES
    p = sub.add_parser("generate", help="generate images/videos/captions from a checkpoint",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (Lance.from_pretrained)")
    p.add_argument("--task", choices=tasks, help="task of --prompt (default for entries of --prompts)")
    p.add_argument("--prompt", help="one prompt (caption, edit instruction or question)")
    p.add_argument("--prompts", help="JSON list of {task, prompt, image?, video?, height?, width?, frames?, seed?}")
    p.add_argument("--out", default="results", help="output directory (default: results)")
    p.add_argument("--image", help="input image (i2v first frame, image_edit source, i2t)")
    p.add_argument("--video", help="input video (video_edit source, v2t)")
    p.add_argument("--height", type=int, help="target height (t2i/t2v/i2v); resizes inputs when given with --width")
    p.add_argument("--width", type=int, help="target width")
    p.add_argument("--frames", type=int, help="video frames: 1 + 4k for the Wan VAE (t2v/i2v; inputs: frames to read)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; prompt i uses seed + i (default: 0)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    p.add_argument("--shift", type=float, default=3.5, help="timestep shift (default: 3.5)")
    p.add_argument("--cfg-text", type=float, default=4.0, help="text guidance scale (default: 4.0)")
    p.add_argument("--cfg-image", type=float, default=1.0, help="image guidance scale for edits (default: 1.0 = off)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.4, 1.0), metavar=("LO", "HI"),
                   help="guidance only for LO < t <= HI (default: 0.4 1.0)")
    p.add_argument("--cfg-renorm", choices=("none", "global", "channel"), default="global",
                   help="cap the guided velocity's norm at the conditional one (default: global)")
    p.add_argument("--cfg-renorm-min", type=float, default=0.0, help="lower clamp of the renorm scale (default: 0)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="x2t token limit (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="x2t sampling temperature (default: 0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="x2t nucleus sampling mass (default: 1.0)")
    p.add_argument("--fps", type=int, default=12, help="MP4 frame rate (default: 12)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per batch (same task and size; default: 4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the prompt every step (slower)")
    p.set_defaults(func=cmd_generate)

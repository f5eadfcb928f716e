"""Synthetic corpora for demos and tests: rendered text, so success is checkable (OCR can read the
text back), nothing is downloaded, and everything is deterministic for a seed.

- images of a word with the word as caption (t2i), short MP4s of a sliding word and a falling square
  (t2v), edit pairs "change the text to X" (i2i) and question/answer pairs about a sign (i2t):
  `synthetic_specs` + `render_item` feed the `synthetic` curation source with real PNG/MP4 bytes.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_curation.media import Fetched, encode_image, encode_video

WORDS = ("OPEN", "STOP", "EXIT", "SALE", "CAFE", "GO", "HELLO", "LANCE", "RAY", "DATA", "PARK", "TAXI")


def render_text_image(text: str, height: int, width: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 [H, W, 3] image: `text` in a contrasting colour, centred on a plain background."""
    rng = random.Random(seed)
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    fg = tuple(255 - c for c in bg)
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    size = max(8, int(min(height, width / max(len(text), 1) * 1.6) * 0.6))
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (width - (right - left)) // 2 - left
    y = (height - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=fg, font=font)
    return np.asarray(img)


def text_image_records(n: int, height: int, width: int, seed: int = 0) -> list[dict]:
    """`n` records {text, caption, image} with a word drawn from WORDS per record."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = rng.choice(WORDS)
        out.append({"text": word, "caption": f'a sign that says "{word}"',
                    "image": render_text_image(word, height, width, seed=seed * 100003 + i)})
    return out


# ---------------------------------------------------------------------------------------- videos
def render_moving_video(text: str, height: int, width: int, num_frames: int, seed: int = 0) -> np.ndarray:
    """[F, H, W, 3] uint8: `text` sliding left to right while a square falls, on a plain background."""
    rng = random.Random(seed)
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    fg = tuple(255 - c for c in bg)
    font = ImageFont.load_default(size=max(8, height // 3))
    side = max(4, height // 6)
    frames = []
    for i in range(num_frames):
        t = i / max(num_frames - 1, 1)
        img = Image.new("RGB", (width, height), bg)
        draw = ImageDraw.Draw(img)
        draw.text((int(t * width * 0.5), height // 3), text, fill=fg, font=font)
        x0, y0 = width - 2 * side, int(t * (height - side))
        draw.rectangle((x0, y0, x0 + side, y0 + side), fill=fg)
        frames.append(np.asarray(img))
    return np.stack(frames)


# ---------------------------------------------------------------------------------------- corpus items
QUESTION = "What does the sign say?"


def image_caption(word: str) -> str:
    return f'a sign that says "{word}"'


def video_caption(word: str) -> str:
    return f'the word "{word}" slides to the right while a square falls'


def edit_caption(word: str) -> str:
    return f'change the text to "{word}"'


def synthetic_specs(spec) -> list[dict]:
    """The items a `SyntheticSpec` describes: distinct words per kind (cycling through WORDS)."""
    items = []
    counts = (("image", "t2i", spec.images), ("video", "t2v", spec.videos), ("edit", "i2i", spec.edits),
              ("qa", "i2t", spec.qa))
    for k, (kind, task, n) in enumerate(counts):
        for i in range(n):
            word = WORDS[(spec.seed + 3 * k + i) % len(WORDS)]
            items.append({"kind": kind, "task": task, "index": i, "word": word,
                          "other": WORDS[(spec.seed + 3 * k + i + 5) % len(WORDS)],
                          "seed": spec.seed * 100003 + k * 1009 + i})
    return items


def render_item(spec: dict, item: dict):
    """One synthetic item -> `Fetched` (real PNG / MP4 bytes, so the pipeline decodes as for files)."""
    h, w, word, seed = spec["height"], spec["width"], item["word"], item["seed"]
    kind = item["kind"]
    text: dict[str, bytes | None] = {"caption": None, "question": None, "answer": None}
    if kind == "video":
        frames = render_moving_video(word, h, w, max(1, round(spec["video_seconds"] * spec["video_fps"])), seed)
        media = {"target": (encode_video(frames, spec["video_fps"]), "video")}
        text["caption"] = video_caption(word).encode()
    elif kind == "edit":
        media = {"source": (encode_image(render_text_image(word, h, w, seed)), "image"),
                 "target": (encode_image(render_text_image(item["other"], h, w, seed)), "image")}
        text["caption"] = edit_caption(item["other"]).encode()
    elif kind == "qa":
        media = {"source": (encode_image(render_text_image(word, h, w, seed)), "image")}
        text.update(caption=image_caption(word).encode(), question=QUESTION.encode(), answer=word.encode())
    else:
        media = {"target": (encode_image(render_text_image(word, h, w, seed)), "image")}
        text["caption"] = image_caption(word).encode()
    return Fetched(media, text)

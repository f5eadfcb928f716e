"""Synthetic corpus items for demos and tests: images of rendered text, with the text as caption.

Rendered text gives a task whose success is checkable (OCR can read the text back), needs no
download, and is deterministic for a seed.
"""
from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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

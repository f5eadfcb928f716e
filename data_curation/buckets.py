"""Aspect buckets: every visual is resized to one of a few fixed shapes so encoder batches stack.

A visual goes to the bucket whose aspect ratio is closest in log space (so 2:1 and 1:2 are treated
alike). The bucket's size at a target area keeps that area (h*w ~ area, h/w = bucket ratio) with
both sides rounded to the encoder's stride: the VAE copy uses the VAE's spatial stride, the ViT copy
uses patch*merge (28). The frames are scaled by the smallest factor that covers the bucket (so no
padding is ever needed) and centre-cropped.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from data_curation.config import BUCKET_RATIOS


def choose_bucket(height: int, width: int, names: tuple[str, ...] = tuple(BUCKET_RATIOS)) -> str:
    aspect = math.log(width / height)
    return min(names, key=lambda n: (abs(math.log(BUCKET_RATIOS[n]) - aspect), n))


def bucket_size(name: str, area: int, stride: int) -> tuple[int, int]:
    """(height, width) of bucket `name` at about `area` pixels, sides multiples of `stride`."""
    ratio = BUCKET_RATIOS[name]
    height = math.sqrt(area / ratio)
    width = height * ratio
    return (max(1, round(height / stride)) * stride, max(1, round(width / stride)) * stride)


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames [F, H, W, 3] uint8 -> [F, height, width, 3]: cover-scale (bicubic), then centre crop."""
    _, src_h, src_w, _ = frames.shape
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, math.ceil(src_h * scale - 1e-6)), max(width, math.ceil(src_w * scale - 1e-6))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = np.empty((frames.shape[0], height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        resized = Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC)
        out[i] = np.asarray(resized)[top:top + height, left:left + width]
    return out

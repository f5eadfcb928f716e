"""Quality scores and policy filters over decoded items.

Scores are computed once per item (and stored in the shard so a later, stricter training mix can
re-filter without re-curating): `blur_score` is the variance of the Laplacian of the grey frame
(sharp edges give large values; a blurred or flat frame gives ~0), `motion_score` the mean absolute
grey difference between consecutive sampled frames (a static "video" gives ~0). `filter_reason`
applies the configured thresholds in a fixed order and names the first one an item fails, so each
removal is counted under exactly one filter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_curation.config import FilterConfig

_GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def grey(frames: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] uint8 -> [F, H, W] float32 on the 0-255 scale."""
    return frames.astype(np.float32) @ _GREY


def blur_score(frames: np.ndarray) -> float:
    """Laplacian variance of the middle frame."""
    g = grey(frames[len(frames) // 2: len(frames) // 2 + 1])[0]
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var()) if lap.size else 0.0


def motion_score(frames: np.ndarray) -> float:
    """Mean absolute grey difference between consecutive frames (0 for a single frame)."""
    if len(frames) < 2:
        return 0.0
    g = grey(frames)
    return float(np.abs(np.diff(g, axis=0)).mean())


@dataclass
class ItemStats:
    """What the filters look at, for the item's main visual."""

    height: int
    width: int
    is_video: bool
    duration: float
    caption_chars: int
    blur: float
    motion: float


def filter_reason(s: ItemStats, cfg: FilterConfig) -> str | None:
    """The name of the first filter `s` fails, or None if it passes them all."""
    short, long = sorted((s.height, s.width))
    checks = (
        ("resolution", (cfg.min_side and short < cfg.min_side) or (cfg.max_side and long > cfg.max_side)),
        ("aspect", cfg.max_aspect and long / short > cfg.max_aspect),
        ("duration", s.is_video and ((cfg.min_seconds and s.duration < cfg.min_seconds)
                                     or (cfg.max_seconds and s.duration > cfg.max_seconds))),
        ("caption_length", (cfg.min_caption_chars and s.caption_chars < cfg.min_caption_chars)
         or (cfg.max_caption_chars and s.caption_chars > cfg.max_caption_chars)),
        ("blur", cfg.min_blur and s.blur < cfg.min_blur),
        ("static", s.is_video and cfg.min_motion and s.motion < cfg.min_motion),
    )
    return next((name for name, failed in checks if failed), None)

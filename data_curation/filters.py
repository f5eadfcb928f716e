"""Quality scores and policy filters over decoded items.

Scores are computed once per item (and stored in the shard so a later, stricter training mix can
re-filter without re-curating): `blur_score` is the variance of the Laplacian of the grey frame
(sharp edges give large values; a blurred or flat frame gives ~0), `motion_score` the mean absolute
grey difference between consecutive sampled frames (a static "video" gives ~0). `filter_reason`
applies the configured thresholds in a fixed order and names the first one an item fails, so each
removal is counted under exactly one filter.

Caption language is judged by writing system, without a model or a dependency: `script_counts`
counts the letters of each Unicode script (Latin, Cyrillic, Han, Hangul, ...; ranges below), and an
item passes when at least `min_script_fraction` of its letters are in the allowed scripts (a
language code stands for its script: `en` -> latin, `ja` -> han + kana). So it tells Chinese from
English, not English from French; text without letters (digits, emoji) passes.

Text density (optional, off by default, needs `rapidocr`): the share of the middle frame covered by
the boxes RapidOCR's PP-OCR text detector finds (detection only; no recognition). The detector
comes from the models shipped inside the rapidocr wheel, is created lazily once per process and is
only imported when the filter is on.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, field

import numpy as np

from data_curation.config import FilterConfig, language_scripts

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
    caption_letters: dict[str, int] = field(default_factory=dict)  # script -> letters (when the filter is on)
    text_density: float | None = None                               # computed only when its filter is on


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
        ("caption_language", cfg.caption_scripts
         and script_fraction(s.caption_letters, cfg.caption_scripts) < cfg.min_script_fraction),
        ("blur", cfg.min_blur and s.blur < cfg.min_blur),
        ("static", s.is_video and cfg.min_motion and s.motion < cfg.min_motion),
        ("text_density", s.text_density is not None
         and ((cfg.min_text_density and s.text_density < cfg.min_text_density)
              or (cfg.max_text_density and s.text_density > cfg.max_text_density))),
    )
    return next((name for name, failed in checks if failed), None)


def filter_detail(s: ItemStats, cfg: FilterConfig, reason: str) -> str | None:
    """What the quarantine table says about a removal by a filter: the measured value and the
    limits it failed (a filtered item has no shard row to look it up in)."""
    if reason == "resolution":
        return f"{s.width}x{s.height} (min side {cfg.min_side}, max side {cfg.max_side})"
    if reason == "aspect":
        return f"aspect {max(s.height, s.width) / min(s.height, s.width):.2f} (max {cfg.max_aspect})"
    if reason == "duration":
        return f"{s.duration:.2f} s (min {cfg.min_seconds}, max {cfg.max_seconds})"
    if reason == "caption_length":
        return f"{s.caption_chars} characters (min {cfg.min_caption_chars}, max {cfg.max_caption_chars})"
    if reason == "blur":
        return f"blur score {s.blur:.2f} (min {cfg.min_blur})"
    if reason == "static":
        return f"motion score {s.motion:.3f} (min {cfg.min_motion})"
    if reason == "caption_language":
        return (f"letters by script {dict(sorted(s.caption_letters.items()))}: "
                f"{script_fraction(s.caption_letters, cfg.caption_scripts):.2f} in {list(cfg.caption_scripts)} "
                f"(min {cfg.min_script_fraction})")
    if reason == "text_density":
        return f"OCR text density {s.text_density:.3f} (min {cfg.min_text_density}, max {cfg.max_text_density})"
    return None


# ---------------------------------------------------------------------------------------- caption script
# (first code point, last code point, script) of the letters we tell apart; anything else is "other".
_SCRIPT_RANGES = sorted([
    (0x0041, 0x024F, "latin"), (0x0250, 0x02AF, "latin"), (0x1D00, 0x1DBF, "latin"), (0x1E00, 0x1EFF, "latin"),
    (0x2C60, 0x2C7F, "latin"), (0xA720, 0xA7FF, "latin"), (0xAB30, 0xAB6F, "latin"), (0xFF21, 0xFF5A, "latin"),
    (0x0370, 0x03FF, "greek"), (0x1F00, 0x1FFF, "greek"),
    (0x0400, 0x052F, "cyrillic"), (0x1C80, 0x1C8F, "cyrillic"), (0x2DE0, 0x2DFF, "cyrillic"),
    (0xA640, 0xA69F, "cyrillic"),
    (0x0530, 0x058F, "armenian"), (0xFB13, 0xFB17, "armenian"),
    (0x0590, 0x05FF, "hebrew"), (0xFB1D, 0xFB4F, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"), (0x08A0, 0x08FF, "arabic"),
    (0xFB50, 0xFDFF, "arabic"), (0xFE70, 0xFEFF, "arabic"),
    (0x0900, 0x097F, "devanagari"), (0x0980, 0x09FF, "bengali"), (0x0A00, 0x0A7F, "gurmukhi"),
    (0x0A80, 0x0AFF, "gujarati"), (0x0B00, 0x0B7F, "oriya"), (0x0B80, 0x0BFF, "tamil"),
    (0x0C00, 0x0C7F, "telugu"), (0x0C80, 0x0CFF, "kannada"), (0x0D00, 0x0D7F, "malayalam"),
    (0x0D80, 0x0DFF, "sinhala"), (0x0E00, 0x0E7F, "thai"), (0x0E80, 0x0EFF, "lao"), (0x0F00, 0x0FFF, "tibetan"),
    (0x1000, 0x109F, "myanmar"), (0x10A0, 0x10FF, "georgian"), (0x1200, 0x139F, "ethiopic"),
    (0x1780, 0x17FF, "khmer"),
    (0x1100, 0x11FF, "hangul"), (0x3130, 0x318F, "hangul"), (0xA960, 0xA97F, "hangul"), (0xAC00, 0xD7AF, "hangul"),
    (0xD7B0, 0xD7FF, "hangul"), (0xFFA0, 0xFFDC, "hangul"),
    (0x3040, 0x309F, "kana"), (0x30A0, 0x30FF, "kana"), (0x31F0, 0x31FF, "kana"), (0xFF66, 0xFF9F, "kana"),
    (0x1B000, 0x1B16F, "kana"),
    (0x3100, 0x312F, "bopomofo"), (0x31A0, 0x31BF, "bopomofo"),
    (0x3005, 0x3007, "han"), (0x3400, 0x4DBF, "han"), (0x4E00, 0x9FFF, "han"), (0xF900, 0xFAFF, "han"),
    (0x20000, 0x3134F, "han"),
])
_RANGE_STARTS = [r[0] for r in _SCRIPT_RANGES]


def char_script(ch: str) -> str:
    """The script of one letter ("other" outside the ranges above)."""
    cp = ord(ch)
    i = bisect.bisect_right(_RANGE_STARTS, cp) - 1
    if i >= 0 and cp <= _SCRIPT_RANGES[i][1]:
        return _SCRIPT_RANGES[i][2]
    return "other"


def script_counts(text: str | None) -> dict[str, int]:
    """Letters per script of `text` (digits, punctuation, spaces, marks and symbols are not counted)."""
    counts: dict[str, int] = {}
    for ch in text or "":
        if ch.isalpha():
            script = "latin" if ch.isascii() else char_script(ch)
            counts[script] = counts.get(script, 0) + 1
    return counts


@functools.lru_cache(maxsize=64)
def _allowed(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(script for name in names for script in language_scripts(name))


def script_fraction(counts: dict[str, int], allowed: tuple[str, ...]) -> float:
    """Share of the letters in `allowed` scripts or languages (1.0 for text without letters)."""
    total = sum(counts.values())
    if not total:
        return 1.0
    ok = _allowed(tuple(allowed))
    return sum(n for script, n in counts.items() if script in ok) / total


# ---------------------------------------------------------------------------------------- OCR text density
OCR_MAX_SIDE = 640       # the detector sees the frame scaled down to this long side (never up)
_ocr_detector = None     # one per process, made on first use


def _detector():
    """RapidOCR with detection only, from the det model shipped in its wheel (it never downloads)."""
    global _ocr_detector
    if _ocr_detector is None:
        from pathlib import Path

        import rapidocr

        models = sorted((Path(rapidocr.__file__).resolve().parent / "models").glob("*_det_*.onnx"))
        if not models:
            raise RuntimeError(f"no text-detection model shipped with rapidocr {rapidocr.__version__}")
        _ocr_detector = rapidocr.RapidOCR(params={
            "Global.log_level": "error", "Global.use_det": True, "Global.use_cls": False, "Global.use_rec": False,
            "Det.model_path": str(models[-1]), "Det.limit_type": "max", "Det.limit_side_len": OCR_MAX_SIDE,
            "EngineConfig.onnxruntime.intra_op_num_threads": 1, "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        })
    return _ocr_detector


def text_boxes(image: np.ndarray) -> np.ndarray:
    """Text boxes [N, 4, 2] (x, y corners) of an RGB uint8 image [H, W, 3]. A box spanning the whole
    frame is dropped: the detector fires on some flat coloured backgrounds, and a real text box
    never touches all four borders."""
    out = _detector()(np.ascontiguousarray(image[..., ::-1]))  # the detector reads BGR
    boxes = getattr(out, "boxes", None)
    if boxes is None or not len(boxes):
        return np.zeros((0, 4, 2), np.float32)
    boxes = np.asarray(boxes, np.float32)
    h, w = image.shape[:2]
    edge = 0.02 * max(h, w)
    whole = ((boxes[..., 0].min(1) <= edge) & (boxes[..., 1].min(1) <= edge)
             & (boxes[..., 0].max(1) >= w - 1 - edge) & (boxes[..., 1].max(1) >= h - 1 - edge))
    return boxes[~whole]


def text_density(frames: np.ndarray) -> float:
    """Share of the middle frame's pixels inside detected text boxes (overlaps counted once)."""
    from PIL import Image, ImageDraw

    frame = frames[len(frames) // 2]
    boxes = text_boxes(frame)
    if not len(boxes):
        return 0.0
    mask = Image.new("1", (frame.shape[1], frame.shape[0]), 0)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        draw.polygon([tuple(p) for p in box.tolist()], fill=1)
    return float(np.asarray(mask).mean())

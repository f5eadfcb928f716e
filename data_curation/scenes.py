"""Scene splitting of long videos with PySceneDetect (content or adaptive detector; no weights).

`detect_scenes` runs the configured detector over a video's bytes and returns its scenes as frame
spans `[start, end)` covering the whole clip (a clip without a cut is one scene). Each scene becomes
its own sample: `scene_uri` gives it a ledger key (the item's URI plus a media-fragment-style
`t=<start>,<end>` in seconds), `parent_uri` maps that key back to the listed item (so a refresh
knows the video was seen), and `scene_sample_id` derives its content hash from the video's and the
span, so two scenes of one video are two samples and the same scene curated twice is one.

`chunk_scenes` cuts a scene longer than the clip-length limit (`decode.max_seconds`, or a smaller
`filters.max_seconds`) into consecutive clips of equal length within it, each a sample of its own
(`scenes.chunk_long`, on by default; off, such a scene is one sample whose frames come from its first
`decode.max_seconds`, or which `filters.max_seconds` rejects as `duration`). The clips cover the
scene; only when no equal split keeps every clip at least `filters.min_seconds` long are the clips
of the full limit taken and the shorter rest left as a last clip, which the duration filter rejects
(so it is counted, not lost).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
import tempfile
from dataclasses import dataclass

from data_curation.config import SceneConfig
from data_curation.media import MediaError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLDS = {"content": 27.0, "adaptive": 3.0}
_FRAGMENT = re.compile(r"[#&]t=\d+(?:\.\d+)?,\d+(?:\.\d+)?$")


@dataclass(frozen=True)
class Scene:
    """Frames `[start, end)` of a clip at `fps`; `index`: the detected scene it belongs to, `part`
    and `parts`: its place among the clips that scene was cut into (0 of 1 when it was not cut)."""

    start: int
    end: int
    fps: float
    index: int = 0
    part: int = 0
    parts: int = 1

    @property
    def start_s(self) -> float:
        return self.start / self.fps

    @property
    def end_s(self) -> float:
        return self.end / self.fps

    @property
    def frames(self) -> int:
        return self.end - self.start


def make_detector(cfg: SceneConfig, fps: float):
    """The PySceneDetect detector `cfg` names; `min_scene_seconds` in frames at `fps`."""
    from scenedetect.detectors import AdaptiveDetector, ContentDetector

    threshold = cfg.threshold if cfg.threshold is not None else DEFAULT_THRESHOLDS[cfg.detector]
    min_len = max(1, round(cfg.min_scene_seconds * fps))
    if cfg.detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=min_len)
    return ContentDetector(threshold=threshold, min_scene_len=min_len)


def _frame(timecode) -> int:
    return int(timecode.frame_num)


def detect_scenes(data: bytes, cfg: SceneConfig, fps: float, num_frames: int) -> list[Scene]:
    """Scenes of a video (its bytes; `fps` and `num_frames` as the frame decoder reports them, which
    the spans are clipped to). Raises `MediaError("undecodable_video")` when the detector cannot read it."""
    import scenedetect

    with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            found = scenedetect.detect(tmp.name, make_detector(cfg, fps), start_in_scene=True)
        except Exception as exc:  # noqa: BLE001 - VideoOpenFailure and OpenCV errors alike
            raise MediaError("undecodable_video", f"scene detection: {type(exc).__name__}: {exc}"[:300]) from None
    cuts = sorted({_frame(start) for start, _ in found if 0 < _frame(start) < num_frames})
    bounds = [0, *cuts, num_frames]
    spans = [(a, b) for a, b in itertools.pairwise(bounds) if b > a]
    return [Scene(a, b, fps, i) for i, (a, b) in enumerate(spans)]


def chunk_scene(scene: Scene, max_seconds: float, min_seconds: float = 0.0) -> list[Scene]:
    """`scene` as consecutive clips of at most `max_seconds` (and, where the scene allows it, at
    least `min_seconds`) each; a scene within the limit is returned as it is."""
    if max_seconds <= 0:
        raise ValueError(f"max_seconds={max_seconds}: the clip-length limit must be positive")
    max_frames = max(1, math.floor(max_seconds * scene.fps + 1e-9))
    if scene.frames <= max_frames:
        return [scene]
    min_frames = math.ceil(min_seconds * scene.fps - 1e-9)
    parts = math.ceil(scene.frames / max_frames)
    if scene.frames // parts >= min_frames:  # equal clips, none longer than the limit
        bounds = [scene.start + round(i * scene.frames / parts) for i in range(parts + 1)]
    else:  # clips of the full limit, and the rest (shorter than the minimum) as the last one
        bounds = [*range(scene.start, scene.end, max_frames), scene.end]
    return [Scene(a, b, scene.fps, scene.index, i, len(bounds) - 1)
            for i, (a, b) in enumerate(itertools.pairwise(bounds))]


def chunk_scenes(scenes: list[Scene], max_seconds: float, min_seconds: float = 0.0) -> list[Scene]:
    """`chunk_scene` of every scene, in order."""
    return [clip for scene in scenes for clip in chunk_scene(scene, max_seconds, min_seconds)]


def scene_uri(uri: str, scene: Scene) -> str:
    """The ledger key of one scene of the item at `uri`."""
    return f"{uri}{'&' if '#' in uri else '#'}t={scene.start_s:.3f},{scene.end_s:.3f}"


def parent_uri(uri: str) -> str:
    """The listed item's URI of a scene's key (any other URI is returned as it is)."""
    return _FRAGMENT.sub("", uri)


def scene_sample_id(sample_id: str, start: int, end: int) -> str:
    """The content hash of the scene `[start, end)` of the item whose hash is `sample_id`."""
    return hashlib.sha256(f"{sample_id}:scene:{start}-{end}".encode()).hexdigest()[:32]

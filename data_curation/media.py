"""Decode and validate media and text: bytes -> RGB frames [F, H, W, 3] uint8, or a `MediaError`.

Images go through Pillow (EXIF orientation applied, any mode -> RGB, fully loaded so a truncated
file fails here rather than later). 16-bit greyscale is scaled to 8 bit (not clipped), transparency
is composited on a background colour (white by default). An animated image (GIF, WebP, APNG) is
never silently cut to its first frame: where the task wants a video it is decoded as one
(`decode_animated`: every frame shown for its own duration, sampled at the target fps like a video
file), where it wants a still it is refused (`animated_image`) or, when asked, kept as its first
frame with the number of frames dropped recorded on the result. A decoded-pixel limit (`max_pixels`,
per image or video frame) is checked from the header before any pixel is decoded (`too_many_pixels`);
Pillow's own decompression-bomb error, raised for far larger files, maps to the same reason. Videos go through decord, which reports fps and frame count;
frames are sampled at a target fps up to a maximum duration, the count forced to 4k+1 (what a
causal video VAE with temporal stride 4 needs: one first frame plus groups of four) and spread
uniformly over the clip. Every way an item can be unusable raises `MediaError` with a short reason
code; the pipeline turns it into a quarantine row, so one bad file never stops a job.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi")


TEXT_FIELDS = ("caption", "question", "answer")
DEFAULT_MAX_PIXELS = 40_000_000
WHITE = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ANIMATED_MODES = ("quarantine", "first_frame", "video")
# a frame delay of 10 ms or less (0 is common in GIFs) is shown for 100 ms, as browsers do
MIN_FRAME_SECONDS = 0.01
DEFAULT_FRAME_SECONDS = 0.1


@dataclass
class Fetched:
    """One item's raw bytes as read from its source, before decoding."""

    media: dict[str, tuple[bytes, str | None]]   # slot -> (bytes, "image" | "video" | None)
    text: dict[str, bytes | None]                # caption / question / answer as raw bytes

    def sample_id(self) -> str:
        h = hashlib.sha256()
        for slot in ("target", "source"):
            data = self.media.get(slot, (b"", None))[0]
            h.update(f"{slot}:{len(data)}:".encode())
            h.update(data)
        for name in TEXT_FIELDS:
            raw = self.text.get(name)
            h.update(f"{name}:{-1 if raw is None else len(raw)}:".encode())
            h.update(raw or b"")
        return h.hexdigest()[:32]


class MediaError(ValueError):
    """An item cannot be used; `reason` is the quarantine reason code, `detail` the human message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    """Frames [F, H, W, 3] uint8 plus what the source said about its timing (images: fps 0).
    `dropped_frames`: frames of an animated image that were left out to keep it a still."""

    frames: np.ndarray
    fps: float = 0.0
    source_frames: int = 1
    duration: float = 0.0
    dropped_frames: int = 0

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])


def media_kind(name: str) -> str | None:
    """"image", "video" or None from a file name's extension."""
    lower = name.lower()
    if lower.endswith(IMAGE_EXTENSIONS):
        return "image"
    if lower.endswith(VIDEO_EXTENSIONS):
        return "video"
    return None


def _check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    if max_pixels and width * height > max_pixels:
        raise MediaError("too_many_pixels", f"{what} is {width}x{height} = {width * height} pixels "
                                            f"(limit {max_pixels})")


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> RGB: 16/32-bit greyscale scaled to 8 bit, transparency composited on `background`."""
    if img.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.float64)
        # "I" holds whatever integer range the file had: treat it as 8 bit when it fits, else 16 bit
        scale = 1.0 if img.mode == "I" and grey.max(initial=0) <= 255 else 255.0 / 65535.0
        grey = np.clip(np.rint(grey * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or img.has_transparency_data:
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return img.convert("RGB")


def _check_image_bytes(data, what: str) -> None:
    if not data:
        raise MediaError("empty_file", f"zero-byte {what}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MediaError("wrong_type", f"{what} data is a {type(data).__name__}, expected bytes")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 background: tuple[int, int, int] = WHITE, animated: str = "quarantine") -> Decoded:
    """Image bytes -> one RGB frame; `max_pixels` (0 = no limit) is checked before decoding.
    An animated image is quarantined (`animated="quarantine"`), kept as its first frame with
    `dropped_frames` set (`"first_frame"`), or decoded as a video (`"video"`: see `decode_animated`,
    which this then calls with its defaults)."""
    if animated not in ANIMATED_MODES:
        raise ValueError(f"animated={animated!r}: expected one of {ANIMATED_MODES}")
    if animated == "video":
        return decode_animated(data, max_pixels=max_pixels, background=background)
    _check_image_bytes(data, "image")
    with _pillow_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(img.width, img.height, max_pixels, "image")
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and animated == "quarantine":
                raise MediaError("animated_image", f"{img.format} with {frames} frames: an animated image "
                                                   "is not curated as a still (convert it to a video, list "
                                                   "it as a video task, or set decode.animated_images: "
                                                   "first_frame)")
            img.seek(0)
            img.load()
            rgb = _to_rgb(ImageOps.exif_transpose(img), background)
    return Decoded(np.asarray(rgb)[None], dropped_frames=frames - 1)


def animation_sample(durations: list[float], target_fps: float, max_seconds: float) -> tuple[np.ndarray, float]:
    """(frame indices, fps) to sample an animation whose frames show for `durations` seconds: at
    most `target_fps` frames per second of its first `max_seconds`, the count forced down to 4k+1,
    at evenly spaced times (each index is the frame on screen then)."""
    ends = np.cumsum(durations)
    clip = min(float(ends[-1]), max_seconds)
    wanted = max(1, int(clip * target_fps + 1e-9))
    count = 1 + 4 * ((wanted - 1) // 4)
    times = np.arange(count) * (clip / count)
    indices = np.minimum(np.searchsorted(ends, times, side="right"), len(durations) - 1)
    return indices.astype(np.int64), (count / clip if count > 1 else 0.0)


def decode_animated(data: bytes, target_fps: float = 12.0, max_seconds: float = 6.0,
                    max_pixels: int = DEFAULT_MAX_PIXELS, background: tuple[int, int, int] = WHITE) -> Decoded:
    """An animated image's bytes -> sampled RGB frames, as a video: each frame shown for its own
    delay (10 ms or less counts as 100 ms), sampled by `animation_sample`; `duration` is the whole
    animation's. A still image is decoded as by `decode_image` (one frame, no duration)."""
    _check_image_bytes(data, "image")
    with _pillow_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(img.width, img.height, max_pixels, "image")
            count = getattr(img, "n_frames", 1)
            if count < 2:
                return decode_image(data, max_pixels, background)
            durations = []
            for i in range(count):
                img.seek(i)
                img.load()  # WebP reports a frame's delay once it is loaded
                ms = img.info.get("duration") or 0
                durations.append(ms / 1000 if ms / 1000 > MIN_FRAME_SECONDS else DEFAULT_FRAME_SECONDS)
            indices, fps = animation_sample(durations, target_fps, max_seconds)
            decoded: dict[int, np.ndarray] = {}
            for i in sorted(set(indices.tolist())):  # forward seeks only: GIF frames build on the last
                img.seek(i)
                img.load()
                decoded[i] = np.asarray(_to_rgb(ImageOps.exif_transpose(img), background))
    frames = np.stack([decoded[i] for i in indices.tolist()])
    return Decoded(frames, fps=fps, source_frames=count, duration=float(sum(durations)))


@contextlib.contextmanager
def _pillow_errors() -> Iterator[None]:
    """Pillow's exceptions -> `MediaError` with the quarantine reason (a MediaError passes through)."""
    try:
        yield
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError("too_many_pixels", str(exc)) from None
    except UnidentifiedImageError as exc:
        raise MediaError("undecodable_image", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated_image" if "truncated" in str(exc).lower() else "undecodable_image"
        raise MediaError(reason, str(exc)) from None


def sample_frame_indices(source_frames: int, fps: float, target_fps: float, max_seconds: float) -> np.ndarray:
    """Indices of the frames to keep: at most `target_fps` per second of the first `max_seconds`,
    never more than the clip has, count forced down to 4k+1, spread uniformly over the clip."""
    if source_frames < 1 or fps <= 0:
        raise MediaError("undecodable_video", f"video reports {source_frames} frames at {fps} fps")
    clip_frames = min(source_frames, max(1, round(max_seconds * fps)))
    wanted = min(clip_frames, max(1, int(clip_frames / fps * target_fps)))
    count = 1 + 4 * ((wanted - 1) // 4)
    return np.round(np.linspace(0, clip_frames - 1, count)).astype(np.int64)


def sampled_fps(indices: np.ndarray, fps: float) -> float:
    """The effective frame rate of uniformly spread `indices` of a clip at `fps`."""
    if len(indices) < 2:
        return 0.0
    return float((len(indices) - 1) * fps / (indices[-1] - indices[0]))


def decode_video(data: bytes, target_fps: float, max_seconds: float,
                 max_pixels: int = DEFAULT_MAX_PIXELS, span: tuple[int, int] | None = None) -> Decoded:
    """Video bytes -> sampled RGB frames; the first sampled frame is checked against `max_pixels`
    (0 = no limit) before the rest are decoded. `span`: frames `[start, end)` of one scene, which
    the frames are sampled from (and whose length is the duration); None = the whole clip."""
    if not data:
        raise MediaError("empty_file", "zero-byte video")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MediaError("wrong_type", f"video data is a {type(data).__name__}, expected bytes")
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
        source_frames, fps = len(reader), float(reader.get_avg_fps())
        start, end = span if span is not None else (0, source_frames)
        if not 0 <= start < end <= source_frames:
            raise MediaError("bad_scene_span", f"frames [{start}, {end}) of a {source_frames}-frame video")
        source_frames = end - start
        if source_frames < 2:  # no motion to measure: a clip, not a "static" video
            raise MediaError("too_short", f"{source_frames} frame: a video needs at least 2")
        indices = start + sample_frame_indices(source_frames, fps, target_fps, max_seconds)
        first = reader.get_batch(indices[:1].tolist()).asnumpy()
        _check_pixels(first.shape[2], first.shape[1], max_pixels, "video frame")
        frames = (np.concatenate([first, reader.get_batch(indices[1:].tolist()).asnumpy()])
                  if len(indices) > 1 else first)
    except decord.DECORDError as exc:
        raise MediaError("undecodable_video", str(exc).splitlines()[0]) from None
    except RuntimeError as exc:  # decord raises bare RuntimeErrors for unreadable containers
        raise MediaError("undecodable_video", str(exc).splitlines()[0][:200]) from None
    except AssertionError as exc:  # decord asserts a positive frame count
        raise MediaError("undecodable_video", str(exc)[:200]) from None
    return Decoded(frames, fps=sampled_fps(indices, fps), source_frames=source_frames,
                   duration=source_frames / fps)


def probe_video(data: bytes) -> tuple[int, float]:
    """(frame count, fps) of video bytes, as decord reports them (the frame indices of `span`)."""
    if not data:
        raise MediaError("empty_file", "zero-byte video")
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
        return len(reader), float(reader.get_avg_fps())
    except (decord.DECORDError, RuntimeError, AssertionError) as exc:
        raise MediaError("undecodable_video", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__) from None


def decode_media(data: bytes, kind: str, target_fps: float, max_seconds: float,
                 max_pixels: int = DEFAULT_MAX_PIXELS, background: tuple[int, int, int] = WHITE,
                 span: tuple[int, int] | None = None, animated: str = "quarantine") -> Decoded:
    """Image or video bytes -> `Decoded`; `span` (videos only): the scene's frames `[start, end)`;
    `animated` (images only): what an animated image becomes (`decode_image`), `"video"` sampled
    at `target_fps` up to `max_seconds` like a video file."""
    if kind == "image":
        if animated == "video":
            return decode_animated(data, target_fps, max_seconds, max_pixels, background)
        return decode_image(data, max_pixels, background, animated)
    if kind == "video":
        return decode_video(data, target_fps, max_seconds, max_pixels, span)
    raise MediaError("wrong_type", f"media kind {kind!r} is neither image nor video")


def check_size(decoded: Decoded, min_side: int, max_side: int) -> None:
    short, long = sorted((decoded.height, decoded.width))
    if short < min_side:
        raise MediaError("too_small", f"{decoded.width}x{decoded.height} has a side below {min_side} px")
    if long > max_side:
        raise MediaError("too_large", f"{decoded.width}x{decoded.height} has a side above {max_side} px")


def decode_text(raw: bytes | None, field_name: str, required: bool, max_chars: int) -> str | None:
    """UTF-8 text (stripped) or None; missing/empty when `required` and bad bytes are MediaErrors."""
    if raw is None or not raw.strip():
        if required:
            raise MediaError(f"missing_{field_name}", f"no {field_name} text")
        return None
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise MediaError(f"{field_name}_not_utf8", str(exc)) from None
    if len(text) > max_chars:
        raise MediaError(f"{field_name}_too_long", f"{len(text)} characters (limit {max_chars})")
    return text


def encode_pixels(frames: np.ndarray, is_video: bool, fps: float) -> bytes:
    """Frames [F, H, W, 3] uint8 -> PNG bytes (an image) or H.264 MP4 bytes at `fps` (a video): the
    optional `<slot>_pixels` of a shard row, for evaluation."""
    if not is_video:
        return encode_image(frames[0], "PNG")
    return encode_video(frames, fps)


def encode_image(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def encode_video(frames: np.ndarray, fps: float) -> bytes:
    """H.264 MP4 bytes (imageio-ffmpeg writes to a file, so go through a temporary one)."""
    import imageio.v2 as iio

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        writer = iio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1, ffmpeg_log_level="error",
                                output_params=["-crf", "18"], pixelformat="yuv420p")
        for frame in frames:
            writer.append_data(frame)
        writer.close()
        return path.read_bytes()

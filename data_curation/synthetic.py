"""Synthetic corpora for demos and tests: rendered text, so success is checkable (OCR can read the
text back), nothing is downloaded, and everything is deterministic for a seed.

- images of a word with the word as caption (t2i), short MP4s of a sliding word and a falling square
  (t2v), edit pairs "change the text to X" (i2i) and question/answer pairs about a sign (i2t):
  `synthetic_specs` + `render_item` feed the `synthetic` curation source with real PNG/MP4 bytes;
- `write_defect_corpus`: a folder corpus with one of each planted defect (truncated JPEG, zero-byte
  and garbage MP4, non-UTF-8 and missing captions, a too-small image, exact and near duplicates, a
  blurred image, a static video) and the outcome the curation must reach for every file.
"""
from __future__ import annotations

import io
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

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
    from data_curation.sources import Fetched

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


# ---------------------------------------------------------------------------------------- planted defects
@dataclass
class DefectCorpus:
    """A folder corpus with known outcomes: file name -> "curated" or the rejection reason."""

    root: Path
    outcomes: dict[str, str]

    def expected(self, outcome: str) -> list[str]:
        return sorted(name for name, o in self.outcomes.items() if o == outcome)


def write_defect_corpus(root: str | Path, height: int = 64, width: int = 96) -> DefectCorpus:
    """Write good items and one of each planted defect under `root` (captions.jsonl + sidecars).

    Rejection reasons: quarantine codes (`truncated_image`, `empty_file`, `undecodable_video`,
    `caption_not_utf8`, `missing_caption`, `too_small`), filters (`filter:blur`, `filter:static`)
    and dedup (`dedup:exact`, `dedup:near`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    outcomes: dict[str, str] = {}

    for i, word in enumerate(("OPEN", "STOP", "EXIT", "SALE")):
        (root / f"img_{i}.png").write_bytes(encode_image(render_text_image(word, height, width, seed=i)))
        records.append({"path": f"img_{i}.png", "caption": image_caption(word)})
        outcomes[f"img_{i}.png"] = "curated"
    # exact duplicate (same bytes + caption) and a resized near-duplicate of earlier images
    (root / "img_0_copy.png").write_bytes((root / "img_0.png").read_bytes())
    records.append({"path": "img_0_copy.png", "caption": image_caption("OPEN")})
    outcomes["img_0_copy.png"] = "dedup:exact"
    small = Image.open(root / "img_1.png").resize((width * 3 // 4, height * 3 // 4), Image.BICUBIC)
    small.save(root / "img_1_small.png")
    records.append({"path": "img_1_small.png", "caption": image_caption("STOP")})
    outcomes["img_1_small.png"] = "dedup:near"
    # videos: 24 fps x 2 s and 10 fps x 1.5 s (known frame counts after 12 fps / 4k+1 sampling)
    for name, word, fps, n in (("vid_0.mp4", "RAY", 24, 48), ("vid_1.mp4", "DATA", 10, 15)):
        (root / name).write_bytes(encode_video(render_moving_video(word, height, width, n, seed=n), fps))
        records.append({"path": name, "caption": video_caption(word)})
        outcomes[name] = "curated"
    # an edit pair and a question/answer pair
    (root / "edit_0_in.png").write_bytes(encode_image(render_text_image("CAFE", height, width, 7)))
    (root / "edit_0_out.png").write_bytes(encode_image(render_text_image("TAXI", height, width, 7)))
    records.append({"path": "edit_0_out.png", "source_path": "edit_0_in.png", "task": "i2i",
                    "caption": edit_caption("TAXI")})
    outcomes["edit_0_out.png"] = "curated"
    (root / "qa_0.png").write_bytes(encode_image(render_text_image("PARK", height, width, 8)))
    records.append({"path": "qa_0.png", "task": "i2t", "question": QUESTION, "answer": "PARK",
                    "caption": image_caption("PARK")})
    outcomes["qa_0.png"] = "curated"
    # quarantine
    good_jpeg = encode_image(render_text_image("HELLO", height, width, 9), "JPEG")
    (root / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    records.append({"path": "truncated.jpg", "caption": image_caption("HELLO")})
    outcomes["truncated.jpg"] = "truncated_image"
    (root / "empty.mp4").write_bytes(b"")
    records.append({"path": "empty.mp4", "caption": video_caption("GO")})
    outcomes["empty.mp4"] = "empty_file"
    (root / "garbage.mp4").write_bytes(bytes(random.Random(1).randrange(256) for _ in range(4096)))
    records.append({"path": "garbage.mp4", "caption": video_caption("GO")})
    outcomes["garbage.mp4"] = "undecodable_video"
    (root / "badcap.png").write_bytes(encode_image(render_text_image("LANCE", height, width, 10)))
    (root / "badcap.txt").write_bytes(b"a sign that says \xff\xfe LANCE")  # sidecar, not UTF-8
    outcomes["badcap.png"] = "caption_not_utf8"
    (root / "nocap.png").write_bytes(encode_image(render_text_image("GO", height, width, 11)))
    outcomes["nocap.png"] = "missing_caption"
    (root / "tiny.png").write_bytes(encode_image(render_text_image("GO", 8, 8, 12)))
    records.append({"path": "tiny.png", "caption": image_caption("GO")})
    outcomes["tiny.png"] = "too_small"
    # filters
    blurred = Image.fromarray(render_text_image("EXIT", height, width, 13)).filter(ImageFilter.GaussianBlur(6))
    blurred.save(root / "blurry.png")
    records.append({"path": "blurry.png", "caption": image_caption("EXIT")})
    outcomes["blurry.png"] = "filter:blur"
    still = np.repeat(render_text_image("HOLD", height, width, 14)[None], 24, axis=0)
    (root / "static.mp4").write_bytes(encode_video(still, 12))
    records.append({"path": "static.mp4", "caption": video_caption("HOLD")})
    outcomes["static.mp4"] = "filter:static"
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return DefectCorpus(root, outcomes)

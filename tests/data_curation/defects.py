"""A planted-defect folder corpus: one of each defect curation must quarantine or filter, with the
outcome expected for every file (truncated JPEG, zero-byte and garbage MP4, non-UTF-8 and missing
captions, a too-small image, exact and near duplicates, a blurred image, a static video, a
decompression bomb, an animated GIF, a task typo, a listed file missing on disk, a symlink out of the
corpus, caption-table lines that are not UTF-8 or not JSON), and a Parquet corpus with a bad-typed file."""
from __future__ import annotations

import json
import os
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from data_curation.media import encode_image, encode_video
from data_curation.synthetic import (
    QUESTION,
    edit_caption,
    image_caption,
    render_moving_video,
    render_text_image,
    video_caption,
)


@dataclass
class DefectCorpus:
    """A folder corpus with known outcomes: file name -> "curated" or the rejection reason."""

    root: Path
    outcomes: dict[str, str]

    def expected(self, outcome: str) -> list[str]:
        return sorted(name for name, o in self.outcomes.items() if o == outcome)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` 8-bit grey pixels but holds only a few rows of them: what
    a decompression bomb looks like to a reader that trusts the header (a few hundred bytes on disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1) * 2))
            + chunk(b"IEND", b""))


def animated_gif(height: int, width: int, frames: int = 3) -> bytes:
    import io

    images = [Image.fromarray(render_text_image(w, height, width, seed=20 + i)) for i, w in enumerate("ABC"[:frames])]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buf.getvalue()


def write_defect_corpus(root: str | Path, height: int = 64, width: int = 96) -> DefectCorpus:
    """Write good items and one of each planted defect under `root` (captions.jsonl + sidecars).

    Rejection reasons: quarantine codes (`truncated_image`, `empty_file`, `undecodable_video`,
    `caption_not_utf8`, `missing_caption`, `too_small`, `too_many_pixels`, `animated_image`,
    `unknown_task`, `missing_file`, `symlink_outside_source`, `caption_table_not_utf8`,
    `caption_table_bad_json`), filters (`filter:blur`, `filter:static`) and dedup (`dedup:exact`,
    `dedup:near`). Outcomes are keyed by file name; a caption-table line by `captions.jsonl#line=N`.
    The symlink's target lies in `<root>-outside/`."""
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
    # what used to stop the whole job: a 30000x30000 bomb, an animated GIF, a task typo, a listed file
    # that is not on disk, a symlink to a file outside the corpus
    (root / "bomb.png").write_bytes(png_header(30000, 30000))
    records.append({"path": "bomb.png", "caption": image_caption("BOOM")})
    outcomes["bomb.png"] = "too_many_pixels"
    (root / "anim.gif").write_bytes(animated_gif(height, width))
    records.append({"path": "anim.gif", "caption": image_caption("ABC")})
    outcomes["anim.gif"] = "animated_image"
    (root / "typo.png").write_bytes(encode_image(render_text_image("TYPO", height, width, 15)))
    records.append({"path": "typo.png", "task": "T2I", "caption": image_caption("TYPO")})
    outcomes["typo.png"] = "unknown_task"
    records.append({"path": "gone.png", "caption": image_caption("GONE")})
    outcomes["gone.png"] = "missing_file"
    outside = root.with_name(root.name + "-outside")
    outside.mkdir(exist_ok=True)
    (outside / "secret.png").write_bytes(encode_image(render_text_image("KEYS", height, width, 16)))
    os.symlink(outside / "secret.png", root / "outside.png")
    records.append({"path": "outside.png", "caption": image_caption("KEYS")})
    outcomes["outside.png"] = "symlink_outside_source"
    lines = [json.dumps(r).encode() for r in records]
    # two unusable caption-table lines: quarantined by line number, every other line kept
    lines.append('{"path": "caf\u00e9.png", "caption": "a caf\u00e9"}'.encode("latin-1"))
    outcomes[f"captions.jsonl#line={len(lines)}"] = "caption_table_not_utf8"
    lines.append(b'{"path": "half.png", "caption": ')
    outcomes[f"captions.jsonl#line={len(lines)}"] = "caption_table_bad_json"
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return DefectCorpus(root, outcomes)


def write_defect_parquet(root: str | Path, height: int = 64, width: int = 96) -> dict[str, str]:
    """A t2i Parquet corpus under `root`: `good.parquet` (two rows that curate) and `bad.parquet`,
    whose `image_bytes` column is int64 (both its rows are `wrong_column_type`). Returns the outcome
    per `<file>#rg=0&row=<n>`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    words = ("PIER", "YARD")
    good = pa.table({"caption": [image_caption(w) for w in words],
                     "image_bytes": [encode_image(render_text_image(w, height, width, seed=30 + i))
                                     for i, w in enumerate(words)]})
    pq.write_table(good, root / "good.parquet")
    pq.write_table(pa.table({"caption": [image_caption("NUMBER"), image_caption("COUNT")],
                             "image_bytes": pa.array([7, 8], pa.int64())}), root / "bad.parquet")
    return {"good.parquet#rg=0&row=0": "curated", "good.parquet#rg=0&row=1": "curated",
            "bad.parquet#rg=0&row=0": "wrong_column_type", "bad.parquet#rg=0&row=1": "wrong_column_type"}

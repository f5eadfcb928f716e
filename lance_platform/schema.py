"""The curated shard format (DATA.md §3): versioned Parquet, one row per training sample.

This module is the contract between curation (writer) and training (reader):
- `shard_schema()`: the Arrow schema of schema version `SCHEMA_VERSION`;
- tensors (VAE posterior means, ViT tokens) are stored as raw bf16 bytes with their shape;
- the schema version, the encoder description and the tokenizer record (`tokenizer_record`: name,
  vocabulary size, fingerprint) live in the Parquet key-value metadata; a reader refuses a shard
  whose version it does not know, naming both versions, and `check_tokenizer` refuses token ids
  made by another tokenizer than the reader's, naming both;
- a shard listed in a curated dataset's `manifest.json` (`<root>/shards/<name>.parquet`) is checked
  against the manifest's sha256 before it is read (`verify_shard`, called by `check_version` and
  `read_shard`): once per file per process (cached by path, size and mtime), streaming the file; a
  mismatch raises `ShardChecksumError` naming the file;
- `row_to_sample` turns a row into the `lance_model` sample the packer consumes, with the stored
  caption / question / answer token ids (the text is not tokenized again).

Latent layout on disk: [t, h, w, c] (channels last, as DATA.md writes the shape), converted to the
model's [c, t, h, w] on read. ViT tokens: [n, d] merged tokens with the ViT patch grid (t, h, w).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lance_model.sequence import Sample, Visual
from lance_platform.config import ConfigError
from lance_platform.files import atomic_target

SCHEMA_VERSION = 1
VERSION_KEY = b"lance.schema_version"
ENCODER_KEY = b"lance.encoder"
TOKENIZER_KEY = b"lance.tokenizer"

SHARD_TASKS = ("t2i", "t2v", "i2v", "i2i", "v2v", "i2t", "v2t")
# shard task -> model task
MODEL_TASK = {"t2i": "t2i", "t2v": "t2v", "i2v": "i2v", "i2i": "image_edit", "v2v": "video_edit",
              "i2t": "i2t", "v2t": "v2t"}
SLOTS = ("target", "source")
MANIFEST_NAME = "manifest.json"

log = logging.getLogger(__name__)


class SchemaVersionError(ValueError):
    """A shard was written with a schema version this reader does not know."""


class ShardChecksumError(ValueError):
    """A shard file's bytes do not match the sha256 (or size) its dataset manifest recorded."""

    def __init__(self, path: str | Path, detail: str) -> None:
        super().__init__(f"corrupt shard {path}: {detail}")
        self.path = str(path)


class TokenizerMismatchError(ConfigError):
    """Stored token ids were made by another tokenizer than the one that would read them."""


def shard_schema() -> pa.Schema:
    ints = pa.list_(pa.int32())
    fields = [
        ("sample_id", pa.string()), ("task", pa.string()), ("source_uri", pa.string()),
        ("caption", pa.string()), ("caption_ids", ints),
        ("question", pa.string()), ("question_ids", ints),
        ("answer", pa.string()), ("answer_ids", ints),
        ("height", pa.int32()), ("width", pa.int32()), ("num_frames", pa.int32()), ("fps", pa.float32()),
        ("bucket", pa.string()),
    ]
    for slot in SLOTS:
        fields += [
            (f"{slot}_vae_latent", pa.binary()), (f"{slot}_vae_shape", ints),
            (f"{slot}_vae_logvar", pa.binary()),
            (f"{slot}_vit_tokens", pa.binary()), (f"{slot}_vit_shape", ints), (f"{slot}_vit_grid", ints),
            (f"{slot}_pixels", pa.binary()),
        ]
    fields += [("blur_score", pa.float32()), ("motion_score", pa.float32())]
    # optional, null when unused (a shard written before them reads the same): the scene's span in
    # its source video (scene splitting), and the caption a curation model replaced plus that model
    fields += [("start_s", pa.float64()), ("end_s", pa.float64()),
               ("caption_original", pa.string()), ("caption_model", pa.string())]
    return pa.schema([pa.field(name, typ, nullable=True) for name, typ in fields])


# ---------------------------------------------------------------------------------------- tensors
def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bf16 bytes (row-major)."""
    return t.detach().to(torch.bfloat16).contiguous().cpu().view(torch.int16).numpy().tobytes()


def bytes_to_tensor(data: bytes, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    arr = np.frombuffer(data, dtype=np.int16)
    expected = int(np.prod(shape)) if len(shape) else 1
    if arr.size != expected:
        raise ValueError(f"tensor bytes hold {arr.size} bf16 values; shape {tuple(shape)} needs {expected}")
    return torch.from_numpy(arr.copy()).view(torch.bfloat16).reshape(tuple(shape))


# ---------------------------------------------------------------------------------------- files
def write_shard(rows: list[dict[str, Any]] | pa.Table, path: str | Path, encoder: dict | None = None,
                tokenizer: dict | None = None) -> Path:
    """Atomically write one shard (temporary name, then rename). Missing columns are null.
    `tokenizer`: the `tokenizer_record` of the tokenizer that made the rows' `*_ids`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = shard_schema()
    if isinstance(rows, pa.Table):
        table = rows.select([n for n in schema.names if n in rows.column_names])
        missing = [n for n in schema.names if n not in table.column_names]
        for n in missing:
            table = table.append_column(schema.field(n), pa.nulls(len(table), schema.field(n).type))
        table = table.select(schema.names).cast(schema)
    else:
        unknown = sorted({k for r in rows for k in r} - set(schema.names))
        if unknown:
            raise ValueError(f"unknown shard columns: {unknown}")
        table = pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)
    meta = {VERSION_KEY: str(SCHEMA_VERSION).encode(), ENCODER_KEY: json.dumps(encoder or {}).encode()}
    if tokenizer is not None:
        meta[TOKENIZER_KEY] = json.dumps(tokenizer, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def shard_version(path: str | Path) -> int | None:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(VERSION_KEY)
    return int(raw) if raw is not None else None


# ---------------------------------------------------------------------------------------- checksums
_verified: dict[str, tuple[int, int, str]] = {}       # real path -> (size, mtime_ns, sha256) verified
_manifests: dict[str, tuple[int, int, dict]] = {}     # manifest path -> (size, mtime_ns, {rel: entry})
_lock = threading.Lock()


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks (never whole into memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_entries(manifest: Path) -> dict[str, dict]:
    st = manifest.stat()
    key = str(manifest)
    with _lock:
        cached = _manifests.get(key)
    if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
        return cached[2]
    data = json.loads(manifest.read_text())
    entries = {e["path"]: e for e in data.get("shards", []) if isinstance(e, dict) and "path" in e}
    with _lock:
        _manifests[key] = (st.st_size, st.st_mtime_ns, entries)
    return entries


def manifest_entry(path: str | Path) -> dict | None:
    """The manifest entry ({path, rows, bytes, sha256, ...}) of a shard of a curated dataset: from
    the `manifest.json` of the shard's directory or the one above it that lists the file; else None."""
    path = Path(path).absolute()
    for root in (path.parent, path.parent.parent):
        manifest = root / MANIFEST_NAME
        if manifest.is_file():
            entry = _manifest_entries(manifest).get(path.relative_to(root).as_posix())
            if entry is not None:
                return entry
    return None


def verify_shard(path: str | Path, sha256: str | None = None, size: int | None = None) -> bool:
    """Check a shard file against its expected sha256 (and size): the ones given, else those of the
    manifest that lists it. False when there is nothing to check against, True when the file matches;
    `ShardChecksumError` naming the file when it does not. Each file is hashed once per process while
    its size and mtime stay the same."""
    if sha256 is None:
        entry = manifest_entry(path)
        if entry is None or not entry.get("sha256"):
            return False
        sha256, size = entry["sha256"], entry.get("bytes")
    real = os.path.realpath(path)
    st = os.stat(real)
    with _lock:
        done = _verified.get(real)
    if done == (st.st_size, st.st_mtime_ns, sha256):
        return True
    if size is not None and st.st_size != size:
        raise ShardChecksumError(path, f"{st.st_size} bytes, the manifest recorded {size}")
    found = sha256_file(real)
    if found != sha256:
        raise ShardChecksumError(path, f"sha256 {found} does not match the manifest's {sha256}")
    with _lock:
        _verified[real] = (st.st_size, st.st_mtime_ns, sha256)
    log.debug("verified shard %s (sha256 %s)", path, sha256[:16])
    return True


def check_version(path: str | Path) -> None:
    """Refuse a shard that is corrupt (`verify_shard`) or of a schema version this reader does not know."""
    verify_shard(path)
    found = shard_version(path)
    if found != SCHEMA_VERSION:
        raise SchemaVersionError(f"{path}: shard schema version {found} is not supported by this reader "
                                 f"(reader version {SCHEMA_VERSION})")


def read_shard(path: str | Path) -> pa.Table:
    check_version(path)
    return pq.read_table(path)


def shard_encoder(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(ENCODER_KEY, b"{}"))


def shard_tokenizer(path: str | Path) -> dict | None:
    """The tokenizer record a shard was written with (None for a shard without one)."""
    raw = (pq.read_schema(path).metadata or {}).get(TOKENIZER_KEY)
    return json.loads(raw) if raw is not None else None


def describe_tokenizer(record: dict) -> str:
    return f"{record.get('name')!r} (vocab {record.get('vocab_size')}, fingerprint {record.get('fingerprint')})"


def check_tokenizer(stored: dict, expected: dict, where: str, reader: str) -> None:
    """Raise `TokenizerMismatchError` unless `stored` and `expected` are the same tokenizer
    (same vocabulary size and fingerprint; the name is only for the message)."""
    same = all(stored.get(k) == expected.get(k) for k in ("vocab_size", "fingerprint"))
    if not same:
        raise TokenizerMismatchError(
            f"{where}: token ids were made with tokenizer {describe_tokenizer(stored)}, but {reader} uses "
            f"tokenizer {describe_tokenizer(expected)}; curate the data again with this model's tokenizer "
            "or train with the model the data was curated for")


# ---------------------------------------------------------------------------------------- rows
def row_visual(row: dict[str, Any], slot: str) -> Visual | None:
    lat, vit = row.get(f"{slot}_vae_latent"), row.get(f"{slot}_vit_tokens")
    if lat is None and vit is None:
        return None
    visual = Visual()
    if lat is not None:
        shape = row[f"{slot}_vae_shape"]  # t, h, w, c
        visual.latent = bytes_to_tensor(lat, shape).permute(3, 0, 1, 2).float()
        visual.latent_shape = tuple(int(s) for s in shape[:3])
    if vit is not None:
        visual.vit_tokens = bytes_to_tensor(vit, row[f"{slot}_vit_shape"]).float()
        visual.vit_grid = tuple(int(g) for g in row[f"{slot}_vit_grid"])
    return visual


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def vit_patches_from_pixels(row: dict[str, Any], slot: str, vit) -> torch.Tensor:
    """The ViT input patches of a row's stored image (`<slot>_pixels`, PNG), at the size of its
    stored ViT grid: what a trainable tower (`vit.trainable`) runs on in the forward, instead of the
    frozen tower's tokens that curation stored. `vit`: the model's `VitConfig`."""
    from PIL import Image

    from lance_model.encoders.vit import vit_patches

    data = row.get(f"{slot}_pixels")
    name = f"shard row {row.get('sample_id')}"
    if data is None:
        raise ValueError(f"{name}: the model's ViT is trainable (vit.trainable), so it reads the stored pixels, but "
                         f"the row has no {slot}_pixels: curate with output.store_pixels: true")
    if not bytes(data[:8]) == PNG_SIGNATURE:
        raise ValueError(f"{name}: {slot}_pixels is a video; a trainable ViT reads stored images only")
    import io

    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    frames = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255.0
    grid = [int(g) for g in row[f"{slot}_vit_grid"]]
    size = (grid[1] * vit.patch_size, grid[2] * vit.patch_size)
    if tuple(frames.shape[2:]) != size:  # the VAE copy, when the row stored that one
        frames = torch.nn.functional.interpolate(frames, size=size, mode="bicubic", antialias=True,
                                                 align_corners=False).clamp(0, 1)
    return vit_patches(frames, vit)[0]


def _ids(row: dict[str, Any], name: str) -> list[int] | None:
    ids = row.get(f"{name}_ids")
    return None if ids is None else [int(i) for i in ids]


def row_to_sample(row: dict[str, Any], vit=None) -> Sample:
    """A shard row -> `lance_model.sequence.Sample`, carrying the stored token ids of its text
    (a row without `*_ids`, e.g. one written by hand, leaves them to the builder's tokenizer).
    `vit`: the model's `VitConfig`; when its tower is trainable, every visual's ViT input is the
    patches of the stored pixels (`vit_patches_from_pixels`), not the stored tokens.

    i2t / v2t: as the official x2t data path builds its prompt, the row's `caption` (the instruction,
    official `caption_i`) is the system prompt, the `question` (`caption_q`, may be empty) the user
    text after the visual and the `answer` (`caption_a`) the target; a row without an instruction
    keeps the model's default caption prompt. i2v: the target's first latent frame is clean and
    `source` holds the first frame's latent."""
    task = row["task"]
    if task not in MODEL_TASK:
        raise ValueError(f"shard row {row.get('sample_id')}: task={task!r}, expected one of {SHARD_TASKS}")
    model_task = MODEL_TASK[task]
    target, source = row_visual(row, "target"), row_visual(row, "source")
    if vit is not None and vit.trainable:
        for slot, visual in (("target", target), ("source", source)):
            if visual is not None and visual.vit_tokens is not None:
                visual.vit_patches, visual.vit_tokens = vit_patches_from_pixels(row, slot, vit), None
    if model_task in ("i2t", "v2t"):
        answer_ids = _ids(row, "answer") if row.get("answer") is not None else None
        instruction = row.get("caption") or None
        return Sample(model_task, row.get("question") or "", answer=row.get("answer"), source=source or target,
                      system=instruction, caption_ids=_ids(row, "question") if row.get("question") else None,
                      answer_ids=answer_ids, system_ids=_ids(row, "caption") if instruction else None)
    if model_task == "i2v" and target is not None:
        target.clean_frames = 1
    return Sample(model_task, row.get("caption") or "", target=target, source=source,
                  caption_ids=_ids(row, "caption"))

"""Exact and near-duplicate removal, within a run and against everything curated before.

Exact duplicates share a `sample_id` (the content hash of media bytes + text). Near duplicates (a
resized or re-encoded copy) share most bits of a 64-bit perceptual hash: the signs of the
low-frequency 8x8 DCT coefficients of a 32x32 grey thumbnail relative to their median. Two items of
the same task whose hashes differ in at most `hamming_threshold` bits are near duplicates.

Dedup is a global decision, so it runs on the driver over the (small) per-item metadata of the
inspect pass, in a canonical order (source URI): the first item of a group is kept, which makes the
result independent of Ray's scheduling and identical for a crashed-and-resumed refresh. Comparison
is brute force over the kept hashes of a task (vectorised popcount): fine for millions of
comparisons; a banded index would be the next step for much larger refreshes.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_curation.config import DedupConfig
from data_curation.filters import grey

HASH_SIZE = 8
THUMB_SIZE = 32


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT = _dct_matrix(THUMB_SIZE)


def perceptual_hash(frames: np.ndarray) -> int:
    """64-bit DCT hash of the middle frame of [F, H, W, 3] uint8 frames (as a signed int64 value)."""
    frame = frames[len(frames) // 2]
    thumb = Image.fromarray(frame).resize((THUMB_SIZE, THUMB_SIZE), Image.LANCZOS)
    coeffs = _DCT @ grey(np.asarray(thumb)[None])[0] @ _DCT.T
    low = coeffs[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = low > np.median(low[1:])
    value = int(np.packbits(bits).view(">u8")[0])
    return value - (1 << 64) if value >= 1 << 63 else value


def hamming(a: np.ndarray, b: int) -> np.ndarray:
    """Bit distances between int64 hashes `a` and one hash `b`."""
    x = np.bitwise_xor(a.astype(np.int64), np.int64(b)).view(np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


@dataclass
class Candidate:
    key: str          # canonical order (source URI)
    sample_id: str
    task: str
    phash: int


def find_duplicates(items: list[Candidate], cfg: DedupConfig,
                    curated_before: list[Candidate]) -> dict[str, tuple[str, str]]:
    """{key: (reason, kept sample_id)} for the items to drop; reason is "exact" or "near".

    `curated_before` holds what earlier runs curated (from the ledger); it always wins."""
    kept_ids = {c.sample_id for c in curated_before}
    kept: dict[str, list[Candidate]] = defaultdict(list)
    for c in curated_before:
        kept[c.task].append(c)
    out: dict[str, tuple[str, str]] = {}
    for item in sorted(items, key=lambda c: c.key):
        if cfg.exact and item.sample_id in kept_ids:
            out[item.key] = ("exact", item.sample_id)
            continue
        if cfg.near and kept[item.task]:
            dist = hamming(np.array([c.phash for c in kept[item.task]], dtype=np.int64), item.phash)
            j = int(dist.argmin())
            if dist[j] <= cfg.hamming_threshold:
                out[item.key] = ("near", kept[item.task][j].sample_id)
                continue
        kept_ids.add(item.sample_id)
        kept[item.task].append(item)
    return out

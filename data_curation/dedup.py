"""Exact and near-duplicate removal, within a run and against everything curated before.

Exact duplicates share a `sample_id` (the content hash of media bytes + text). Near duplicates (a
resized or re-encoded copy) share most bits of a 64-bit perceptual hash: the signs of the
low-frequency 8x8 DCT coefficients of a 32x32 grey thumbnail relative to their median. Two items of
the same task whose hashes differ in at most `hamming_threshold` bits are near duplicates.

Dedup is a global decision, so it runs on the driver over the (small) per-item metadata of the
inspect pass, in a canonical order (source URI): the first item of a group is kept, which makes the
result independent of Ray's scheduling and identical for a crashed-and-resumed refresh.

Lookup is sub-linear in the number of kept hashes (`NearDuplicateIndex`, one per task): the 64 bits
are cut into m bands and band b is given a probe radius r_b with sum(r_b + 1) = threshold + 1. Two
hashes within the threshold then agree on some band b up to r_b bits (pigeonhole: were every band
at least r_b + 1 bits apart, the hashes would be more than the threshold apart), so probing, in
every band, all values within r_b bits of the query's band finds EVERY kept hash within the
threshold; candidates are then verified exactly. With r_b = 0 this is plain LSH banding (m =
threshold + 1 bands must match exactly); wider bands with a radius (multi-index hashing) keep the
candidates few when millions of hashes are kept. m is chosen from a cost model (probes + expected
candidates for uniform hashes) for the index's size, and re-chosen as it grows; a small index is
scanned linearly. The result is exactly the brute-force one: the nearest kept hash within the
threshold, ties to the earliest kept.
"""
from __future__ import annotations

import itertools
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_curation.config import DedupConfig
from data_curation.filters import grey

log = logging.getLogger(__name__)

HASH_SIZE = 8
THUMB_SIZE = 32
HASH_BITS = 64


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


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).astype(np.int64)
    return np.unpackbits(np.ascontiguousarray(x).view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def hamming(a: np.ndarray, b: int) -> np.ndarray:
    """Bit distances between int64 hashes `a` and one hash `b`."""
    x = np.bitwise_xor(np.asarray(a).astype(np.int64), np.int64(b)).view(np.uint64)
    return _popcount(x)


def _as_uint64(phash: int) -> int:
    if isinstance(phash, (bool, float)) or not isinstance(phash, (int, np.integer)):
        raise TypeError(f"perceptual hash {phash!r}: expected a 64-bit integer")
    phash = int(phash)
    if not -(1 << 63) <= phash < 1 << 64:
        raise ValueError(f"perceptual hash {phash}: outside the 64-bit range")
    return phash & ((1 << 64) - 1)


def _as_uint64_array(phashes: Iterable[int]) -> np.ndarray:
    """Many hashes (signed or unsigned 64-bit ints, or an int64/uint64 array) as a uint64 array."""
    if isinstance(phashes, np.ndarray) and phashes.dtype in (np.int64, np.uint64):
        return phashes.astype(phashes.dtype, copy=True).view(np.uint64)
    items = list(phashes)
    if all(type(h) is int for h in items):  # fast path; bool/float/str go through the named checks
        for dtype in (np.int64, np.uint64):
            try:
                return np.array(items, dtype=dtype).view(np.uint64)
            except OverflowError:
                continue
    return np.array([_as_uint64(h) for h in items], dtype=np.uint64)


# ------------------------------------------------------------------------------- the band index
@dataclass(frozen=True)
class BandPlan:
    """Bands (bit offset, width) and each band's probe radius; sum(radius + 1) = threshold + 1."""

    bands: tuple[tuple[int, int], ...]
    radii: tuple[int, ...]

    def probes(self) -> int:
        return sum(_ball(w, r) for (_, w), r in zip(self.bands, self.radii))


def _ball(width: int, radius: int) -> int:
    """Number of `width`-bit values within `radius` bits of a given one."""
    return sum(math.comb(width, i) for i in range(min(radius, width) + 1))


# Costs in units of one hash of a linear scan (vectorised popcount), from benchmarks/bench_dedup.py
# on CPU: an index lookup's fixed overhead (a dozen numpy calls, about a 5,000-hash scan), a probed
# band value (two binary searches) and a candidate (gathered, de-duplicated, compared).
LOOKUP_COST = 5000.0
PROBE_COST = 3.0
CANDIDATE_COST = 3.0
MAX_PROBES = 1 << 16  # never enumerate more probe values than this per lookup


def plan_for(threshold: int, size: int, bits: int = HASH_BITS) -> BandPlan | None:
    """The cheapest exact band plan for `size` kept hashes, or None when a linear scan is cheaper."""
    best, best_cost = None, float(size)
    for m in range(1, min(threshold + 1, bits) + 1):
        widths = [bits // m + (1 if b < bits % m else 0) for b in range(m)]
        spare = threshold + 1 - m  # radius to spread: sum(r_b) = threshold + 1 - m
        radii = [spare // m + (1 if b < spare % m else 0) for b in range(m)]
        starts = list(itertools.accumulate([0] + widths[:-1]))
        plan = BandPlan(tuple(zip(starts, widths)), tuple(radii))
        probes = plan.probes()
        if probes > MAX_PROBES:
            continue
        candidates = size * sum(_ball(w, r) / 2.0 ** w for w, r in zip(widths, radii))
        cost = LOOKUP_COST + PROBE_COST * probes + CANDIDATE_COST * candidates
        if cost < best_cost:
            best, best_cost = plan, cost
    return best


def _flip_masks(width: int, radius: int) -> np.ndarray:
    """All `width`-bit XOR masks with at most `radius` bits set (uint64), the zero mask first."""
    masks = [0]
    for r in range(1, min(radius, width) + 1):
        masks += [sum(1 << i for i in combo) for combo in itertools.combinations(range(width), r)]
    return np.array(masks, dtype=np.uint64)


class NearDuplicateIndex:
    """Kept 64-bit hashes; `nearest(h)` = (id, distance) of the nearest within `threshold` bits.

    Ids are insertion indexes; ties go to the smallest id (as a linear scan in insertion order).
    Every band value is stored under one key (band index in the high bits, so all bands share one
    table): the hashes present at the last rebuild in a sorted array (binary search), those added
    since in a dict. The index is rebuilt, its plan re-chosen for the new size, when the dict part
    outgrows a quarter of the sorted part. `comparisons` counts the exact candidate checks,
    `probes` the band values looked up, `lookups` the calls of `nearest`."""

    REBUILD_MIN = 4096

    def __init__(self, threshold: int) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)):
            raise TypeError(f"hamming threshold {threshold!r}: expected an int")
        if not 0 <= threshold <= HASH_BITS:
            raise ValueError(f"hamming threshold {threshold}: expected 0..{HASH_BITS}")
        self.threshold = int(threshold)
        self._hashes = np.empty(1024, dtype=np.uint64)
        self._n = 0
        self.plan: BandPlan | None = None
        self._indexed = 0  # ids below this are in the sorted arrays
        self._keys = np.empty(0, dtype=np.uint64)
        self._ids = np.empty(0, dtype=np.int64)
        self._recent: dict[int, list[int]] = {}
        self.comparisons = self.probes = self.lookups = 0

    def __len__(self) -> int:
        return self._n

    @property
    def hashes(self) -> np.ndarray:
        """The kept hashes (uint64, by id)."""
        return self._hashes[:self._n]

    def _reserve(self, extra: int) -> None:
        if self._n + extra > len(self._hashes):
            grown = np.empty(max(2 * len(self._hashes), self._n + extra), dtype=np.uint64)
            grown[:self._n] = self._hashes[:self._n]
            self._hashes = grown

    def _band_keys(self, values: np.ndarray) -> np.ndarray:
        """[len(values), bands] keys: band index in the high bits over the band's value."""
        return ((values[:, None] >> self._starts) & self._widths) | self._prefix

    def _rebuild(self) -> None:
        self.plan = plan_for(self.threshold, self._n)
        self._recent = {}
        if self.plan is None:
            self._keys, self._ids = np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        else:
            m = len(self.plan.bands)
            shift = max(w for _, w in self.plan.bands)
            self._starts = np.array([a for a, _ in self.plan.bands], dtype=np.uint64)
            self._widths = np.array([(1 << w) - 1 for _, w in self.plan.bands], dtype=np.uint64)
            self._prefix = np.array([b << shift if m > 1 else 0 for b in range(m)], dtype=np.uint64)
            masks = [_flip_masks(w, r) for (_, w), r in zip(self.plan.bands, self.plan.radii)]
            self._masks = np.concatenate(masks)
            self._ball = np.array([len(x) for x in masks])
            keys = self._band_keys(self.hashes).ravel()
            order = np.argsort(keys, kind="stable")
            self._keys = keys[order]
            self._ids = (order // m).astype(np.int64)
        self._indexed = self._n
        log.debug("near-dup index: %d hashes, threshold %d, plan %s", self._n, self.threshold, self.plan)

    def extend(self, phashes: Iterable[int]) -> None:
        """Add many hashes (ids continue from len(self)); the index is rebuilt once."""
        values = _as_uint64_array(phashes)
        self._reserve(len(values))
        self._hashes[self._n:self._n + len(values)] = values
        self._n += len(values)
        self._rebuild()

    def add(self, phash: int) -> int:
        """Add one hash; returns its id."""
        value = _as_uint64(phash)
        self._reserve(1)
        idx = self._n
        self._hashes[idx] = value
        self._n += 1
        if self._n - self._indexed > max(self.REBUILD_MIN, self._indexed // 4):
            self._rebuild()
        elif self.plan is not None:
            for key in self._band_keys(np.array([value], dtype=np.uint64))[0].tolist():
                self._recent.setdefault(key, []).append(idx)
        return idx

    def _candidates(self, value: np.uint64) -> np.ndarray:
        if self.plan is None:
            return np.arange(self._n, dtype=np.int64)
        probe = np.repeat(self._band_keys(np.array([value], dtype=np.uint64))[0], self._ball) ^ self._masks
        self.probes += len(probe)
        lo = np.searchsorted(self._keys, probe, side="left")
        counts = np.searchsorted(self._keys, probe, side="right") - lo
        total = int(counts.sum())
        found = []
        if total:
            hit = counts > 0
            lo, counts = lo[hit], counts[hit]
            found.append(self._ids[np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)])
        if self._recent:
            extra = [i for key in probe.tolist() for i in self._recent.get(key, ())]
            if extra:
                found.append(np.array(extra, dtype=np.int64))
        if not found:
            return np.empty(0, dtype=np.int64)
        # One probe's ids come sorted (stable sort); several probes or parts need merging.
        return found[0] if len(found) == 1 and len(probe) == 1 else np.unique(np.concatenate(found))

    def nearest(self, phash: int) -> tuple[int, int] | None:
        """(id, distance) of the nearest kept hash within the threshold (smallest id on ties), or None."""
        value = np.uint64(_as_uint64(phash))
        self.lookups += 1
        cand = self._candidates(value)
        self.comparisons += len(cand)
        if not len(cand):
            return None
        dist = _popcount(self._hashes[cand] ^ value)
        j = int(dist.argmin())  # candidates are sorted by id: the first minimum is the earliest kept
        return (int(cand[j]), int(dist[j])) if dist[j] <= self.threshold else None


@dataclass
class Candidate:
    key: str          # canonical order (source URI)
    sample_id: str
    task: str
    phash: int


def find_duplicates(items: list[Candidate], cfg: DedupConfig,
                    curated_before: list[Candidate]) -> dict[str, tuple[str, str]]:
    """{key: (reason, kept sample_id)} for the items to drop; reason is "exact" or "near".

    `curated_before` holds what earlier runs curated (from the ledger); it always wins. Near
    duplicates are looked up in a `NearDuplicateIndex` per task (sub-linear in the kept hashes)."""
    kept_ids = {c.sample_id for c in curated_before}
    kept: dict[str, list[Candidate]] = defaultdict(list)
    for c in curated_before:
        kept[c.task].append(c)
    index: dict[str, NearDuplicateIndex] = {}
    if cfg.near:
        for task, cands in kept.items():
            index[task] = NearDuplicateIndex(cfg.hamming_threshold)
            index[task].extend(c.phash for c in cands)
    out: dict[str, tuple[str, str]] = {}
    for item in sorted(items, key=lambda c: c.key):
        if cfg.exact and item.sample_id in kept_ids:
            out[item.key] = ("exact", item.sample_id)
            continue
        if cfg.near:
            task_index = index.setdefault(item.task, NearDuplicateIndex(cfg.hamming_threshold))
            hit = task_index.nearest(item.phash)
            if hit is not None:
                out[item.key] = ("near", kept[item.task][hit[0]].sample_id)
                continue
            task_index.add(item.phash)
        kept_ids.add(item.sample_id)
        kept[item.task].append(item)
    return out

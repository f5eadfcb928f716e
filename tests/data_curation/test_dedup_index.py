"""The near-duplicate band index: exactly the brute-force result, and sub-linear candidate counts."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from data_curation.config import DedupConfig
from data_curation.dedup import (
    Candidate,
    NearDuplicateIndex,
    find_duplicates,
    plan_for,
)


def brute_force_duplicates(items: list[Candidate], cfg: DedupConfig,
                           curated_before: list[Candidate]) -> dict[str, tuple[str, str]]:
    """The reference: a linear scan over every kept hash of the task, nearest first, earliest on ties."""
    kept_ids = {c.sample_id for c in curated_before}
    kept: dict[str, list[Candidate]] = defaultdict(list)
    for c in curated_before:
        kept[c.task].append(c)
    out = {}
    for item in sorted(items, key=lambda c: c.key):
        if cfg.exact and item.sample_id in kept_ids:
            out[item.key] = ("exact", item.sample_id)
            continue
        if cfg.near and kept[item.task]:
            hashes = np.array([c.phash for c in kept[item.task]], dtype=np.int64)
            bits = np.unpackbits((hashes ^ np.int64(item.phash)).view(np.uint8).reshape(-1, 8), axis=1)
            dist = bits.sum(axis=1)
            j = int(dist.argmin())
            if dist[j] <= cfg.hamming_threshold:
                out[item.key] = ("near", kept[item.task][j].sample_id)
                continue
        kept_ids.add(item.sample_id)
        kept[item.task].append(item)
    return out


def random_hashes(rng: np.random.Generator, n: int) -> list[int]:
    """n uniform 64-bit hashes (unsigned ints)."""
    return np.frombuffer(rng.bytes(8 * n), dtype=np.uint64).tolist()


def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def _flip(rng: np.random.Generator, value: int, nbits: int) -> int:
    for b in rng.choice(64, size=nbits, replace=False):
        value ^= 1 << int(b)
    return value


def planted(rng: np.random.Generator, n_base: int, threshold: int) -> list[int]:
    """Random 64-bit hashes plus copies of some at distances 0..threshold+2 (unsigned ints)."""
    base = random_hashes(rng, n_base)
    out = list(base)
    for i in rng.integers(0, n_base, size=n_base // 2):
        out.append(_flip(rng, base[int(i)], int(rng.integers(0, threshold + 3))))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("threshold", range(11))
def test_index_equals_brute_force_many_seeds(threshold):
    for seed in range(6):
        rng = np.random.default_rng(1000 * threshold + seed)
        values = planted(rng, 300, threshold)
        tasks = ["t2i", "t2v"]
        cands = [Candidate(f"src/{i:05d}", f"id{i % 290}" if i % 17 == 0 else f"id{i}", tasks[i % 2], _signed(v))
                 for i, v in enumerate(values)]
        before, items = cands[:200], cands[200:]
        cfg = DedupConfig(hamming_threshold=threshold)
        got = find_duplicates(items, cfg, before)
        assert got == brute_force_duplicates(items, cfg, before)
        assert sum(r == "near" for r, _ in got.values()) > 0


@pytest.mark.parametrize("threshold", [1, 6, 10])
def test_find_duplicates_with_bands_equals_brute_force(threshold):
    """A refresh against thousands of kept hashes: the ledger's part is banded, new items go to the dict."""
    rng = np.random.default_rng(50 + threshold)
    values = planted(rng, 5000, threshold)
    cands = [Candidate(f"src/{i:05d}", f"id{i}", "t2i", _signed(v)) for i, v in enumerate(values)]
    before, items = cands[:6000], cands[6000:]
    assert plan_for(threshold, len(before)) is not None
    cfg = DedupConfig(hamming_threshold=threshold)
    got = find_duplicates(items, cfg, before)
    assert got == brute_force_duplicates(items, cfg, before)
    assert 100 < sum(r == "near" for r, _ in got.values()) < len(items)


@pytest.mark.parametrize("threshold", [0, 3, 6, 10])
def test_indexed_lookups_equal_linear_scan(threshold):
    """Large enough that the index uses bands (not the linear scan), incremental adds included."""
    rng = np.random.default_rng(threshold)
    values = planted(rng, 6000, threshold)
    index = NearDuplicateIndex(threshold)
    index.extend(_signed(v) for v in values[:8000])
    assert index.plan is not None
    kept = np.zeros(len(values), dtype=np.uint64)
    kept[:8000] = values[:8000]
    n = 8000
    for v in values[8000:]:
        bits = np.unpackbits((kept[:n] ^ np.uint64(v)).view(np.uint8).reshape(-1, 8), axis=1)
        dist = bits.sum(axis=1)
        j = int(dist.argmin())
        expected = (j, int(dist[j])) if dist[j] <= threshold else None
        assert index.nearest(_signed(v)) == expected
        if expected is None:
            assert index.add(v) == n
            kept[n] = v
            n += 1
    assert len(index) == n > 8000
    assert index.comparisons < 0.2 * index.lookups * n


def test_every_pair_within_threshold_shares_a_probed_band():
    """Pigeonhole: hashes exactly at the threshold are found whatever bits differ."""
    rng = np.random.default_rng(7)
    for threshold in range(11):
        index = NearDuplicateIndex(threshold)
        base = random_hashes(rng, 20000)
        index.extend(base)
        assert index.plan is not None
        assert sum(r + 1 for r in index.plan.radii) == threshold + 1
        for i in range(0, 20000, 400):
            hit = index.nearest(_flip(rng, base[i], threshold))
            assert hit is not None and hit[1] <= threshold


def test_lookup_work_grows_sublinearly():
    """Work per lookup = band values probed + candidates compared exactly (a scan compares all)."""
    rng = np.random.default_rng(3)
    work, compared = {}, {}
    for n in (1_000, 100_000):
        index = NearDuplicateIndex(6)
        index.extend(random_hashes(rng, n))
        for q in random_hashes(rng, 500):
            index.nearest(q)
        work[n] = (index.probes + index.comparisons) / index.lookups
        compared[n] = index.comparisons / index.lookups
    # 100x the kept hashes: a linear scan does 100x the work; the index well under 10x.
    assert work[100_000] < 10 * work[1_000]
    assert compared[100_000] < 100_000 / 100


def test_plan_is_exact_and_adapts_to_size():
    for threshold in range(20):
        for size in (10, 10_000, 10_000_000):
            plan = plan_for(threshold, size)
            if plan is None:
                continue
            assert sum(w for _, w in plan.bands) == 64
            assert sum(r + 1 for r in plan.radii) == threshold + 1
    assert plan_for(6, 10) is None  # a tiny index is scanned
    assert len(plan_for(6, 10_000_000).bands) < len(plan_for(6, 10_000).bands) or \
        plan_for(6, 10_000_000).probes() > plan_for(6, 10_000).probes()


def test_extend_accepts_signed_unsigned_and_arrays():
    values = [0, 1, (1 << 64) - 1, -1, -(1 << 63), (1 << 63)]
    for given in (values, np.array([_signed(v & ((1 << 64) - 1)) for v in values], dtype=np.int64)):
        index = NearDuplicateIndex(0)
        index.extend(given)
        assert index.hashes.tolist() == [0, 1, (1 << 64) - 1, (1 << 64) - 1, 1 << 63, 1 << 63]
        assert index.nearest(-1) == (2, 0)
    with pytest.raises(TypeError, match="perceptual hash"):
        NearDuplicateIndex(0).extend([1, 2.0])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="threshold 65"):
        NearDuplicateIndex(65)
    with pytest.raises(TypeError, match="threshold"):
        NearDuplicateIndex(2.5)
    index = NearDuplicateIndex(3)
    with pytest.raises(ValueError, match="64-bit range"):
        index.add(1 << 64)
    with pytest.raises(TypeError, match="perceptual hash"):
        index.add("0xff")

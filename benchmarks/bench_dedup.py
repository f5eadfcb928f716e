"""Near-duplicate lookup time against the number of kept perceptual hashes (CPU).

For each size N, N uniform random 64-bit hashes are kept in a `data_curation.dedup.NearDuplicateIndex`
(bulk `extend`, as `find_duplicates` loads a refresh's ledger), then --queries lookups are timed:
half random hashes (almost never a duplicate), half copies of kept hashes with 0..threshold bits
flipped (always one). Each lookup's answer is checked against a linear scan over all N kept hashes
(vectorised popcount, what dedup did before the index), which is timed too. Reported per lookup:
mean time of the index and of the scan, band values probed and candidates compared exactly.

    python benchmarks/bench_dedup.py                      # 10^3 .. 10^6, threshold 6 (DedupConfig default)
    python benchmarks/bench_dedup.py --sizes 1000 10000 --threshold 10 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_curation.config import DedupConfig
from data_curation.dedup import NearDuplicateIndex, hamming


def random_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.frombuffer(rng.bytes(8 * n), dtype=np.uint64).copy()


def queries(rng: np.random.Generator, kept: np.ndarray, n: int, threshold: int) -> list[int]:
    out = random_hashes(rng, n - n // 2).tolist()
    for i in rng.integers(0, len(kept), size=n // 2):
        value = int(kept[i])
        for b in rng.choice(64, size=int(rng.integers(0, threshold + 1)), replace=False):
            value ^= 1 << int(b)
        out.append(value)
    return out


def signed(values: np.ndarray) -> np.ndarray:
    return values.view(np.int64)


def bench_size(n: int, threshold: int, n_queries: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    kept = random_hashes(rng, n)
    index = NearDuplicateIndex(threshold)
    t0 = time.perf_counter()
    index.extend(kept.tolist())
    build_s = time.perf_counter() - t0
    qs = queries(rng, kept, n_queries, threshold)

    t0 = time.perf_counter()
    answers = [index.nearest(q) for q in qs]
    index_s = (time.perf_counter() - t0) / len(qs)

    kept_signed = signed(kept)
    t0 = time.perf_counter()
    dists = [hamming(kept_signed, int(np.uint64(q).view(np.int64))) for q in qs]
    scan_s = (time.perf_counter() - t0) / len(qs)
    for q, ans, dist in zip(qs, answers, dists):
        j = int(dist.argmin())
        expected = (j, int(dist[j])) if dist[j] <= threshold else None
        if ans != expected:
            raise AssertionError(f"N={n}: index answered {ans} for {q:#018x}, the scan {expected}")
    plan = index.plan
    return {"kept": n, "threshold": threshold, "queries": len(qs),
            "duplicates_found": sum(a is not None for a in answers),
            "plan": None if plan is None else {"bands": [w for _, w in plan.bands], "radii": list(plan.radii)},
            "build_s": build_s, "index_lookup_us": index_s * 1e6, "scan_lookup_us": scan_s * 1e6,
            "probes_per_lookup": index.probes / index.lookups,
            "comparisons_per_lookup": index.comparisons / index.lookups}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10**3, 10**4, 10**5, 10**6])
    ap.add_argument("--threshold", type=int, default=DedupConfig().hamming_threshold)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory for dedup_results.json")
    args = ap.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}, numpy {np.__version__}, "
          f"threshold {args.threshold}, {args.queries} lookups per size", flush=True)
    rows = []
    for n in args.sizes:
        rows.append(bench_size(n, args.threshold, args.queries, args.seed))
        r = rows[-1]
        print(f"N={n}: index {r['index_lookup_us']:.1f} us, scan {r['scan_lookup_us']:.1f} us, "
              f"probes {r['probes_per_lookup']:.0f}, compared {r['comparisons_per_lookup']:.1f}, "
              f"plan {r['plan']}, build {r['build_s']:.2f}s", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "dedup_results.json").write_text(json.dumps(rows, indent=1))
    print("\n| kept hashes | index: µs / lookup | linear scan: µs / lookup | band values probed / lookup "
          "| candidates compared / lookup | bands (bits) / probe radii | index build s |")
    print("|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        plan = "linear scan" if r["plan"] is None else (
            f"{'+'.join(map(str, r['plan']['bands']))} / {','.join(map(str, r['plan']['radii']))}")
        print(f"| {r['kept']:,} | {r['index_lookup_us']:.1f} | {r['scan_lookup_us']:.1f} "
              f"| {r['probes_per_lookup']:.0f} | {r['comparisons_per_lookup']:.1f} | {plan} | {r['build_s']:.2f} |")


if __name__ == "__main__":
    main()

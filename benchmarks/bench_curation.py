"""Samples/s of the whole curation pipeline (list → inspect → dedup → prepare → VAE/ViT pools →
tokenize → shards) on this machine's CPUs with the `tiny` preset encoders and a synthetic corpus.

    python benchmarks/bench_curation.py [--images 96] [--videos 16] [--num-cpus 2]

Reports end-to-end wall time (Ray start excluded: a warm-up run on a small corpus starts Ray and the
worker processes first) and samples/s = listed items / seconds.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from data_curation.config import CurationConfig
from data_curation.pipeline import run_curation
from lance_platform.config import load_config


def config(out: str, images: int, videos: int, num_cpus: int) -> CurationConfig:
    return load_config(CurationConfig, "configs/curation/synthetic.yaml", [
        (f"sources=[{{kind: synthetic, name: bench, synthetic: {{images: {images}, videos: {videos}, "
         f"edits: {images // 4}, qa: {images // 4}}}}}]"),
        f"output.dir={out}", "tracking.enabled=false", f"num_cpus={num_cpus}"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--videos", type=int, default=16)
    p.add_argument("--num-cpus", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_curation(config(f"{tmp}/warm", 4, 1, args.num_cpus), "curate")
        cfg = config(f"{tmp}/bench", args.images, args.videos, args.num_cpus)
        start = time.perf_counter()
        result = run_curation(cfg, "curate")
        seconds = time.perf_counter() - start
    c = result.counts
    print(f"listed {c['listed']} (images {args.images}, videos {args.videos}, edits/qa {args.images // 4} each); "
          f"curated {c['curated']}; {seconds:.1f} s; {c['listed'] / seconds:.2f} samples/s")


if __name__ == "__main__":
    main()

"""`lance-pipeline curate` and `lance-pipeline refresh`: Ray Data curation into versioned shards.

`curate` starts a curated dataset in `output.dir`; `refresh` (the scheduled job) appends what the
sources gained since the last run, per the ledger. Both take a YAML under `configs/curation/` plus
`key.sub=value` overrides; bad values fail before any work starts.
"""
from __future__ import annotations

import argparse

from data_curation.config import CurationConfig
from lance_platform.config import load_config


def cmd_curate(args: argparse.Namespace) -> int:
    cfg = load_config(CurationConfig, args.config, args.overrides)
    from data_curation.pipeline import run_curation

    result = run_curation(cfg, args.command)
    counts = result.counts
    if result.run is None:
        print(f"{args.command}: nothing new in {counts['listed']} listed items; {result.manifest} unchanged")
        return 0
    rejected = {k: v for k, v in counts.items() if isinstance(v, dict)}
    print(f"{args.command} run {result.run}: {counts['new']} new items -> {counts['curated']} rows in "
          f"{counts['shards']} shards; rejected {rejected or 'none'}")
    print(f"manifest: {result.manifest}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    for name, text in (("curate", "curate sources into a new shard dataset (Ray Data)"),
                       ("refresh", "append only what the sources gained since the last run (ledger)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=True, help="curation YAML, e.g. configs/curation/synthetic.yaml")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        p.set_defaults(func=cmd_curate)

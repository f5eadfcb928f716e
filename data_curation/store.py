"""The curated dataset on disk: shards, ledger, quarantine tables, reports and the manifest.

```
<dir>/manifest.json                       the commit point: shards (with rows per task), ledger parts, runs,
                                          the tokenizer record of the token ids
<dir>/shards/run-RRRRR-SSSSS.parquet      curated rows (schema.write_shard, atomic per shard)
<dir>/ledger/run-RRRRR.parquet            every source item a run processed and its outcome
<dir>/quarantine/run-RRRRR.parquet        rejected items: stage, reason, detail
<dir>/reports/run-RRRRR/                  stats.json + PNG plots
```

A run writes its files first and then replaces `manifest.json` atomically; only files the manifest
names exist as far as readers and later refreshes are concerned. A run that crashed before its
commit left files the manifest does not name; `remove_uncommitted` deletes them at the start of the
next run, which then redoes that work. Hence a crash followed by a re-run gives exactly the rows of
an uninterrupted run: nothing duplicated, nothing lost. The ledger is append-only (one part per
run), so committing a refresh costs only its own items. Each shard's manifest entry records its size
and sha256; readers (`shard_paths`, and `lance_platform.schema.read_shard` / `check_version` used by
training) verify a shard against them before reading it, once per file per process.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_curation.dedup import Candidate
from lance_platform.files import atomic_target, write_json_atomic
from lance_platform.schema import SCHEMA_VERSION, sha256_file, verify_shard, write_shard

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANAGED_DIRS = ("shards", "ledger", "quarantine", "reports")
LEDGER_SCHEMA = pa.schema([("source_uri", pa.string()), ("fingerprint", pa.string()), ("task", pa.string()),
                           ("sample_id", pa.string()), ("phash", pa.int64()), ("outcome", pa.string()),
                           ("run", pa.int32())])
QUARANTINE_SCHEMA = pa.schema([("source_uri", pa.string()), ("task", pa.string()), ("sample_id", pa.string()),
                               ("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


class DatasetMismatchError(ValueError):
    """An existing curated dataset cannot take this run's rows (other encoders, or curate over it)."""


def write_table_atomic(table: pa.Table, path: Path) -> None:
    with atomic_target(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


@dataclass
class Manifest:
    encoder: dict | None = None
    shards: list[dict] = field(default_factory=list)
    ledger: list[str] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    tokenizer: dict | None = None  # tokenizer_record of the tokenizer that made the shards' token ids

    @property
    def total_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def task_counts(self) -> dict[str, int] | None:
        """Rows per task over all shards (None when a shard entry predates per-task counts)."""
        if any("tasks" not in s for s in self.shards):
            return None
        total: Counter = Counter()
        for s in self.shards:
            total.update(s["tasks"])
        return dict(total)

    def to_dict(self) -> dict:
        return {"schema_version": self.schema_version, "encoder": self.encoder, "tokenizer": self.tokenizer,
                "total_rows": self.total_rows, "shards": self.shards, "ledger": self.ledger, "runs": self.runs}

    def referenced(self) -> set[str]:
        paths = {s["path"] for s in self.shards} | set(self.ledger)
        for run in self.runs:
            paths |= {run[k] for k in ("quarantine", "report") if run.get(k)}
        return paths


class CuratedDataset:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def load_manifest(self) -> Manifest:
        if not self.exists():
            return Manifest()
        data = json.loads(self.manifest_path.read_text())
        if data.get("schema_version") != SCHEMA_VERSION:
            raise DatasetMismatchError(f"{self.manifest_path}: schema version {data.get('schema_version')} is not "
                                       f"supported by this curation (version {SCHEMA_VERSION})")
        return Manifest(data["encoder"], data["shards"], data["ledger"], data["runs"], tokenizer=data.get("tokenizer"))

    def remove_uncommitted(self, manifest: Manifest) -> list[Path]:
        """Delete what a crashed run left behind (files and report dirs the manifest does not name)."""
        keep = manifest.referenced()
        removed = []
        for sub in MANAGED_DIRS:
            base = self.root / sub
            if not base.is_dir():
                continue
            for path in sorted(base.iterdir()):
                if str(path.relative_to(self.root)) not in keep:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                    removed.append(path)
        if removed:
            log.warning("removed %d uncommitted file(s) of an interrupted run under %s", len(removed), self.root)
        return removed

    def shard_paths(self, manifest: Manifest | None = None, verify: bool = True) -> list[Path]:
        """The committed shard files, each checked against its manifest size and sha256 (hashed once
        per process while the file is unchanged; a mismatch raises `ShardChecksumError` naming it)."""
        manifest = manifest or self.load_manifest()
        paths = []
        for entry in manifest.shards:
            path = self.root / entry["path"]
            if verify:
                verify_shard(path, entry["sha256"], entry.get("bytes"))
            paths.append(path)
        return paths

    # ------------------------------------------------------------------ ledger
    def read_ledger(self, manifest: Manifest) -> pa.Table:
        parts = [pq.read_table(self.root / p) for p in manifest.ledger]
        return pa.concat_tables(parts) if parts else LEDGER_SCHEMA.empty_table()

    @staticmethod
    def seen_keys(ledger: pa.Table) -> set[tuple[str, str]]:
        return set(zip(ledger["source_uri"].to_pylist(), ledger["fingerprint"].to_pylist()))

    @staticmethod
    def curated_candidates(ledger: pa.Table) -> list[Candidate]:
        rows = ledger.filter(pc.equal(ledger["outcome"], "curated")).to_pylist()
        return [Candidate(r["source_uri"], r["sample_id"], r["task"], r["phash"]) for r in rows]

    # ------------------------------------------------------------------ commit
    def commit(self, manifest: Manifest, run: dict, shards: list[dict], ledger_rows: list[dict],
               quarantine_rows: list[dict], report_dir: str | None, encoder: dict,
               tokenizer: dict | None = None) -> Manifest:
        """Write the run's ledger part and quarantine table, then replace the manifest (the commit).
        `tokenizer`: the record of the tokenizer that made this run's token ids."""
        if shards and manifest.tokenizer is not None and tokenizer != manifest.tokenizer:
            raise DatasetMismatchError(f"{self.root} holds token ids of tokenizer {manifest.tokenizer}; this run's "
                                       f"are of {tokenizer}: ids must not mix")
        tag = f"run-{run['run']:05d}"
        ledger_path = f"ledger/{tag}.parquet"
        write_table_atomic(pa.Table.from_pylist(ledger_rows, schema=LEDGER_SCHEMA), self.root / ledger_path)
        quarantine_path = f"quarantine/{tag}.parquet"
        write_table_atomic(pa.Table.from_pylist(quarantine_rows, schema=QUARANTINE_SCHEMA),
                           self.root / quarantine_path)
        run = {**run, "quarantine": quarantine_path, "report": report_dir, "committed": time.time()}
        new = Manifest(encoder, manifest.shards + shards, manifest.ledger + [ledger_path], manifest.runs + [run],
                       tokenizer=(tokenizer or manifest.tokenizer) if shards else manifest.tokenizer)
        write_json_atomic(self.manifest_path, new.to_dict(), sort_keys=True)
        return new


class ShardWriter:
    """Buffers rows and writes a shard (atomically) whenever the buffer reaches `target_bytes`."""

    def __init__(self, dataset: CuratedDataset, run: int, target_bytes: int, encoder: dict,
                 on_shard: Callable[[dict], None] | None = None, tokenizer: dict | None = None) -> None:
        self.dataset = dataset
        self.run = run
        self.target_bytes = target_bytes
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.on_shard = on_shard
        self.shards: list[dict] = []
        self._rows: list[dict] = []
        self._bytes = 0

    @staticmethod
    def row_bytes(row: dict) -> int:
        size = 0
        for v in row.values():
            if isinstance(v, (bytes, str)):
                size += len(v)
            elif isinstance(v, list):
                size += 4 * len(v)
            else:
                size += 8
        return size

    def add(self, row: dict) -> None:
        self._rows.append(row)
        self._bytes += self.row_bytes(row)
        if self._bytes >= self.target_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        rel = f"shards/run-{self.run:05d}-{len(self.shards):05d}.parquet"
        path = write_shard(self._rows, self.dataset.root / rel, encoder=self.encoder, tokenizer=self.tokenizer)
        entry = {"path": rel, "rows": len(self._rows), "bytes": path.stat().st_size, "sha256": sha256_file(path),
                 "run": self.run, "tasks": dict(sorted(Counter(r["task"] for r in self._rows).items()))}
        self.shards.append(entry)
        self._rows, self._bytes = [], 0
        if self.on_shard is not None:
            self.on_shard(entry)

"""The curation driver: list → inspect (Ray) → dedup (driver) → prepare + encode + tokenize (Ray) → write.

Two streaming Ray Data passes, because dedup is a global decision:

1. inspect: fetch, decode, validate, score, filter and hash every new item (CPU tasks); the output
   is a few numbers per item, collected on the driver.
2. the driver drops exact and near duplicates (against this run and the ledger of earlier runs),
   orders the kept items by bucket and frame count (so encoder batches are mostly one bucket), and
   streams them through prepare (CPU tasks) → caption actor pool (optional) → VAE and ViT actor
   pools → tokenize; shards are written from the driver as batches arrive.

With scene splitting on, pass 1 yields one row per scene, or per clip of a scene longer than the
clip-length limit (keyed `<uri>#t=<start>,<end>`), and from there on a clip is an item:
deduplicated, encoded, written and entered in the ledger on its own.

Decoding twice is the price of not holding a whole refresh's pixels in the object store.
`curate` starts a dataset (refusing to write over one), `refresh` appends to it; both skip every
item the ledger has seen, commit ledger + manifest atomically at the end, and are one MLflow run
each (params = resolved config, metrics = counts, artifacts = report, input = the manifest).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_curation.buckets import choose_bucket
from data_curation.captioning import CaptionStage
from data_curation.config import CurationConfig
from data_curation.dedup import Candidate, find_duplicates
from data_curation.encoders import encoder_description, model_config
from data_curation.report import animation_counts, count_outcomes, flat_metrics, scene_counts, write_report
from data_curation.scenes import parent_uri
from data_curation.sources import SourceItem, list_source
from data_curation.stages import (
    SCENE_COLUMNS,
    InspectStage,
    PrepareStage,
    TokenizeStage,
    VaeStage,
    VitStage,
    rows_of,
    shard_row,
)
from data_curation.store import CuratedDataset, DatasetMismatchError, Manifest, ShardWriter

log = logging.getLogger(__name__)

MODES = ("curate", "refresh")


@dataclass
class CurationResult:
    mode: str
    run: int | None            # None when there was nothing new (nothing written)
    counts: dict
    shards: list[dict]
    manifest: Path
    mlflow_run_id: str | None = None


# ---------------------------------------------------------------------------------------- Ray plumbing
def _ray_data(cfg: CurationConfig):
    import ray

    from lance_platform.runtime import init_ray

    init_ray(cfg.ray_address, num_cpus=cfg.num_cpus)
    ctx = ray.data.DataContext.get_current()
    # progress bars: Ray Data's default, which lance_platform.logs turns off when stdout is not a terminal
    ctx.execution_options.preserve_order = True  # deterministic shard contents for a given input
    return ray


def _dataset(ray, rows: list[dict], batch_size: int):
    return ray.data.from_items(rows, override_num_blocks=max(1, min(256, math.ceil(len(rows) / batch_size))))


def _num_gpus(ray, setting: str | float) -> float:
    if setting == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return float(setting)


def inspect_items(ray, items: list[SourceItem], cfg: CurationConfig) -> list[dict]:
    ds = _dataset(ray, [asdict(i) for i in items], cfg.encode.read_batch_size)
    ds = ds.map_batches(InspectStage(cfg), batch_size=cfg.encode.read_batch_size, batch_format="numpy")
    return [_plain(r) for r in ds.take_all()]


def encode_items(ray, rows: list[dict], cfg: CurationConfig, vae_stride: int, vit_stride: int, tokenizer: str):
    """The pass-2 dataset: prepare → caption pool (when on) → VAE pool → ViT pool → tokenize,
    yielding numpy batches."""
    e, c = cfg.encode, cfg.captioning
    gpus = _num_gpus(ray, e.num_gpus)
    actors = (e.vae_actors if e.vae else 0) + (e.vit_actors if e.vit else 0) + (c.actors if c.enabled else 0)
    free = ray.cluster_resources().get("CPU", 0) - actors * e.actor_num_cpus
    if free < 1:  # the prepare / tokenize tasks need a whole CPU: Ray Data would wait for ever
        log.warning("the %d encoder/caption actors hold %.2f CPUs of %.0f, leaving %.2f for the prepare and "
                    "tokenize tasks, which need 1: lower encode.actor_num_cpus or the actor counts",
                    actors, actors * e.actor_num_cpus, ray.cluster_resources().get("CPU", 0), free)
    ds = _dataset(ray, rows, e.read_batch_size)
    ds = ds.map_batches(PrepareStage(cfg, vae_stride, vit_stride), batch_size=e.read_batch_size,
                        batch_format="numpy")
    if c.enabled:
        caption_gpus = _num_gpus(ray, c.num_gpus)
        ds = ds.map_batches(CaptionStage, fn_constructor_args=(c, caption_gpus, e.torch_threads),
                            compute=ray.data.ActorPoolStrategy(size=c.actors), batch_size=c.batch_size,
                            num_cpus=e.actor_num_cpus, num_gpus=caption_gpus, batch_format="numpy")
    if e.vae:
        ds = ds.map_batches(VaeStage, fn_constructor_args=(cfg.model, e.store_logvar, gpus, e.torch_threads),
                            compute=ray.data.ActorPoolStrategy(size=e.vae_actors), batch_size=e.vae_batch_size,
                            num_cpus=e.actor_num_cpus, num_gpus=gpus, batch_format="numpy")
    if e.vit:
        ds = ds.map_batches(VitStage, fn_constructor_args=(cfg.model, gpus, e.torch_threads),
                            compute=ray.data.ActorPoolStrategy(size=e.vit_actors), batch_size=e.vit_batch_size,
                            num_cpus=e.actor_num_cpus, num_gpus=gpus, batch_format="numpy")
    ds = ds.map_batches(TokenizeStage(tokenizer), batch_size=e.read_batch_size, batch_format="numpy")
    return ds.iter_batches(batch_size=e.read_batch_size, batch_format="numpy")


def _plain(value):
    """numpy scalars / arrays from Ray batches -> Python values the Parquet writer takes."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------- decisions
def apply_dedup(inspected: list[dict], cfg: CurationConfig, curated_before: list[Candidate]) -> None:
    ok = [r for r in inspected if r["status"] == "ok"]
    dups = find_duplicates([Candidate(r["source_uri"], r["sample_id"], r["task"], r["phash"]) for r in ok],
                           cfg.dedup, curated_before)
    for r in ok:
        if r["source_uri"] in dups:
            reason, kept = dups[r["source_uri"]]
            r.update(status="duplicate", reason=reason, detail=f"duplicate of {kept}")


def encode_order(row: dict, cfg: CurationConfig) -> tuple:
    """Group key for pass 2: task, bucket and frame count, then sample_id for a stable order."""
    return (row["task"], choose_bucket(row["height"], row["width"], cfg.buckets.names), row["num_frames"],
            row["sample_id"])


def ledger_row(row: dict, run: int) -> dict:
    outcome = "curated" if row["status"] == "ok" else f"{row['status']}:{row['reason']}"
    return {"source_uri": row["source_uri"], "fingerprint": row["fingerprint"], "task": row["task"],
            "sample_id": row.get("sample_id"), "phash": row.get("phash"), "outcome": outcome, "run": run}


def quarantine_row(row: dict, stage: str) -> dict:
    return {"source_uri": row["source_uri"], "task": row["task"], "sample_id": row.get("sample_id"),
            "stage": stage, "reason": row["reason"], "detail": row.get("detail")}


STAGE_OF_STATUS = {"quarantined": "validate", "filtered": "filter", "duplicate": "dedup"}
SHARD_DROP = ("status", "reason", "detail")


# ---------------------------------------------------------------------------------------- the run
def _check_dataset(dataset: CuratedDataset, manifest: Manifest, mode: str, encoder: dict) -> None:
    if mode == "curate" and manifest.runs:
        raise DatasetMismatchError(f"{dataset.root} already holds a curated dataset ({manifest.total_rows} rows); "
                                   "use `refresh` to add to it, or choose another output.dir")
    if manifest.encoder is not None and manifest.encoder != encoder:
        raise DatasetMismatchError(f"{dataset.root} was curated with other encoders or buckets; latents must not "
                                   f"mix. Existing: {json.dumps(manifest.encoder)}; this run: {json.dumps(encoder)}")


def _list_new(cfg: CurationConfig, seen: set[tuple[str, str]]) -> tuple[int, list[SourceItem]]:
    """(items listed, the ones the ledger has not seen); a scene's ledger key counts for its video."""
    listed = [item for src in cfg.sources for item in list_source(src)]
    seen = {(parent_uri(uri), fingerprint) for uri, fingerprint in seen}
    return len(listed), [i for i in listed if (i.source_uri, i.fingerprint) not in seen]


def run_curation(cfg: CurationConfig, mode: str = "curate",
                 on_shard: Callable[[dict], None] | None = None, parent_run_id: str | None = None) -> CurationResult:
    """Curate (or refresh) `cfg.output.dir`. `on_shard(entry)` is called after each shard is written;
    `parent_run_id` files the MLflow run under a pipeline's parent run."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    from lance_platform.tracking import tracked_run

    dataset = CuratedDataset(cfg.output.dir)
    model_cfg = model_config(cfg.model)
    encoder = json.loads(json.dumps(encoder_description(cfg.model, model_cfg, cfg.buckets,
                                                        cfg.encode.vae, cfg.encode.vit)))
    manifest = dataset.load_manifest()
    _check_dataset(dataset, manifest, mode, encoder)
    if not cfg.tracking.enabled:
        return _run(cfg, mode, dataset, manifest, model_cfg, encoder, on_shard, tracker=None)
    with tracked_run(cfg.tracking.workdir, mode, experiment=cfg.tracking.experiment,
                     parent_run_id=parent_run_id) as tracker:
        tracker.log_params(dataclasses.asdict(cfg))
        tracker.log_dict(dataclasses.asdict(cfg), "config.yaml")
        result = _run(cfg, mode, dataset, manifest, model_cfg, encoder, on_shard, tracker)
        result.mlflow_run_id = tracker.run_id
        return result


def _run(cfg, mode, dataset, manifest, model_cfg, encoder, on_shard, tracker) -> CurationResult:
    started = time.time()
    ledger = dataset.read_ledger(manifest)
    listed, new = _list_new(cfg, dataset.seen_keys(ledger))
    counts: dict = {"listed": listed, "already_seen": listed - len(new), "new": len(new)}
    log.info("%s: %d items listed, %d new", mode, listed, len(new))
    if not new:
        if tracker:
            tracker.log_metrics(flat_metrics({**counts, "curated": 0}))
        return CurationResult(mode, None, {**counts, "curated": 0}, [], dataset.manifest_path)

    dataset.remove_uncommitted(manifest)
    ray = _ray_data(cfg)
    inspected = inspect_items(ray, new, cfg)
    apply_dedup(inspected, cfg, dataset.curated_candidates(ledger))
    kept = sorted((r for r in inspected if r["status"] == "ok"), key=lambda r: encode_order(r, cfg))
    by_uri = {i.source_uri: i for i in new}
    work = [{**asdict(by_uri[parent_uri(r["source_uri"])]), "source_uri": r["source_uri"], "sample_id": r["sample_id"],
             **{k: r.get(k) for k in SCENE_COLUMNS}} for r in kept]

    run = len(manifest.runs)
    writer = ShardWriter(dataset, run, cfg.output.target_shard_bytes, encoder, on_shard,
                         tokenizer=TokenizeStage(model_cfg.tokenizer).record)
    late_rejects: dict[str, dict] = {}
    buckets: Counter = Counter()
    if work:
        vit_stride = model_cfg.vit.stride if model_cfg.vit is not None else 1
        for batch in encode_items(ray, work, cfg, model_cfg.vae.spatial_stride, vit_stride, model_cfg.tokenizer):
            for row in (shard_row(_plain(r)) for r in rows_of(batch)):
                if row["status"] != "ok":
                    late_rejects[row["source_uri"]] = row
                    continue
                buckets[row["bucket"]] += 1
                writer.add({k: v for k, v in row.items() if k not in SHARD_DROP})
        writer.flush()
    for row in inspected:  # an item that changed between the passes is quarantined, not lost
        if row["source_uri"] in late_rejects:
            late = late_rejects[row["source_uri"]]
            row.update(status="quarantined", reason=late["reason"], detail=late["detail"])

    counts.update(count_outcomes(inspected))
    if cfg.scenes.enabled:
        counts["scenes"] = scene_counts(inspected)
    if (animated := animation_counts(inspected)) is not None:
        counts["animated"] = animated
    counts["curated"] = sum(s["rows"] for s in writer.shards)
    counts["shards"] = len(writer.shards)
    report_rel = f"reports/run-{run:05d}"
    write_report(dataset.root / report_rel, counts, inspected, buckets)
    run_record = {"run": run, "mode": mode, "started": started, "seconds": round(time.time() - started, 3),
                  "counts": counts, "mlflow_run_id": tracker.run_id if tracker else None}
    rejected = [quarantine_row(r, STAGE_OF_STATUS[r["status"]]) for r in inspected if r["status"] != "ok"]
    manifest = dataset.commit(manifest, run_record, writer.shards, [ledger_row(r, run) for r in inspected],
                              rejected, report_rel, encoder, tokenizer=writer.tokenizer)
    log.info("%s run %d: %d rows in %d shards; counts %s", mode, run, counts["curated"], len(writer.shards), counts)
    if tracker:
        _log_run(tracker, dataset, counts, report_rel)
    return CurationResult(mode, run, counts, writer.shards, dataset.manifest_path)


def _log_run(tracker, dataset: CuratedDataset, counts: dict, report_rel: str) -> None:
    tracker.log_metrics(flat_metrics(counts))
    tracker.log_artifact(dataset.root / report_rel, "report")
    tracker.log_artifact(dataset.manifest_path)
    digest = hashlib.sha256(dataset.manifest_path.read_bytes()).hexdigest()[:16]
    tracker.log_input("curated-shards", str(dataset.manifest_path.resolve()), digest, context="curation")

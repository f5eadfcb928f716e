"""Driver side of training: one stage on Ray Train, or PT -> CT -> SFT chained, tracked in MLflow.

`run_stage` validates the config (before Ray starts), checks every shard's schema version, builds
one Ray Dataset per task group, opens the stage's MLflow child run (or reopens it when the stage is
re-run in the same work dir), and runs `TorchTrainer` with FailureConfig retries: a failing worker
group is restarted from the last reported checkpoint and continues the same run. The final
checkpoint is exported to `<workdir>/<stage>/final` (loadable with `Lance.from_pretrained`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lance_platform.schema import check_version
from lance_platform.config import flatten, load_config, to_dict

from .config import PipelineConfig, StageConfig, load_stage_config
from lance_platform.runtime import init_ray
from lance_platform.tracking import Tracker, default_tracking_uri

log = logging.getLogger(__name__)
# What `<stage>/final` keeps of the last checkpoint: the model, EMA and optimizer state, not the data position.
EXPORT_FILES = ("model.safetensors", "ema.safetensors", "lance_config.json", "llm_config.json",
                "optimizer.safetensors", "optimizer.json", "trainer_state.json")


@dataclass
class StageResult:
    name: str
    steps: int
    final_loss: float | None
    checkpoint: Path
    run_id: str | None
    metrics: dict


def shard_files(path: str | Path) -> list[str]:
    """A shard file, a directory of shards, or a curated dataset root (its manifest lists the shards;
    the ledger and quarantine tables beside them are not training data)."""
    path = Path(path)
    manifest = path / "manifest.json"
    if manifest.is_file():
        files = [path / entry["path"] for entry in json.loads(manifest.read_text()).get("shards", [])]
    else:
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"data.shards: no Parquet shards under {path}")
    for f in files:
        check_version(f)
    return [str(f) for f in files]


def training_dataset(stage: StageConfig):
    """The stage's shards as one Ray Dataset with a fixed row order (workers deal rows by index)."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return ray.data.read_parquet(shard_files(stage.data.shards))


def _ordered_ingest():
    """Train's ingest options with a fixed row order: every worker deals rows by index, and a
    resumed worker must see the same order to continue exactly where it stopped."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _run_id_file(stage_dir: Path) -> Path:
    return stage_dir / "mlflow_run_id"


def run_stage(stage: StageConfig, workdir: str | Path, parent_run_id: str | None = None,
              init_path: str | None = None, experiment: str = "lance", address: str | None = None) -> StageResult:
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchTrainer

    stage.validate()
    if stage.init.kind == "previous" and not init_path:
        raise ValueError(f"stage {stage.name}: init.kind='previous' needs a previous stage's checkpoint")
    workdir = Path(workdir).resolve()
    stage_dir = workdir / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    shard_files(stage.data.shards)  # schema check before any Ray work
    init_ray(address)

    uri = default_tracking_uri(workdir)
    tracker = Tracker(uri, experiment, workdir / "mlartifacts")
    id_file = _run_id_file(stage_dir)
    previous_id = id_file.read_text().strip() if id_file.is_file() else None
    run_id = tracker.start(stage.name, parent_run_id=parent_run_id, run_id=previous_id,
                           tags={"stage": stage.name})
    if run_id:
        id_file.write_text(run_id)
        if not previous_id:
            tracker.log_params(flatten(to_dict(stage)))
            tracker.log_dict(to_dict(stage), "config/stage.yaml")
            manifest = Path(stage.data.shards) / "manifest.json"
            if manifest.is_file():
                import hashlib

                tracker.log_input("curated-shards", source=str(manifest),
                                  digest=hashlib.sha256(manifest.read_bytes()).hexdigest()[:16])

    scaling = stage.scaling
    trainer = TorchTrainer(
        train_loop_per_worker=_train_loop_entry,
        train_loop_config={"stage": to_dict(stage), "init_path": init_path, "tracking_uri": uri,
                           "run_id": run_id, "experiment": experiment, "storage_dir": str(stage_dir)},
        scaling_config=RayScaling(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                  resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(name=f"{stage.name}", storage_path=str(stage_dir / "ray"),
                             failure_config=FailureConfig(max_failures=stage.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=stage.keep_checkpoints)),
        datasets={"train": training_dataset(stage)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=_ordered_ingest()),
    )
    try:
        result = trainer.fit()
    except Exception:
        tracker.end("FAILED")
        raise
    final = stage_dir / "final"
    export_checkpoint(Path(result.checkpoint.path), final)
    metrics = dict(result.metrics or {})
    tracker.set_tags({"checkpoint": str(final)})
    tracker.log_dict(metrics, "final_metrics.json")
    tracker.end("FINISHED")
    return StageResult(stage.name, stage.steps, metrics.get("loss"), final, run_id, metrics)


def _train_loop_entry(config: dict) -> None:
    from .train_loop import train_loop

    train_loop(config)


def export_checkpoint(source: Path, target: Path) -> None:
    """Verify the stage's last Ray checkpoint and copy its `EXPORT_FILES` to a stable directory, a
    checkpoint of the same format with its own manifest (atomically replaced)."""
    from lance_platform.checkpoint import copy_checkpoint

    copy_checkpoint(source, target, EXPORT_FILES)


def run_pipeline(config_path: str | Path | None, overrides: list[str] | None = None,
                 address: str | None = None) -> list[StageResult]:
    """Stages in sequence under one parent MLflow run; each later stage starts from the previous one."""
    cfg = load_config(PipelineConfig, config_path, overrides).validate()
    stages = []
    for path in cfg.stages:
        stage = load_stage_config(path, _stage_overrides(cfg, path), require_shards=False)
        if cfg.shards and not stage.data.shards:
            stage.data.shards = cfg.shards
        stages.append(stage.validate())
    workdir = Path(cfg.workdir).resolve()
    tracker = Tracker(default_tracking_uri(workdir), cfg.experiment, workdir / "mlartifacts")
    id_file = workdir / "mlflow_parent_run_id"
    parent = tracker.start(cfg.name, run_id=id_file.read_text().strip() if id_file.is_file() else None,
                           tags={"pipeline": cfg.name})
    if parent:
        id_file.write_text(parent)
    results: list[StageResult] = []
    previous: Path | None = None
    try:
        for stage in stages:
            init = str(previous) if stage.init.kind == "previous" else None
            results.append(run_stage(stage, workdir, parent_run_id=parent, init_path=init,
                                     experiment=cfg.experiment, address=address))
            previous = results[-1].checkpoint
    except Exception:
        tracker.end("FAILED")
        raise
    tracker.log_dict([{"stage": r.name, "steps": r.steps, "final_loss": r.final_loss,
                       "checkpoint": str(r.checkpoint)} for r in results], "summary.json")
    tracker.end("FINISHED")
    (workdir / "summary.json").write_text(json.dumps([r.__dict__ | {"checkpoint": str(r.checkpoint)}
                                                      for r in results], default=str, indent=2))
    return results


def _stage_overrides(cfg: PipelineConfig, path: str) -> list[str]:
    name = Path(path).stem
    return list(cfg.stage_overrides.get(name, []))

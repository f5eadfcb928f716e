"""Driver side of training: one stage on Ray Train, or PT -> CT -> SFT chained, tracked in MLflow.

`run_stage` checks, before Ray starts, everything about the data that could not succeed on a retry
(`plan_data`): the shards exist (else: run `lance-pipeline curate` first), their schema version,
that their token ids were made with the stage model's tokenizer, and that every task group of the
mixture has rows for every worker, with the validation hold-out cut so that it never takes a
group's last rows. Each is a `ConfigError` (one line, exit 2 from the CLI). Then it opens the
stage's MLflow child run (or reopens it when the stage is re-run in the same work dir), and runs
`TorchTrainer` with FailureConfig retries, which are for what can succeed on a retry: a failing
worker group is restarted from the newest complete checkpoint and continues the same run. The final
checkpoint is exported to `<workdir>/<stage>/final` (loadable with `Lance.from_pretrained`): the
workers write sharded checkpoints under `<workdir>/<stage>/checkpoints` (a LoRA stage: its adapters
through Ray Train's checkpoints), and the driver streams the last one into the full layout. A LoRA
stage (`lora.enabled`) checks its targets before Ray starts; its last checkpoint holds adapters only,
exported to `<stage>/adapters`, and `<stage>/final` is the base with them folded in.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lance_platform.config import ConfigError, flatten, load_config, to_dict
from lance_platform.runtime import init_ray
from lance_platform.schema import check_tokenizer, check_version, describe_tokenizer, shard_tokenizer
from lance_platform.tracking import Tracker, default_tracking_uri

from .config import PipelineConfig, StageConfig, load_stage_config

log = logging.getLogger(__name__)
# What `<stage>/final` keeps of the last checkpoint: the model, EMA and optimizer state, not the data position.
SPLIT_BLOCK_MAX = 256
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


CURATE_HINT = "run `lance-pipeline curate --config configs/curation/<corpus>.yaml` first and point data.shards at its output.dir"


def shard_files(path: str | Path) -> list[str]:
    """A shard file, a directory of shards, or a curated dataset root (its manifest lists the shards;
    the ledger and quarantine tables beside them are not training data)."""
    if not str(path):
        raise ConfigError(f"data.shards is not set: {CURATE_HINT}")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"data.shards={str(path)!r}: no such file or directory; {CURATE_HINT}")
    manifest = path / "manifest.json"
    if manifest.is_file():
        files = [path / entry["path"] for entry in json.loads(manifest.read_text()).get("shards", [])]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ConfigError(f"data.shards={str(path)!r}: {manifest} lists shards that are missing ({absent[0]}"
                              f"{f' and {len(absent) - 1} more' if len(absent) > 1 else ''}); curate it again")
    else:
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise ConfigError(f"data.shards={str(path)!r}: no Parquet shards there; {CURATE_HINT}")
    for f in files:
        check_version(f)
    return [str(f) for f in files]


@dataclass
class DataPlan:
    """What the driver found out about a stage's data before starting Ray Train."""

    files: list[str]
    task_counts: dict[str, int]  # rows per shard task
    holdout: dict[str, int] = field(default_factory=dict)  # validation rows held out per task group
    group_rows: dict[str, int] = field(default_factory=dict)  # rows per task group (before the hold-out)
    tokenizer: dict | None = None  # the shards' tokenizer record


def _manifest_entries(path: Path) -> list[dict] | None:
    """The manifest's shard entries for a dataset root or its `shards/` directory (None: no manifest)."""
    for candidate in (path / "manifest.json", path.parent / "manifest.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text()).get("shards", [])
    return None


def task_counts(shards: str | Path, files: list[str]) -> dict[str, int]:
    """Rows per task: from the manifest's per-shard counts when it has them, else from the shards'
    `task` column (one column read, no tensors)."""
    import pyarrow.parquet as pq

    entries = _manifest_entries(Path(shards))
    if entries and all("tasks" in e for e in entries):
        counts: Counter = Counter()
        for e in entries:
            counts.update(e["tasks"])
        return dict(counts)
    counts = Counter()
    for f in files:
        counts.update(pq.read_table(f, columns=["task"]).column("task").to_pylist())
    return dict(counts)


def group_rows(stage: StageConfig, counts: dict[str, int], files: list[str]) -> dict[str, int]:
    """Rows per task group: sums of the rows per task, or, when a group selects by `uri_prefixes`,
    counted over the shards' task and source_uri columns (two columns read, no tensors)."""
    groups = stage.mixture.groups
    if not any(g.uri_prefixes for g in groups.values()):
        return {name: sum(counts.get(t, 0) for t in g.tasks) for name, g in groups.items()}
    from .batching import ShardRows, group_members

    return {name: len(rows) for name, rows in group_members(ShardRows(files), dict(groups)).items()}


def plan_holdout(stage: StageConfig, counts: dict[str, int], rows_of: dict[str, int], where: str) -> dict[str, int]:
    """Check the mixture against the rows of each group (`rows_of`, from `group_rows`; `counts`, the
    rows per task, name what the data holds) and choose each group's hold-out.

    A group that can be drawn (a positive weight at some step) must have rows, and at least one per
    worker; the hold-out never takes the rows the workers need (it shrinks, with a warning)."""
    world = stage.scaling.num_workers
    present = {t: n for t, n in sorted(counts.items()) if n}
    holdout = {}
    for name, group in stage.mixture.groups.items():
        rows = rows_of[name]
        of = f"{list(group.tasks)}" + (f" from {list(group.uri_prefixes)}" if group.uri_prefixes else "")
        drawn = group.ever_drawn()
        if drawn and rows == 0:
            raise ConfigError(f"mixture.groups.{name}: no rows of its tasks {of} in {where} "
                              f"(rows per task there: {present}); remove the group, set its weight to 0, "
                              "or curate data for those tasks" + (" and sources" if group.uri_prefixes else ""))
        if drawn and rows < world:
            raise ConfigError(f"mixture.groups.{name}: {rows} row(s) of {of} in {where} for "
                              f"scaling.num_workers={world}; every worker needs at least one: curate more rows "
                              "or use fewer workers")
        want = stage.data.holdout_per_group
        holdout[name] = max(0, min(want, rows - world)) if drawn else min(want, rows)
        if holdout[name] < want:
            log.warning("mixture.groups.%s has %d row(s): %d held out for validation instead of "
                        "data.holdout_per_group=%d, so that each of the %d worker(s) keeps training rows",
                        name, rows, holdout[name], want, world)
    return holdout


def model_tokenizer(stage: StageConfig, init_path: str | None) -> str:
    """The tokenizer spec of the model the stage trains (what `train_loop.build_model` builds)."""
    from lance_model.config import LanceConfig

    override = stage.model.overrides.get("tokenizer")
    kind = stage.init.kind
    if kind == "preset":
        return LanceConfig.from_preset(stage.model.preset, **stage.model.overrides).tokenizer
    directory = Path(init_path or stage.init.path or "")
    if override:
        return str(override)
    if kind == "qwen25vl":  # as lance_model.checkpoint.read_qwen25vl: the directory's own tokenizer files
        if (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file():
            return str(directory)
        return LanceConfig.from_preset("lance-3b").tokenizer
    return LanceConfig.from_pretrained(directory).tokenizer


def check_shard_tokenizer(stage: StageConfig, files: list[str], init_path: str | None) -> dict:
    """The shards' tokenizer record, refused unless every shard has one and it is the model's."""
    from lance_model.tokenizer import load_tokenizer, tokenizer_record

    records = {f: shard_tokenizer(f) for f in files}
    unrecorded = [f for f, r in records.items() if r is None]
    if unrecorded:
        raise ConfigError(f"data.shards: {unrecorded[0]} does not record the tokenizer of its token ids "
                          f"(written before shards recorded it); {CURATE_HINT}")
    first_file, first = next(iter(records.items()))
    for f, r in records.items():
        if r != first:
            raise ConfigError(f"data.shards: {first_file} and {f} hold token ids of different tokenizers, "
                              f"{describe_tokenizer(first)} and {describe_tokenizer(r)}")
    spec = model_tokenizer(stage, init_path)
    check_tokenizer(first, tokenizer_record(load_tokenizer(spec)), f"data.shards={stage.data.shards!r}",
                    f"stage {stage.name}'s model (tokenizer {spec!r})")
    return first


def plan_data(stage: StageConfig, init_path: str | None = None, tokenizer: bool = True) -> DataPlan:
    """Every deterministic data check of a stage, in the driver before Ray starts (ConfigError)."""
    files = shard_files(stage.data.shards)
    counts = task_counts(stage.data.shards, files)
    rows = group_rows(stage, counts, files)
    holdout = plan_holdout(stage, counts, rows, f"data.shards={stage.data.shards!r}")
    record = check_shard_tokenizer(stage, files, init_path) if tokenizer else None
    return DataPlan(files, counts, holdout, tokenizer=record, group_rows=rows)


def split_block(stage: StageConfig, plan: DataPlan) -> int:
    """Consecutive rows of a task group dealt to one worker (`pipelines.batching`): long runs keep a
    worker's reads within few Parquet row groups; short ones (small data) keep every worker fed from
    the first epoch on."""
    sizes = [plan.group_rows[name] - plan.holdout.get(name, 0) for name in stage.mixture.groups]
    smallest = min((n for n in sizes if n > 0), default=1)
    return max(1, min(SPLIT_BLOCK_MAX, smallest // (4 * stage.scaling.num_workers)))


def _run_id_file(stage_dir: Path) -> Path:
    return stage_dir / "mlflow_run_id"


def run_stage(stage: StageConfig, workdir: str | Path, parent_run_id: str | None = None,
              init_path: str | None = None, experiment: str = "lance", address: str | None = None) -> StageResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchTrainer

    shard_files(stage.data.shards)  # first: a missing dataset says to curate one
    stage.validate()
    if stage.init.kind == "previous" and not init_path:
        raise ConfigError(f"stage {stage.name}: init.kind='previous' needs a previous stage's checkpoint")
    plan = plan_data(stage, init_path)
    check_lora(stage, init_path)
    workdir = Path(workdir).resolve()
    stage_dir = workdir / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
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
                           "run_id": run_id, "experiment": experiment, "storage_dir": str(stage_dir),
                           "holdout": plan.holdout, "files": plan.files,
                           "split_block": split_block(stage, plan)},
        scaling_config=RayScaling(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                  resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(name=f"{stage.name}", storage_path=str(stage_dir / "ray"),
                             failure_config=FailureConfig(max_failures=stage.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=stage.keep_checkpoints)),
    )
    try:
        result = trainer.fit()
    except Exception:
        tracker.end("FAILED")
        raise
    final = stage_dir / "final"
    if stage.lora_enabled:
        finish_lora_stage(stage, Path(result.checkpoint.path), stage_dir, init_path)
    else:
        export_final(stage, stage_dir, final)
    metrics = dict(result.metrics or {})
    from .train_loop import FINAL_METRICS

    if "loss" not in metrics and (stage_dir / FINAL_METRICS).is_file():
        # sharded checkpoints are not reported to Ray, which then keeps no metrics: rank 0 wrote them
        metrics = json.loads((stage_dir / FINAL_METRICS).read_text())
    tracker.set_tags({"checkpoint": str(final)})
    tracker.log_dict(metrics, "final_metrics.json")
    tracker.end("FINISHED")
    return StageResult(stage.name, stage.steps, metrics.get("loss"), final, run_id, metrics)


def _train_loop_entry(config: dict) -> None:
    from .train_loop import train_loop

    train_loop(config)


def check_lora(stage: StageConfig, init_path: str | None) -> None:
    """LoRA targets that select no Linear layer of the stage's model stop the stage here, before
    Ray starts (`ConfigError` naming `lora.targets`); a `lora` section left disabled is said."""
    if stage.lora is not None and not stage.lora.enabled:
        log.warning("stage %s: a lora section is set but lora.enabled is false: training every weight", stage.name)
    if stage.lora_enabled:
        from . import adapters
        from .train_loop import model_source

        adapters.check_targets(stage, model_source(stage, init_path).config)


def finish_lora_stage(stage: StageConfig, source: Path, stage_dir: Path, init_path: str | None) -> Path:
    """A LoRA stage's last checkpoint (adapters) to `<stage>/adapters`, and the base with them
    folded in to `<stage>/final` (what the next stage and `generate` read). Returns `final`."""
    from . import adapters
    from .train_loop import build_model

    exported = stage_dir / adapters.ADAPTERS_DIR
    export_checkpoint(source, exported)
    return adapters.merge_adapters(build_model(stage, init_path), stage, exported, stage_dir / "final", init_path)


def export_final(stage: StageConfig, stage_dir: Path, target: Path) -> None:
    """Stream the stage's last sharded checkpoint (`<stage dir>/checkpoints`, written by every
    worker) into the full layout at `target` on the driver's CPU: the official-layout weights and
    EMA, the name-keyed optimizer state and the trainer state, with a manifest. Only the last
    checkpoint is exported; the ones during the stage stay sharded."""
    from lance_platform import checkpoint as ckpt
    from lance_platform.sharded_checkpoint import export, latest_valid

    chosen, skipped = latest_valid(stage_dir / "checkpoints", "step-*")
    if chosen is None:
        raise ckpt.CheckpointError(f"stage {stage.name}: no complete checkpoint under {stage_dir / 'checkpoints'}"
                                   f"{': ' + ckpt.fallback_note(None, skipped) if skipped else ''}")
    step = ckpt.read_trainer_state(chosen)["step"]
    if step != stage.steps:
        raise ckpt.CheckpointError(f"stage {stage.name}: its newest complete checkpoint {chosen} is at step {step}, "
                                   f"not the last step {stage.steps}")
    export(chosen, target, layout="lance")


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
        shard_files(stage.data.shards)
        stages.append(stage.validate())
    for stage in stages:  # every stage's data checked before the first one starts
        plan_data(stage, tokenizer=stage.init.kind == "preset")
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

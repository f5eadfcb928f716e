"""Stage and pipeline configs (configs/stages/*.yaml): validated before Ray starts.

A stage (PT, CT or SFT) says where its weights start, which curated shards it reads, how task
groups are mixed (with an optional progressive schedule that moves each group's weight from
`weight` to `end_weight` over `ramp_steps`), how samples are packed, the optimiser and LR schedule,
checkpoint cadence, EMA, validation and the Ray Train scaling. Every mistake is reported with the
dotted field name, the value and what was expected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lance_platform.schema import SHARD_TASKS
from lance_platform.config import ConfigError, load_config

INIT_KINDS = ("preset", "previous", "lance", "qwen25vl")
SCHEDULES = ("constant", "cosine")


def _need(cond: bool, name: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: expected {expected}")


@dataclass
class TaskGroup:
    tasks: tuple[str, ...] = ("t2i",)
    weight: float = 1.0
    end_weight: float | None = None  # progressive schedule target (None: constant weight)


@dataclass
class MixtureConfig:
    groups: dict[str, TaskGroup] = field(default_factory=lambda: {"t2i": TaskGroup()})
    ramp_steps: int = 0  # steps over which weights move linearly from weight to end_weight

    def __post_init__(self) -> None:
        self.groups = {k: (v if isinstance(v, TaskGroup) else _task_group(v, f"mixture.groups.{k}"))
                       for k, v in (self.groups or {}).items()}

    def validate(self) -> None:
        _need(bool(self.groups), "mixture.groups", self.groups, "at least one task group")
        for name, g in self.groups.items():
            prefix = f"mixture.groups.{name}"
            _need(len(g.tasks) > 0, f"{prefix}.tasks", list(g.tasks), "a non-empty list of tasks")
            for t in g.tasks:
                _need(t in SHARD_TASKS, f"{prefix}.tasks", list(g.tasks), f"tasks among {SHARD_TASKS} ({t!r} is not)")
            for key in ("weight", "end_weight"):
                v = getattr(g, key)
                if v is not None:
                    _need(isinstance(v, (int, float)) and v >= 0 and math.isfinite(v), f"{prefix}.{key}", v,
                          "a non-negative number")
        _need(sum(g.weight for g in self.groups.values()) > 0, "mixture.groups.*.weight",
              {k: g.weight for k, g in self.groups.items()}, "weights with a positive sum")
        ends = [g.end_weight if g.end_weight is not None else g.weight for g in self.groups.values()]
        _need(sum(ends) > 0, "mixture.groups.*.end_weight", ends, "end weights with a positive sum")
        _need(self.ramp_steps >= 0, "mixture.ramp_steps", self.ramp_steps, "a non-negative integer")


def _task_group(value: Any, prefix: str) -> TaskGroup:
    from lance_platform.config import from_dict

    return from_dict(TaskGroup, value, prefix + ".")


@dataclass
class InitConfig:
    kind: str = "preset"  # preset: random init of `model.preset`; previous: the prior stage's checkpoint;
    path: str | None = None  # lance: a Lance checkpoint dir; qwen25vl: a Qwen2.5-VL checkpoint dir
    weights: str = "auto"  # which file of a Lance dir: auto / model / ema


@dataclass
class ModelConfig:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # LanceConfig fields (e.g. ce_weight)
    activation_checkpointing: bool = False
    compile: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"


@dataclass
class DataConfig:
    shards: str = ""  # directory (or file) of curated Parquet shards
    max_tokens: int = 4096  # tokens per pack
    max_sample_tokens: int | None = None  # larger samples are skipped and counted (default: max_tokens)
    holdout_per_group: int = 0  # rows per task group reserved for validation (taken first, never trained on)


@dataclass
class ValidationConfig:
    every: int = 0  # steps between validations (0: only at the end)
    seed: int = 1234
    samples: int = 4  # generated images / x2t answers from held-out rows, logged as artifacts (0: off)
    sample_steps: int = 12  # denoising steps for those samples


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    peak_tflops: float = 0.0  # per-GPU bf16 peak for the MFU metric (798 measured on the H100); 0: no MFU


@dataclass
class StageConfig:
    name: str = "pt"
    steps: int = 10
    seed: int = 0
    init: InitConfig = field(default_factory=InitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    ema_decay: float = 0.0  # 0: no EMA
    max_failures: int = 1  # worker failures Ray Train recovers from (resume from the last checkpoint)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    log_every: int = 1

    def validate(self, require_shards: bool = True) -> StageConfig:
        from lance_model.config import PRESETS

        _need(isinstance(self.steps, int) and self.steps > 0, "steps", self.steps, "a positive integer")
        _need(self.init.kind in INIT_KINDS, "init.kind", self.init.kind, f"one of {INIT_KINDS}")
        if self.init.kind in ("lance", "qwen25vl"):
            _need(bool(self.init.path) and Path(self.init.path).is_dir(), "init.path", self.init.path,
                  f"an existing checkpoint directory for init.kind={self.init.kind!r}")
        _need(self.model.preset in PRESETS, "model.preset", self.model.preset, f"one of {sorted(PRESETS)}")
        if require_shards:
            _need(bool(self.data.shards) and Path(self.data.shards).exists(), "data.shards", self.data.shards,
                  "an existing directory of curated shards")
        _need(self.data.max_tokens > 0, "data.max_tokens", self.data.max_tokens, "a positive integer")
        self.mixture.validate()
        o = self.optim
        _need(o.lr > 0, "optim.lr", o.lr, "a positive learning rate")
        _need(0 <= o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"between 0 and optim.lr ({o.lr})")
        _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "two values in [0, 1)")
        _need(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"one of {SCHEDULES}")
        _need(o.grad_clip > 0, "optim.grad_clip", o.grad_clip, "a positive number")
        _need(0 <= o.warmup_steps, "optim.warmup_steps", o.warmup_steps, "a non-negative integer")
        _need(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "a value in [0, 1)")
        _need(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "a non-negative integer")
        _need(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "at least 1")
        _need(self.scaling.num_workers >= 1, "scaling.num_workers", self.scaling.num_workers, "at least 1")
        _need(self.max_failures >= 0, "max_failures", self.max_failures, "a non-negative integer")
        return self


def load_stage_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      require_shards: bool = True) -> StageConfig:
    cfg = load_config(StageConfig, path, overrides, validate=False)
    return cfg.validate(require_shards=require_shards)


@dataclass
class PipelineConfig:
    """Stages run in order; each (but the first) starts from the previous stage's final checkpoint."""

    name: str = "lance"
    workdir: str = "runs/pipeline"
    experiment: str = "lance"
    shards: str = ""  # default data.shards for every stage
    stages: list[str] = field(default_factory=lambda: ["configs/stages/pt.yaml", "configs/stages/ct.yaml",
                                                        "configs/stages/sft.yaml"])
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)  # stage name -> overrides

    def validate(self) -> PipelineConfig:
        _need(bool(self.stages), "stages", self.stages, "at least one stage config")
        for s in self.stages:
            _need(Path(s).is_file(), "stages", s, "paths of existing stage config files")
        return self

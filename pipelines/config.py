"""Stage and pipeline configs (configs/stages/*.yaml): validated before Ray starts.

A stage (PT, CT or SFT) says where its weights start, which curated shards it reads, how task
groups are mixed (a group is rows of some tasks, optionally only those of some sources by
`uri_prefixes`; an optional progressive schedule moves each group's weight from `weight` to
`end_weight` over `ramp_steps`, or a group's `schedule` of [step, weight] keyframes gives it at every
step, e.g. a curriculum from easy sources to hard ones), how samples are packed, the optimiser and LR schedule,
checkpoint cadence, EMA, validation and the Ray Train scaling, and optional LoRA adapters (`lora`,
`lance_platform.lora.LoraConfig`: with `lora.enabled` only the adapters train). Every mistake is
reported with the dotted field name, the value and what was expected.
"""
from __future__ import annotations

import itertools
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from lance_model.config import PRESETS, PresetName
from lance_model.configio import (
    Int,
    NonEmptyStr,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    configclass,
    require,
    shard_size_fits,
)
from lance_platform.config import ConfigError, load_config
from lance_platform.lora import LoraConfig

InitKind = Literal["preset", "previous", "lance", "qwen25vl"]
Schedule = Literal["constant", "cosine"]
INIT_KINDS: tuple[str, ...] = InitKind.__args__
SCHEDULES: tuple[str, ...] = Schedule.__args__
Beta = Annotated[float, Field(ge=0, lt=1)]
# Sections of the model config fixed by a checkpoint (overridable only for init.kind=preset).
MODEL_SECTIONS = ("text", "vit", "vae")


@configclass
class TaskGroup:
    tasks: Annotated[tuple[str, ...], Field(min_length=1)] = ("t2i",)
    weight: NonNegativeFloat = 1.0
    end_weight: NonNegativeFloat | None = None  # progressive schedule target (None: constant weight)
    # only the rows of `tasks` whose source_uri starts with one of these: `synthetic://<name>/` for a
    # synthetic source, a folder or bucket path for files (a mixture over sources); empty: every row
    uri_prefixes: tuple[NonEmptyStr, ...] = ()
    # the weight as [step, weight] keyframes with rising steps, linear between them and held before
    # the first and after the last (e.g. [[0, 0], [200, 1], [400, 0]]: a stage of a curriculum); it
    # stands for weight / end_weight / mixture.ramp_steps, which a group with a schedule leaves unset
    schedule: tuple[tuple[NonNegativeInt, NonNegativeFloat], ...] = ()

    def takes(self, task: str | None, uri: str | None) -> bool:
        return task in self.tasks and (not self.uri_prefixes or any(str(uri or "").startswith(p)
                                                                     for p in self.uri_prefixes))

    def weight_at(self, step: int, ramp_steps: int) -> float:
        """The raw (unnormalised) weight at `step`: the schedule's, else weight ramped linearly to
        end_weight over `ramp_steps`."""
        if self.schedule:
            for (s0, w0), (s1, w1) in itertools.pairwise(self.schedule):
                if s0 <= step < s1:
                    return w0 + (w1 - w0) * (step - s0) / (s1 - s0)
            return self.schedule[0][1] if step < self.schedule[0][0] else self.schedule[-1][1]
        frac = 1.0 if ramp_steps <= 0 else min(max(step / ramp_steps, 0.0), 1.0)
        end = self.weight if self.end_weight is None else self.end_weight
        return self.weight + (end - self.weight) * frac

    def ever_drawn(self) -> bool:
        """Whether the group has a positive weight at some step."""
        if self.schedule:
            return any(w > 0 for _, w in self.schedule)
        return self.weight > 0 or (self.end_weight or 0) > 0


@configclass
class MixtureConfig:
    groups: Annotated[dict[str, TaskGroup], Field(min_length=1)] = field(default_factory=lambda: {"t2i": TaskGroup()})
    ramp_steps: NonNegativeInt = 0  # steps over which weights move linearly from weight to end_weight

    def validate(self) -> None:
        """Cross-field rules: known tasks, weights with a positive sum (types and ranges: `from_dict`)."""
        from lance_platform.schema import SHARD_TASKS

        for name, g in self.groups.items():
            for t in g.tasks:
                require(t in SHARD_TASKS, f"mixture.groups.{name}.tasks", list(g.tasks),
                        f"tasks among {SHARD_TASKS} ({t!r} is not)")
        for (a, ga), (b, gb) in itertools.combinations(self.groups.items(), 2):
            shared = sorted(set(ga.tasks) & set(gb.tasks))
            pa, pb = ga.uri_prefixes, gb.uri_prefixes
            overlap = not pa or not pb or any(x.startswith(y) or y.startswith(x) for x in pa for y in pb)
            require(not (shared and overlap), f"mixture.groups.{b}", {"tasks": list(gb.tasks), "uri_prefixes": list(pb)},
                    f"rows in no other group: it shares tasks {shared} with group {a!r} (uri_prefixes "
                    f"{list(pa)}); give both groups uri_prefixes that do not overlap")
        for name, g in self.groups.items():
            if not g.schedule:
                continue
            steps = [s for s, _ in g.schedule]
            require(all(a < b for a, b in itertools.pairwise(steps)), f"mixture.groups.{name}.schedule",
                    [list(k) for k in g.schedule], "[step, weight] keyframes with rising steps")
            require(g.weight == 1.0 and g.end_weight is None, f"mixture.groups.{name}",
                    {"weight": g.weight, "end_weight": g.end_weight},
                    "no weight or end_weight beside a schedule (the schedule gives the weight at every step)")
        # Every weight is piecewise linear in the step, so their sum is positive at every step when it
        # is at every keyframe, at step 0 and at the end of the ramp.
        points = sorted({0, self.ramp_steps, *(s for g in self.groups.values() for s, _ in g.schedule)})
        for step in points:
            weights = {k: g.weight_at(step, self.ramp_steps) for k, g in self.groups.items()}
            require(sum(weights.values()) > 0, "mixture.groups.*.weight", weights,
                    f"weights with a positive sum at every step (at step {step} they sum to 0)")


@configclass
class InitConfig:
    kind: InitKind = "preset"  # preset: random init of `model.preset`; previous: the prior stage's checkpoint;
    path: str | None = None  # lance: a Lance checkpoint dir; qwen25vl: a Qwen2.5-VL checkpoint dir
    weights: str = "auto"  # which file of a Lance dir: auto / model / ema


@configclass
class ModelConfig:
    preset: PresetName = "tiny"  # init.kind=qwen25vl: the fields the Qwen2.5-VL checkpoint does not fix
    overrides: dict[str, Any] = field(default_factory=dict)  # LanceConfig fields (e.g. ce_weight)
    activation_checkpointing: bool = False
    # with activation_checkpointing: recompute every n-th decoder layer (1 = all; 2 = half of them)
    activation_checkpointing_every: PositiveInt = 1
    compile: bool = False

    def validate(self, init_kind: str = "preset") -> None:
        """The overrides, applied to the preset, give a valid model config (checked in the driver,
        before Ray starts). A checkpoint fixes the architecture: other init kinds may override only
        top-level fields (loss weights, dropouts, freezing); one line names every section overridden.
        For `qwen25vl` the preset with its overrides supplies every field but the text and ViT shapes."""
        if init_kind != "preset":
            fixed = [key for key in MODEL_SECTIONS if key in self.overrides]
            require(not fixed, "model.overrides", {k: self.overrides[k] for k in fixed},
                    f"no override of {', '.join(fixed)} for init.kind={init_kind!r} (the checkpoint fixes the "
                    "architecture; override only top-level fields such as ce_weight)")
        PRESETS[self.preset]().with_overrides(self.overrides, "model.overrides.")


@configclass
class OptimConfig:
    lr: PositiveFloat = 1e-4
    min_lr: NonNegativeFloat = 1e-6
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    eps: PositiveFloat = 1e-15
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: PositiveFloat = 1.0
    warmup_steps: NonNegativeInt = 0
    schedule: Schedule = "constant"
    # AdamW's fused CUDA kernel (GPU workers only; CPU workers use the default implementation)
    fused: bool = False


@configclass
class DataConfig:
    shards: str = ""  # directory (or file) of curated Parquet shards
    max_tokens: PositiveInt = 4096  # tokens per pack
    max_sample_tokens: PositiveInt | None = None  # larger samples are skipped and counted (default: max_tokens)
    holdout_per_group: NonNegativeInt = 0  # rows per task group reserved for validation (taken first, never trained on)
    # pack the next steps in a separate process (a forked DataLoader worker; GPU workers get the packs
    # in page-locked memory) instead of a thread of the training worker: packing's Python then never
    # holds the interpreter the training thread launches its kernels from
    pack_process: bool = False


@configclass
class ValidationConfig:
    every: NonNegativeInt = 0  # steps between validations (0: only at the end)
    seed: Int = 1234
    samples: NonNegativeInt = 4  # generated images / x2t answers from held-out rows, logged as artifacts (0: off)
    sample_steps: PositiveInt = 12  # denoising steps for those samples


@configclass
class ProfileConfig:
    """`torch.profiler` over a few steps of one rank (pipelines.profiling): op tables and a trace under
    <stage dir>/profile, and how busy the GPU was."""

    steps: NonNegativeInt = 0       # steps profiled (0: off)
    start_step: NonNegativeInt = 10  # the first profiled step (after warm-up: allocator, autotuning)
    rank: NonNegativeInt = 0
    trace: bool = True              # also a Chrome trace (trace.json, for chrome://tracing or Perfetto)


@configclass
class ScalingConfig:
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    peak_tflops: NonNegativeFloat = 0.0  # per-GPU bf16 peak for the MFU metric (798 measured on the H100); 0: no MFU
    # ranks per FSDP shard group: 0 (or num_workers) shards over all workers (FSDP); a divisor d of
    # num_workers below it is HSDP: sharded over d consecutive workers (a node), num_workers // d replicas
    shard_size: NonNegativeInt = 0

    def validate(self) -> None:
        """`shard_size` fits `num_workers` (0 or a divisor of it)."""
        s, n = self.shard_size, self.num_workers
        require(shard_size_fits(s, n), "scaling.shard_size", s,
                f"0 (all workers shard) or a divisor of scaling.num_workers ({n}) up to it (HSDP: "
                f"{n} workers in replicas of shard_size workers each)")


@configclass
class StageConfig:
    name: str = "pt"
    steps: PositiveInt = 10
    seed: Int = 0
    init: InitConfig = field(default_factory=InitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint_every: NonNegativeInt = 0  # 0: only at the end
    keep_checkpoints: PositiveInt = 2
    ema_decay: Beta = 0.0  # 0: no EMA
    max_failures: NonNegativeInt = 1  # worker failures Ray Train recovers from (resume from the last checkpoint)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    log_every: PositiveInt = 1
    lora: LoraConfig | None = None  # `lora.enabled=true`: train LoRA adapters on a frozen base (pipelines.adapters)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    @property
    def lora_enabled(self) -> bool:
        return self.lora is not None and self.lora.enabled

    def validate(self, require_shards: bool = True) -> StageConfig:
        """Cross-field rules and paths (types and ranges are checked when the config is loaded)."""
        if self.init.kind in ("lance", "qwen25vl"):
            require(bool(self.init.path) and Path(self.init.path).is_dir(), "init.path", self.init.path,
                    f"an existing checkpoint directory for init.kind={self.init.kind!r}")
        if require_shards:
            require(bool(self.data.shards) and Path(self.data.shards).exists(), "data.shards", self.data.shards,
                    "an existing directory of curated shards")
        self.model.validate(self.init.kind)
        self.mixture.validate()
        self.scaling.validate()
        if self.lora is not None:
            self.lora.validate("lora")
        p = self.profile
        require(p.steps == 0 or p.start_step + p.steps <= self.steps, "profile.start_step", p.start_step,
                f"a start step whose {p.steps} profiled steps end by the stage's last step ({self.steps})")
        require(p.rank < self.scaling.num_workers, "profile.rank", p.rank,
                f"a worker rank below scaling.num_workers ({self.scaling.num_workers})")
        o = self.optim
        require(o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"between 0 and optim.lr ({o.lr})")
        return self


def load_stage_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      require_shards: bool = True, prefix: str = "") -> StageConfig:
    """A stage YAML plus overrides, validated; `prefix` (e.g. `pt.`) goes in front of field names."""
    cfg = load_config(StageConfig, path, overrides, validate=False, prefix=prefix)
    try:
        return cfg.validate(require_shards=require_shards)
    except ConfigError as exc:
        raise exc.prefixed(prefix) from None


@configclass
class PipelineConfig:
    """Stages run in order; each (but the first) starts from the previous stage's final checkpoint."""

    name: str = "lance"
    workdir: str = "runs/pipeline"
    experiment: str = "lance"
    shards: str = ""  # default data.shards for every stage
    stages: Annotated[list[str], Field(min_length=1)] = field(default_factory=lambda: [
        "configs/stages/pt.yaml", "configs/stages/ct.yaml", "configs/stages/sft.yaml"])
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)  # stage name -> overrides

    def validate(self) -> PipelineConfig:
        for s in self.stages:
            require(Path(s).is_file(), "stages", s, "paths of existing stage config files")
        return self

"""The GRPO run config (configs/rl/*.yaml): typed dataclasses, validated before Ray or a model starts.

Loaded with `lance_platform.config.load_config(RLConfig, path, overrides)`, so every field can be
overridden from the command line (`grpo.beta=0`, `reward.weights={ocr: 1.0}`) and a bad value is a
`ConfigError` naming the dotted field, the value and what was expected.
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field

from lance_model.config import PresetName
from lance_model.configio import (
    Int,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_types,
    configclass,
    require,
    shard_size_fits,
)
from lance_platform.lora import LoraConfig

from .monitors import MonitorConfig
from .ocr import OcrConfig
from .rewards import check_weights

Beta = Annotated[float, Field(ge=0, lt=1)]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu or cuda[:N]")]


@configclass
class PolicyConfig:
    checkpoint: str | None = None  # a Lance checkpoint directory; None = random init of `preset`
    preset: PresetName = "tiny"
    weights: str = "auto"  # which file of the checkpoint dir: auto / model / ema
    device: Device = "auto"  # auto = cuda when available


@configclass
class PromptConfig:
    file: str | None = None  # one prompt per line, target text in double quotes
    synthetic: PositiveInt = 16  # synthetic prompts when no file is given
    eval_file: str | None = None  # held-out prompts (OCR accuracy with the ODE sampler)
    eval_synthetic: NonNegativeInt = 4


@configclass
class RolloutConfig:
    height: PositiveInt = 32
    width: PositiveInt = 32
    prompts_per_step: PositiveInt = 2  # B
    # G: advantages compare samples within a group
    group_size: Annotated[int, Field(strict=True, ge=2, description="an integer >= 2 (advantages compare "
                                                                      "samples within a group)")] = 4
    steps: PositiveInt = 10  # SDE steps per rollout
    shift: PositiveFloat = 3.5
    cfg_scale: float = 4.5
    noise_level: Annotated[float, Field(gt=0, description="a positive number (the SDE needs noise)")] = 0.7
    microbatch: PositiveInt = 4  # samples per rollout/training micro-batch (the same chunks both times)
    kv_cache: bool = False  # faster rollouts, but the first-step ratio is then only ~1, not exactly 1
    windowed: bool = False  # the "fast" variant: noise (and training) only in a random window
    window: tuple[PositiveInt, PositiveInt] = (1, 3)
    eval_steps: PositiveInt = 40  # deterministic ODE sampler for held-out OCR accuracy
    eval_cfg_scale: float = 4.5
    # Rollout workers (rl.rollout_actors): 0 = the driver samples with its own policy; N = N Ray
    # actors, each with a copy of the policy, sampling their share of the micro-batches
    num_workers: NonNegativeInt = 0
    # colocated: the actors share the training GPUs and the idle side is offloaded to host memory
    # (CUDA only); disaggregated: separate GPU sets, nothing offloaded
    layout: Literal["colocated", "disaggregated"] = "colocated"
    num_gpus: NonNegativeFloat = 0.0  # per rollout worker (fractions share a GPU)
    num_cpus: NonNegativeFloat = 1.0  # per rollout worker
    max_lag: NonNegativeInt = 0  # rollouts up to this many weight versions old are counted (rollout/stale); older: error
    max_retries: NonNegativeInt = 2  # re-sends of a micro-batch whose rollout worker died


@configclass
class GrpoConfig:
    beta: NonNegativeFloat = 0.04  # KL weight (0: no reference model is kept)
    clip_range: Annotated[float, Field(gt=0, lt=1)] | None = None  # None: 1e-4, or 1e-5 for the windowed variant
    adv_clip: PositiveFloat = 5.0
    global_std: bool = False
    inner_epochs: PositiveInt = 1
    # Training workers (rl.train_workers): 1 = the update runs in the driver; N = N Ray actors in one
    # torch.distributed group (gloo on CPU, NCCL with GPUs), the policy sharded with FSDP2
    train_workers: PositiveInt = 1
    train_num_gpus: NonNegativeFloat = 0.0  # per training worker (> 0: CUDA and NCCL)
    train_num_cpus: NonNegativeFloat = 1.0  # per training worker
    # ranks per FSDP2 shard group of the training workers: 0 (or train_workers) shards over all of them;
    # a divisor d below it is HSDP, train_workers // d replicas each sharding over d workers
    train_shard_size: NonNegativeInt = 0

    def resolved_clip_range(self, windowed: bool) -> float:
        from .grpo import default_clip_range

        return self.clip_range if self.clip_range is not None else default_clip_range(windowed)


@configclass
class OptimConfig:
    lr: PositiveFloat = 1e-4
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    weight_decay: NonNegativeFloat = 1e-4
    eps: PositiveFloat = 1e-8
    grad_clip: PositiveFloat = 1.0


@configclass
class RewardConfig:
    """The reward actor pool. `num_gpus` is reserved per actor only for an engine that runs on a
    GPU: PaddleOCR with `ocr.paddle_device: gpu[:N]`. The RapidOCR engine builds CPU onnxruntime
    sessions, so with it (and with PaddleOCR on the CPU) a `num_gpus > 0` is ignored with a warning
    and no GPU is reserved (`rl.actors.actor_gpus`)."""

    weights: dict[str, float] = field(default_factory=lambda: {"ocr": 1.0})
    num_actors: PositiveInt = 2
    num_cpus: NonNegativeFloat = 1.0  # per actor
    num_gpus: NonNegativeFloat = 0.0  # per actor (fractions share a GPU); only for an OCR engine on a GPU
    max_retries: NonNegativeInt = 2  # re-sends of a chunk whose actor died
    video_frame_stride: PositiveInt = 1
    ocr: OcrConfig = field(default_factory=OcrConfig)


@configclass
class RLConfig:
    name: str = "rl"
    workdir: str = "runs/rl"
    experiment: str = "lance"
    steps: PositiveInt = 2  # GRPO iterations
    seed: Int = 0
    resume: bool = True  # continue from the newest checkpoint in workdir
    checkpoint_every: PositiveInt = 1
    eval_every: NonNegativeInt = 0  # 0: evaluate only at the end
    sample_grid_every: PositiveInt = 1
    tracking: bool = True
    ray_address: str | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    # LoRA on the backbone (default targets: the generation expert's attention and MLP projections):
    # only the adapters train, the reference is the base with adapters disabled, checkpoints hold
    # the adapters (merge with `rl.trainer.merge_lora_checkpoint`)
    lora: LoraConfig = field(default_factory=LoraConfig)
    monitors: MonitorConfig = field(default_factory=MonitorConfig)  # reward-hacking monitors and alarms

    def validate(self) -> RLConfig:
        """Types and ranges (also of values set in code), then the cross-field rules."""
        check_types(self)
        r = self.rollout
        require(r.window[0] <= r.window[1], "rollout.window", r.window, "(min, max) with 1 <= min <= max")
        require(not r.windowed or r.window[0] <= r.steps, "rollout.window", r.window,
                f"a minimum window of at most rollout.steps={r.steps} steps")
        require(r.num_gpus == 0 or r.num_workers > 0, "rollout.num_gpus", r.num_gpus,
                "0 unless rollout.num_workers > 0 (the driver's own sampler reserves nothing)")
        g = self.grpo
        require(g.train_num_gpus == 0 or g.train_num_gpus >= 1, "grpo.train_num_gpus", g.train_num_gpus,
                "0 (CPU, gloo) or a whole number of GPUs >= 1 per training worker (NCCL needs a GPU each)")
        require(shard_size_fits(g.train_shard_size, g.train_workers), "grpo.train_shard_size", g.train_shard_size,
                f"0 (all training workers shard) or a divisor of grpo.train_workers ({g.train_workers}) up to it")
        check_weights(self.reward.weights)
        self.reward.ocr.validate()
        self.lora.validate()
        self.monitors.validate()
        return self

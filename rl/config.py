"""The GRPO run config (configs/rl/*.yaml): typed dataclasses, validated before Ray or a model starts.

Loaded with `lance_platform.config.load_config(RLConfig, path, overrides)`, so every field can be
overridden from the command line (`grpo.beta=0`, `reward.weights={ocr: 1.0}`) and a bad value is a
`ConfigError` naming the dotted field, the value and what was expected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lance_platform.config import ConfigError

from .grpo import default_clip_range
from .ocr import OcrConfig
from .rewards import check_weights


def _need(cond: bool, name: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: expected {expected}")


def _as_float(section: Any, attr: str, prefix: str) -> None:
    """Numbers written as `1e-4` reach us as strings (YAML 1.1 floats need a dot): convert or fail clearly."""
    value = getattr(section, attr)
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return
    try:
        setattr(section, attr, float(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{prefix}{attr}={value!r}: expected a number") from None


FLOAT_FIELDS = {"rollout": ("shift", "cfg_scale", "noise_level", "eval_cfg_scale"),
                "grpo": ("beta", "clip_range", "adv_clip"),
                "optim": ("lr", "weight_decay", "eps", "grad_clip"),
                "reward": ("num_cpus", "num_gpus")}


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass
class PolicyConfig:
    checkpoint: str | None = None  # a Lance checkpoint directory; None = random init of `preset`
    preset: str = "tiny"
    weights: str = "auto"  # which file of the checkpoint dir: auto / model / ema
    device: str = "auto"  # auto = cuda when available


@dataclass
class PromptConfig:
    file: str | None = None  # one prompt per line, target text in double quotes
    synthetic: int = 16  # synthetic prompts when no file is given
    eval_file: str | None = None  # held-out prompts (OCR accuracy with the ODE sampler)
    eval_synthetic: int = 4


@dataclass
class RolloutConfig:
    height: int = 32
    width: int = 32
    prompts_per_step: int = 2  # B
    group_size: int = 4  # G
    steps: int = 10  # SDE steps per rollout
    shift: float = 3.5
    cfg_scale: float = 4.5
    noise_level: float = 0.7
    microbatch: int = 4  # samples per rollout/training micro-batch (the same chunks both times)
    kv_cache: bool = False  # faster rollouts, but the first-step ratio is then only ~1, not exactly 1
    windowed: bool = False  # the "fast" variant: noise (and training) only in a random window
    window: tuple[int, int] = (1, 3)
    eval_steps: int = 40  # deterministic ODE sampler for held-out OCR accuracy
    eval_cfg_scale: float = 4.5


@dataclass
class GrpoConfig:
    beta: float = 0.04  # KL weight (0: no reference model is kept)
    clip_range: float | None = None  # None: 1e-4, or 1e-5 for the windowed variant
    adv_clip: float = 5.0
    global_std: bool = False
    inner_epochs: int = 1

    def resolved_clip_range(self, windowed: bool) -> float:
        return self.clip_range if self.clip_range is not None else default_clip_range(windowed)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"ocr": 1.0})
    num_actors: int = 2
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor (fractions share a GPU)
    max_retries: int = 2  # re-sends of a chunk whose actor died
    video_frame_stride: int = 1
    ocr: OcrConfig = field(default_factory=OcrConfig)


@dataclass
class RLConfig:
    name: str = "rl"
    workdir: str = "runs/rl"
    experiment: str = "lance"
    steps: int = 2  # GRPO iterations
    seed: int = 0
    resume: bool = True  # continue from the newest checkpoint in workdir
    checkpoint_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end
    sample_grid_every: int = 1
    tracking: bool = True
    ray_address: str | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self) -> RLConfig:
        for section, attrs in FLOAT_FIELDS.items():
            for attr in attrs:
                _as_float(getattr(self, section), attr, f"{section}.")
        r, g, o, w = self.rollout, self.grpo, self.optim, self.reward
        for name in ("steps", "checkpoint_every", "sample_grid_every"):
            _need(_pos_int(getattr(self, name)), name, getattr(self, name), "a positive integer")
        _need(isinstance(self.eval_every, int) and self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")
        _need(self.policy.device in ("auto", "cpu") or self.policy.device.startswith("cuda"), "policy.device",
              self.policy.device, "auto, cpu or cuda[:N]")
        _need(self.prompts.synthetic > 0, "prompts.synthetic", self.prompts.synthetic, "a positive integer")
        _need(self.prompts.eval_synthetic >= 0, "prompts.eval_synthetic", self.prompts.eval_synthetic, ">= 0")
        for name in ("height", "width", "prompts_per_step", "steps", "microbatch", "eval_steps"):
            _need(_pos_int(getattr(r, name)), f"rollout.{name}", getattr(r, name), "a positive integer")
        _need(_pos_int(r.group_size) and r.group_size >= 2, "rollout.group_size", r.group_size,
              "an integer >= 2 (advantages compare samples within a group)")
        _need(r.noise_level > 0, "rollout.noise_level", r.noise_level, "a positive number (the SDE needs noise)")
        _need(r.shift > 0, "rollout.shift", r.shift, "a positive number")
        _need(len(r.window) == 2 and 1 <= r.window[0] <= r.window[1], "rollout.window", r.window,
              "(min, max) with 1 <= min <= max")
        _need(not r.windowed or r.window[0] <= r.steps, "rollout.window", r.window,
              f"a minimum window of at most rollout.steps={r.steps} steps")
        _need(g.beta >= 0, "grpo.beta", g.beta, ">= 0")
        _need(g.clip_range is None or 0 < g.clip_range < 1, "grpo.clip_range", g.clip_range, "null or in (0, 1)")
        _need(g.adv_clip > 0, "grpo.adv_clip", g.adv_clip, "a positive number")
        _need(_pos_int(g.inner_epochs), "grpo.inner_epochs", g.inner_epochs, "a positive integer")
        _need(o.lr > 0, "optim.lr", o.lr, "a positive number")
        _need(o.grad_clip > 0, "optim.grad_clip", o.grad_clip, "a positive number")
        check_weights(w.weights)
        _need(_pos_int(w.num_actors), "reward.num_actors", w.num_actors, "a positive integer")
        _need(w.num_cpus >= 0 and w.num_gpus >= 0, "reward.num_cpus/num_gpus", (w.num_cpus, w.num_gpus), ">= 0")
        _need(isinstance(w.max_retries, int) and w.max_retries >= 0, "reward.max_retries", w.max_retries, ">= 0")
        _need(_pos_int(w.video_frame_stride), "reward.video_frame_stride", w.video_frame_stride, "a positive integer")
        w.ocr.validate()
        return self

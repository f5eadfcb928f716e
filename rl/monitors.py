"""Reward-hacking monitors, built into every GRPO run (RL.md §7).

A policy can raise the OCR reward by changing what the reward does not look at (reported in the
field: the OCR reward climbing while the share of dark pixels rose from 0.45 to 0.93). So every
iteration the rollout images are summarised, the held-out reward is measured with the
deterministic ODE sampler and CFG (`GrpoTrainer.evaluate`), and rules from the config raise alarms.

Image statistics (`image_stats`, over the iteration's RGB uint8 rollouts, each image weighted
equally; a video counts each of its frames as an image):
- `brightness`: mean luma, Y = 0.299 R + 0.587 G + 0.114 B on [0, 1];
- `dark_share` / `white_share`: share of pixels with Y < `dark_threshold` / Y > `white_threshold`;
- `saturation`: mean HSV saturation, (max - min) / max of a pixel's channels (0 for black);
- `colour_entropy`: Shannon entropy in bits of the colour histogram with `colour_bins` levels per
  channel (`colour_bins`^3 colours; 0 for a one-colour image, 1 for an image half one colour and
  half another, at most log2(colour_bins^3)).

Held-out monitors (every `every` iterations, and whenever the run evaluates anyway; an evaluation
that only the monitors ask for may use the first `prompts` held-out prompts, whose result feeds the
monitors only):
`heldout_reward` (the training reward's weights on the held-out samples, `eval/reward`, or the
OCR accuracy when the weights use a component the held-out scoring lacks) and `reward_gap` =
the iteration's training reward mean - `heldout_reward` (a growing gap: the policy learns the
training prompts' reward, not the task).

Everything is logged as MLflow metrics `monitor/<name>`. A rule `{metric, max | min, action}` trips
when the metric is above `max` or below `min` at a step where it was measured: `flag` logs a
warning and sets the MLflow tag `alarm.<metric>`; `stop` ends the run cleanly after writing a
checkpoint of that step, with the message in the log, in `RLResult.stopped` and in the MLflow tag
`monitor_stop`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lance_model.configio import Fraction, NonNegativeInt, PositiveInt, check_types, configclass, require

log = logging.getLogger(__name__)

PREFIX = "monitor/"
IMAGE_METRICS = ("brightness", "dark_share", "white_share", "saturation", "colour_entropy")
HELDOUT_METRICS = ("heldout_reward", "reward_gap")
MONITOR_METRICS = tuple(PREFIX + m for m in IMAGE_METRICS + HELDOUT_METRICS)
# Trainer metrics a rule may watch too (logged by `GrpoTrainer.iteration` every step).
TRAINER_METRICS = ("reward_mean", "reward_std", "kl", "clip_frac", "ratio_min", "ratio_max", "ocr_failures",
                   "groups_skipped", "grad_norm")
RULE_METRICS = MONITOR_METRICS + TRAINER_METRICS
LUMA = np.array([0.299, 0.587, 0.114])

Action = Literal["flag", "stop"]


@configclass
class MonitorRule:
    metric: str  # e.g. monitor/dark_share (any of RULE_METRICS)
    max: float | None = None  # trips when the value is above
    min: float | None = None  # trips when the value is below
    action: Action = "flag"  # flag: warning + MLflow tag; stop: checkpoint, then end the run

    def validate(self, prefix: str = "monitors.rules") -> MonitorRule:
        require(self.metric in RULE_METRICS, f"{prefix}.metric", self.metric, f"one of {list(RULE_METRICS)}")
        require(self.max is not None or self.min is not None, prefix, f"{{metric: {self.metric}}}",
                "a `max` or a `min` bound")
        require(self.max is None or self.min is None or self.min <= self.max, prefix,
                f"min={self.min}, max={self.max}", "min <= max")
        return self

    def tripped(self, value: float) -> bool:
        return (self.max is not None and value > self.max) or (self.min is not None and value < self.min) \
            or not np.isfinite(value)

    def describe(self) -> str:
        bounds = [f"max {self.max:g}"] if self.max is not None else []
        bounds += [f"min {self.min:g}"] if self.min is not None else []
        return " and ".join(bounds)


@configclass
class MonitorConfig:
    enabled: bool = True
    every: NonNegativeInt = 1  # held-out reward every N iterations (0: only when the run evaluates anyway)
    # held-out prompts of an evaluation the monitors alone ask for: the first N (0: all). Such a
    # subset feeds monitor/heldout_reward and reward_gap only; eval/* stay full-set evaluations.
    prompts: NonNegativeInt = 0
    dark_threshold: Fraction = 0.1  # luma below: a dark pixel
    white_threshold: Fraction = 0.9  # luma above: a white pixel
    colour_bins: PositiveInt = 8  # levels per channel of the colour-entropy histogram
    rules: list[MonitorRule] = field(default_factory=list)

    def validate(self, prefix: str = "monitors") -> MonitorConfig:
        check_types(self, prefix + ".")
        require(self.dark_threshold < self.white_threshold, f"{prefix}.dark_threshold", self.dark_threshold,
                f"below white_threshold={self.white_threshold}")
        require(self.enabled or not self.rules, f"{prefix}.rules", f"{len(self.rules)} rule(s)",
                "no rules while monitors.enabled is false (they would never be checked)")
        for i, rule in enumerate(self.rules):
            rule.validate(f"{prefix}.rules[{i}]")
        return self


def _frames(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    frames = []
    for i, im in enumerate(images):
        a = np.asarray(im)
        if a.dtype != np.uint8 or a.ndim not in (3, 4) or a.shape[-1] != 3:
            raise ValueError(f"image {i}: expected RGB uint8 [H, W, 3] or [F, H, W, 3]; got {a.dtype} {a.shape}")
        frames += [a] if a.ndim == 3 else list(a)
    if not frames:
        raise ValueError("image statistics need at least one image")
    return frames


def colour_entropy(image: np.ndarray, bins: int = 8) -> float:
    """Entropy (bits) of the histogram of an RGB uint8 image quantised to `bins` levels per channel."""
    q = image.astype(np.int64) * bins // 256
    codes = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    counts = np.bincount(codes.ravel(), minlength=bins ** 3)
    p = counts[counts > 0] / codes.size
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: -0.0 for one colour -> 0.0


def image_stats(images: Sequence[np.ndarray], dark_threshold: float = 0.1, white_threshold: float = 0.9,
                colour_bins: int = 8) -> dict[str, float]:
    """The statistics of IMAGE_METRICS (unprefixed names), each the mean over images."""
    per: dict[str, list[float]] = {k: [] for k in IMAGE_METRICS}
    for frame in _frames(images):
        rgb = frame.astype(np.float64) / 255.0
        luma = rgb @ LUMA
        hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
        saturation = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
        per["brightness"].append(float(luma.mean()))
        per["dark_share"].append(float((luma < dark_threshold).mean()))
        per["white_share"].append(float((luma > white_threshold).mean()))
        per["saturation"].append(float(saturation.mean()))
        per["colour_entropy"].append(colour_entropy(frame, colour_bins))
    return {k: float(np.mean(v)) for k, v in per.items()}


@dataclass(frozen=True)
class Alarm:
    step: int
    metric: str
    value: float
    rule: MonitorRule

    @property
    def message(self) -> str:
        return (f"monitor alarm at step {self.step}: {self.metric}={self.value:.4g} "
                f"breaks its rule ({self.rule.describe()}; action {self.rule.action})")

    @property
    def tag(self) -> str:
        return f"alarm.{self.metric}"


class Monitors:
    """Computes the monitor metrics of an iteration and checks the rules."""

    def __init__(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg.validate()

    def image_metrics(self, images: Sequence[np.ndarray]) -> dict[str, float]:
        if not self.cfg.enabled or not images:
            return {}
        c = self.cfg
        stats = image_stats(images, c.dark_threshold, c.white_threshold, c.colour_bins)
        return {PREFIX + k: v for k, v in stats.items()}

    def wants_heldout(self, step: int) -> bool:
        return self.cfg.enabled and self.cfg.every > 0 and step % self.cfg.every == 0

    def heldout_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """`heldout_reward` and `reward_gap` from an iteration's metrics that include an evaluation."""
        if not self.cfg.enabled:
            return {}
        heldout = metrics.get("eval/reward", metrics.get("eval/ocr_accuracy"))
        if heldout is None:
            return {}
        out = {PREFIX + "heldout_reward": float(heldout)}
        if "reward_mean" in metrics:
            out[PREFIX + "reward_gap"] = float(metrics["reward_mean"]) - float(heldout)
        return out

    def check(self, step: int, metrics: Mapping[str, float]) -> list[Alarm]:
        """The alarms of the rules whose metric was measured at this step and broke its bound."""
        if not self.cfg.enabled:
            return []
        return [Alarm(step, r.metric, float(metrics[r.metric]), r) for r in self.cfg.rules
                if r.metric in metrics and r.tripped(float(metrics[r.metric]))]

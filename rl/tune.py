"""Reward-tuning sweeps (RL.md §5): Ray Tune over reward weights and GRPO settings, with ASHA.

A sweep config (configs/rl/tune_ocr.yaml) names a base GRPO config, the overrides applied to it,
and a search space of dotted RLConfig fields -> a distribution:

    search_space:
      grpo.beta: {choice: [0.0, 0.04]}
      optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
      reward.weights.ocr_exact: {uniform: [0.0, 0.5]}

Each trial is a GRPO run with a fixed step budget (`steps` of the base config) in its own workdir,
reporting `reward_mean` (and the held-out `eval/ocr_accuracy` at the end) after every iteration;
ASHA stops weak trials early. Each trial is an MLflow child run under one parent run for the sweep.
A trial reserves one CPU for its driver plus its reward actors' CPUs/GPUs as one placement group,
so the reward actors it starts are scheduled inside the trial's own reservation.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from lance_model.configio import PositiveInt, configclass
from lance_platform.config import apply_overrides, flatten, from_dict, load_config, load_yaml, to_dict

from .config import RLConfig

log = logging.getLogger(__name__)

Distribution = Literal["choice", "grid", "uniform", "loguniform", "randint"]
Metric = Literal["reward_mean", "eval/ocr_accuracy"]
DISTRIBUTIONS: tuple[str, ...] = Distribution.__args__
METRICS: tuple[str, ...] = Metric.__args__
# One `{kind: args}` per swept field, kind a Ray Tune distribution.
Spec = Annotated[dict[Distribution, list[Any]], Field(min_length=1, max_length=1, description=(
    f"one {{kind: [args]}} with kind in {DISTRIBUTIONS}"))]


@configclass
class TuneConfig:
    name: str = "rl-tune"
    base: str | None = None  # a GRPO config file (configs/rl/grpo_ocr.yaml); relative to this file
    overrides: tuple[str, ...] = ()  # applied to the base config for every trial
    search_space: dict[str, Spec] = field(default_factory=dict)
    num_samples: PositiveInt = 2
    max_concurrent_trials: PositiveInt = 1
    metric: Metric = "reward_mean"
    mode: Literal["max", "min"] = "max"
    grace_period: PositiveInt = 1  # ASHA: iterations before a trial may be stopped
    reduction_factor: Annotated[int, Field(strict=True, ge=2)] = 2
    workdir: str = "runs/rl-tune"
    experiment: str = "lance"
    ray_address: str | None = None


def load_tune_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[TuneConfig, dict]:
    """(the sweep config, the base GRPO config as a mapping), every trial's config validated up front."""
    cfg = load_config(TuneConfig, path, overrides)
    base: dict = {}
    if cfg.base:
        base_path = Path(cfg.base)
        if not base_path.is_absolute() and path is not None and not base_path.exists():
            base_path = Path(path).parent / base_path
        base = load_yaml(base_path)
    base = apply_overrides(base, list(cfg.overrides))
    trial_config(base, {k: _example(v) for k, v in cfg.search_space.items()})  # a bad key fails now
    return cfg, base


def _example(spec: dict[str, Any]) -> Any:
    """A value inside the distribution (its first argument), to validate trial configs up front."""
    return next(iter(spec.values()))[0]


def search_space(cfg: TuneConfig) -> dict[str, Any]:
    """Dotted key -> Ray Tune domain."""
    from ray import tune

    space = {}
    for key, spec in cfg.search_space.items():
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            space[key] = (tune.choice if kind == "choice" else tune.grid_search)(list(args))
        else:
            space[key] = getattr(tune, kind)(*args)
    return space


def trial_config(base: dict, params: dict[str, Any]) -> RLConfig:
    """The base GRPO config with a trial's sampled values applied (validated)."""
    overrides = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in params.items()]
    return from_dict(RLConfig, apply_overrides(base, overrides)).validate()


def _trial(params: dict[str, Any], base: dict, parent_run_id: str | None, sweep_dir: str) -> None:
    """One Tune trial: a GRPO run in its own workdir, an MLflow child run of the sweep."""
    from ray import tune

    from lance_platform.tracking import default_tracking_uri

    ctx = tune.get_context()
    cfg = trial_config(base, params)
    cfg.workdir = str(Path(sweep_dir) / ctx.get_trial_name())
    cfg.name = f"trial-{ctx.get_trial_id()}"
    cfg.resume = False
    cfg.tracking = True
    # Every trial logs into the sweep's tracking store (not one per trial dir).
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri(sweep_dir))
    from .trainer import train_grpo

    def report(metrics: dict[str, float]) -> None:
        tune.report({k.replace("/", "_"): v for k, v in metrics.items()})

    train_grpo(cfg, parent_run_id=parent_run_id, report=report)


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    reward_mean: float | None
    ocr_accuracy: float | None
    iterations: int
    status: str


def trial_bundles(cfg: RLConfig, cluster_gpus: float = 0.0) -> list[dict[str, float]]:
    """The resources one trial reserves (its placement group): the trial itself (1 CPU; 1 GPU when
    its policy runs in it on a GPU: `policy.device` cuda, or auto on a cluster with GPUs unless both
    the rollouts and the update run on workers, leaving the trial only a copy), then each rollout actor, each
    training worker (when `grpo.train_workers` > 1) and each reward actor, as their configs ask."""
    r, g, w = cfg.rollout, cfg.grpo, cfg.reward

    def bundle(cpus: float, gpus: float) -> dict[str, float]:
        return {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}

    device = cfg.policy.device
    policy_here = r.num_workers == 0 or g.train_workers == 1
    head_gpu = 1.0 if device.startswith("cuda") or (device == "auto" and cluster_gpus > 0 and policy_here) else 0.0
    bundles = [bundle(1.0, head_gpu)]
    bundles += [bundle(r.num_cpus, r.num_gpus) for _ in range(r.num_workers)]
    if g.train_workers > 1:
        bundles += [bundle(g.train_num_cpus, g.train_num_gpus) for _ in range(g.train_workers)]
    bundles += [bundle(w.num_cpus, w.num_gpus) for _ in range(w.num_actors)]
    return bundles


def run_sweep(cfg: TuneConfig, base: dict) -> list[TrialSummary]:
    """Run the sweep; returns one summary per trial (also logged to the parent MLflow run)."""
    from ray import tune
    from ray.tune import PlacementGroupFactory
    from ray.tune.schedulers import ASHAScheduler

    from lance_platform.runtime import init_ray
    from lance_platform.tracking import Tracker, default_tracking_uri

    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray_address)
    tracker = Tracker(default_tracking_uri(workdir), cfg.experiment, workdir / "mlartifacts")
    parent = tracker.start(cfg.name, tags={"stage": "rl-tune"})
    tracker.log_params(flatten({"sweep": to_dict(cfg)}))
    tracker.log_dict({"sweep": to_dict(cfg), "base": base}, "config/rl_tune.yaml")

    probe = trial_config(base, {k: _example(v) for k, v in cfg.search_space.items()})
    import ray

    bundles = trial_bundles(probe, float(ray.cluster_resources().get("GPU", 0.0)))
    log.info("each trial reserves %s", bundles)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, parent_run_id=parent, sweep_dir=str(workdir)),
        PlacementGroupFactory(bundles))
    metric = cfg.metric.replace("/", "_")
    tuner = tune.Tuner(
        trainable, param_space=search_space(cfg),
        tune_config=tune.TuneConfig(num_samples=cfg.num_samples, max_concurrent_trials=cfg.max_concurrent_trials,
                                    scheduler=ASHAScheduler(metric=metric, mode=cfg.mode, max_t=probe.steps,
                                                            grace_period=min(cfg.grace_period, probe.steps),
                                                            reduction_factor=cfg.reduction_factor)),
        run_config=tune.RunConfig(name=cfg.name, storage_path=str(workdir / "ray_results"), verbose=0),
    )
    try:
        grid = tuner.fit()
    except BaseException:
        tracker.end("FAILED")
        raise
    # A trial that ASHA stopped early was ended inside its `report()` and never closed its run.
    stopped = tracker.end_open_children("KILLED", {"stopped_by": "tune"})
    if stopped:
        log.info("%d trial run(s) stopped early by the scheduler, marked KILLED", len(stopped))
    summaries = []
    for result in grid:
        m = result.metrics or {}
        summaries.append(TrialSummary(m.get("trial_id", "?"), dict(result.config), m.get("reward_mean"),
                                      m.get("eval_ocr_accuracy"), int(m.get("training_iteration", 0)),
                                      "ERROR" if result.error else "TERMINATED"))
    tracker.log_dict([s.__dict__ for s in summaries], "trials.json")
    done = [s.reward_mean for s in summaries if s.reward_mean is not None]
    if done:
        tracker.log_metrics({"best_reward_mean": max(done) if cfg.mode == "max" else min(done)})
    tracker.end("FAILED" if any(s.status == "ERROR" for s in summaries) else "FINISHED")
    return summaries

"""The GRPO driver loop (RL.md §4): rollout -> rewards on Ray actors -> advantages -> update -> push
weights -> MLflow.

One iteration:
1. pick B prompts (deterministic for (seed, step), so a resumed run sees the same prompts);
2. sample G images per prompt with the SDE sampler, in fixed micro-batches; each micro-batch is
   decoded and sent to the reward actor pool as soon as it exists, so OCR of micro-batch k runs
   while micro-batch k + 1 is being sampled;
3. gather the rewards (weighted components) and compute group advantages;
4. update the policy for `inner_epochs`: for each micro-batch (shuffled), recompute the log-prob of
   every trained transition with the current policy through the uncached, differentiable velocity
   path, clipped-ratio loss + beta * KL to the frozen reference, accumulate over steps, clip the
   gradient norm, AdamW step. Micro-batches are the rollout's own, so the first recomputation
   repeats the rollout's arithmetic and the first step's ratio is exactly 1;
5. push the new weights, as version `step`, to the rollout workers (in-process the worker shares
   the policy module, so there is nothing to copy; rollout actors load one object-store copy);
6. log reward mean/std and per component, the counters as they are (groups trained and skipped:
   a group whose rewards are all equal has zero advantages; optimizer steps taken; trained
   samples, transitions and SDE steps, all 0 when nothing was trained), OCR failures, KL, clip
   fraction, ratio stats, step time, images/s, a sample grid and the per-sample rewards with their
   prompts. The held-out evaluation runs before the first iteration too (logged at step 0), so
   the start and the end of a run are compared on the same prompts and seeds.

By default everything except the reward actors runs in the driver process; the reward actors run
on Ray either way. `rollout.num_workers: N` samples on N rollout actors (`rl.rollout_actors`:
versioned weight pushes, stale rollouts detected, colocated or disaggregated), and
`grpo.train_workers: N` runs the update split by sample over N FSDP2 training workers in one
torch.distributed group (`rl.train_workers`); the driver then keeps an unsharded copy of the
policy for checkpoints, held-out evaluation and pushes. Both reproduce the in-process run for the
same seed (`rl.update` is the one update implementation). Checkpoints (`workdir/checkpoints/step-NNNNNN`) are
`lance_platform.checkpoint` directories, the format training stages write: the policy in the
official key layout, the optimizer state keyed by parameter name, the step, a manifest; nothing is
unpickled. A run with `resume: true` continues from the newest one that verifies (a damaged newer
one is skipped, named in the log and in the MLflow tag `resume_fallback`) and reopens its MLflow
run. `policy.checkpoint` may be any Lance directory, a training stage's checkpoint included (it is
verified first when it has a manifest); its weights start the run, with a fresh optimizer.

With `lora.enabled` the backbone gets LoRA adapters (`lance_platform.lora`, through peft) and only
they are optimised; the KL reference is the same model with its adapters disabled (no second copy
of the weights). Its checkpoints are adapter-only: `model.safetensors` holds the adapter tensors,
`trainer_state.json` records the base (checkpoint path, or preset and seed) and the adapter
shape; a resumed run checks both. `merge_lora_checkpoint` folds the adapters into the base and
writes a full checkpoint in the official layout, which `Lance.from_pretrained` loads.

Reward-hacking monitors (`rl.monitors`) add image statistics of the rollouts every iteration and
the held-out reward and train/held-out gap every `monitors.every` iterations, as `monitor/...`
metrics; a rule that trips flags (warning + MLflow tag) or stops the run after a checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lance_model.model import Lance
from lance_platform import checkpoint as ckpt
from lance_platform import lora
from lance_platform.config import flatten, to_dict
from lance_platform.tracking import Tracker, default_tracking_uri

from .actors import RewardActorPool
from .config import PolicyConfig, RLConfig
from .grpo import group_advantages, window_steps
from .monitors import Monitors
from .ocr import preflight
from .policy import (
    build_policy,
    build_run_policy,
    load_pushed,
    move_training_state,
    resolve_device,
    sampler_options,
    weights_to_push,
)
from .prompts import load_prompt_file, synthetic_prompts
from .rewards import RewardBatch, check_prompts, combine_rewards
from .rollout import RolloutWorker, Trajectories, transition_log_prob
from .rollout_actors import RolloutPool
from .train_workers import TrainGroup
from .update import UpdateContext, UpdateStats, run_update

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
RUN_ID_FILE = "mlflow_run_id"
_STEP_DIR = re.compile(r"^step-(\d{6})$")


# ------------------------------------------------------------------------------------ setup
def load_prompts(cfg: RLConfig) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), all checked for a quoted target before any work."""
    p = cfg.prompts
    train = load_prompt_file(p.file) if p.file else synthetic_prompts(p.synthetic, cfg.seed)
    if p.eval_file:
        held_out = load_prompt_file(p.eval_file)
    else:
        held_out = synthetic_prompts(p.eval_synthetic, cfg.seed + 1) if p.eval_synthetic else []
    check_prompts(train + held_out)
    return train, held_out


def image_grid(images: list[np.ndarray], columns: int) -> np.ndarray:
    """Tile equal-size RGB images row by row (one row per prompt group)."""
    h, w, _ = images[0].shape
    rows = math.ceil(len(images) / columns)
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    return grid


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


# ------------------------------------------------------------------------------------ checkpoints
def latest_checkpoint(workdir: Path) -> tuple[Path | None, list[ckpt.Skipped]]:
    """(newest checkpoint of the run that verifies, the newer damaged ones skipped)."""
    return ckpt.latest_valid(workdir / CHECKPOINT_DIR, "step-*")


def save_checkpoint(workdir: Path, step: int, policy: Lance, optimizer: torch.optim.Optimizer) -> Path:
    """Atomic: written under a temporary name, renamed when complete, the manifest last."""
    return ckpt.save(workdir / CHECKPOINT_DIR / f"step-{step:06d}", step, config=policy.config,
                     model_state=policy.state_dict(), optimizer_state=ckpt.optimizer_state_by_name(policy, optimizer))


# ------------------------------------------------------------------------------------ trainer
class GrpoTrainer:
    """Policy, frozen reference, optimizer, rollout worker and reward pool of one GRPO run."""

    def __init__(self, cfg: RLConfig, reward_pool: RewardActorPool | None = None) -> None:
        self.cfg = cfg.validate()
        self.workdir = Path(cfg.workdir).resolve()
        self.device = resolve_device(cfg.policy.device)
        self.train_prompts, self.eval_prompts = load_prompts(cfg)
        # with LoRA the reference is the base: the same module with its adapters disabled; a sharded
        # update keeps its reference on the training workers
        self.policy, self.reference = build_run_policy(cfg, self.device, with_reference=cfg.grpo.train_workers == 1)
        self.lora = cfg.lora.enabled
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.monitors = Monitors(cfg.monitors)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.options = sampler_options(cfg)
        self.worker = RolloutWorker(self.policy, self.options, cfg.rollout.height, cfg.rollout.width,
                                    cfg.rollout.kv_cache)
        self.worker.samples(self.train_prompts[:1])  # size/stride errors before Ray starts
        self.step = 0
        self._own_pool = reward_pool is None
        self.rollouts: RolloutPool | None = None
        self.group: TrainGroup | None = None
        self._trained_weights = None  # the sharded update's gathered weights (object ref), pushed next
        w = cfg.reward
        self.rewards = reward_pool or RewardActorPool(w.ocr, w.num_actors, w.num_cpus, w.num_gpus,
                                                      w.video_frame_stride, w.max_retries)
        try:
            if cfg.grpo.train_workers > 1:
                self.group = TrainGroup(cfg, weights_to_push(self.policy, self.lora))
            if cfg.rollout.num_workers > 0:
                self.rollouts = RolloutPool(cfg)
                self.push_weights()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ state
    def restore(self, directory: Path) -> None:
        """Continue from a verified checkpoint: policy (strict; the adapters of a LoRA run, whose
        base and adapter shape must be this run's), optimizer by parameter name, step."""
        directory = Path(directory)
        ckpt.verify(directory)
        saved = ckpt.read_trainer_state(directory).get("lora")
        if self.lora:
            if saved is None:
                raise ckpt.CheckpointError(f"{directory} holds a full policy, but this run trains LoRA adapters "
                                           "(lora.enabled); use another workdir or resume: false")
            mine = self.lora_record()
            diff = sorted(k for k in mine if saved.get(k) != mine[k])
            if diff:
                raise ckpt.CheckpointError(f"{directory}: its LoRA {', '.join(diff)} differ from this run's: "
                                           + "; ".join(f"{k} saved {saved.get(k)!r}, now {mine[k]!r}" for k in diff))
            lora.load_adapter_state(self.policy, ckpt.read_model_state(directory), str(directory / ckpt.MODEL_FILE))
            ckpt.load_optimizer_state_by_name(self.policy, self.optimizer, ckpt.read_optimizer_state(directory),
                                              str(directory / ckpt.OPTIMIZER_JSON))
            state = ckpt.read_trainer_state(directory)
        elif saved is not None:
            raise ckpt.CheckpointError(f"{directory} holds LoRA adapters, but this run trains the full policy; "
                                       "set lora.enabled (and its settings) or merge it first "
                                       "(rl.trainer.merge_lora_checkpoint)")
        else:
            state = ckpt.restore(directory, self.policy, self.optimizer, verified=True)
        self.step = int(state["step"])
        if self.group is not None:
            self.group.load(weights_to_push(self.policy, self.lora), ckpt.optimizer_state_by_name(self.policy,
                                                                                                  self.optimizer))
        self.push_weights()
        log.info("resumed GRPO from %s (step %d)", directory, self.step)

    def optimizer_state(self) -> dict:
        """The optimizer state keyed by parameter name (gathered from the workers of a sharded update)."""
        if self.group is not None:
            return self.group.optimizer_state()
        return ckpt.optimizer_state_by_name(self.policy, self.optimizer)

    def save(self) -> Path:
        directory = self.workdir / CHECKPOINT_DIR / f"step-{self.step:06d}"
        if not self.lora:
            return ckpt.save(directory, self.step, config=self.policy.config, model_state=self.policy.state_dict(),
                             optimizer_state=self.optimizer_state())
        return ckpt.save(directory, self.step, config=self.policy.config, model_state=lora.adapter_state(self.policy),
                         optimizer_state=self.optimizer_state(), trainer_state={"lora": self.lora_record()})

    def lora_record(self) -> dict:
        """What an adapter checkpoint needs to be merged or resumed: the base and the adapter shape."""
        p, a = self.cfg.policy, self.cfg.lora
        base = {"checkpoint": str(Path(p.checkpoint).resolve()) if p.checkpoint else None, "weights": p.weights,
                "preset": None if p.checkpoint else p.preset, "seed": None if p.checkpoint else self.cfg.seed}
        return {"base": base, "rank": a.rank, "alpha": a.alpha, "targets": list(a.targets)}

    def save_merged(self, directory: str | Path) -> Path:
        """A full checkpoint of the current policy in the official layout (adapters folded in)."""
        state = lora.merged_state(self.policy) if self.lora else self.policy.state_dict()
        return ckpt.save(directory, self.step, config=self.policy.config, model_state=state)

    def reference_mode(self):
        """Context in which `reference_model` computes the reference policy."""
        return lora.adapters_disabled(self.policy) if self.lora else contextlib.nullcontext()

    @property
    def reference_model(self) -> Lance | None:
        """The KL reference: the frozen copy, the policy itself (LoRA, inside `reference_mode`), or None."""
        if self.cfg.grpo.beta <= 0:
            return None
        return self.policy if self.lora else self.reference

    @property
    def weights_version(self) -> int:
        """The version of the current weights: the number of updates taken (the step)."""
        return self.step

    def push_weights(self) -> None:
        """Send the current weights, as version `step`, to the rollout actors: one object in Ray's
        object store (the sharded update's gathered weights as they are, else the policy's; with
        LoRA only the adapter tensors) that every actor loads. The in-process worker shares the
        policy module, so it only takes the version."""
        self.worker.weights_version = self.step
        state, self._trained_weights = self._trained_weights, None
        if self.rollouts is not None:
            self.rollouts.push(state if state is not None else weights_to_push(self.policy, self.lora), self.step)

    def close(self) -> None:
        if self._own_pool:
            self.rewards.shutdown()
        for part in ("rollouts", "group"):
            pool = getattr(self, part, None)
            if pool is not None:
                pool.shutdown()
                setattr(self, part, None)

    # ------------------------------------------------------------------ one iteration
    def pick(self) -> tuple[list[str], list[int], list[int]]:
        """This step's (prompt per sample, seed per sample, trained steps), deterministic for (seed, step)."""
        r = self.cfg.rollout
        rng = random.Random(self.cfg.seed * 1_000_003 + self.step)
        chosen = rng.sample(self.train_prompts, r.prompts_per_step) if r.prompts_per_step <= len(self.train_prompts) \
            else [rng.choice(self.train_prompts) for _ in range(r.prompts_per_step)]
        prompts = [p for p in chosen for _ in range(r.group_size)]
        base = (self.cfg.seed * 1_000_003 + self.step) * len(prompts)
        seeds = [base + i for i in range(len(prompts))]
        steps = window_steps(r.steps, tuple(r.window), rng) if r.windowed else list(range(r.steps))
        return prompts, seeds, steps

    def rollout_and_score(self, prompts: list[str], seeds: list[int], sde_steps: list[int]
                          ) -> tuple[list[Trajectories], list[np.ndarray], RewardBatch, dict[str, float]]:
        """Sample micro-batch by micro-batch, sending each to the reward actors as soon as it is
        decoded; returns the timings too (sampling, and waiting for rewards after the last one)."""
        mb = self.cfg.rollout.microbatch
        trajs, images, pending = [], [], []
        start = time.perf_counter()
        if self.rollouts is None:
            for a in range(0, len(prompts), mb):
                traj = self.worker.rollout(prompts[a:a + mb], seeds[a:a + mb], sde_steps)
                imgs = self.worker.decode(traj.final_latents())
                pending.append(self.rewards.submit(imgs, traj.prompts))
                trajs.append(traj)
                images.extend(imgs)
        else:
            with self._rollout_phase():
                chunks = [(prompts[a:a + mb], seeds[a:a + mb]) for a in range(0, len(prompts), mb)]
                for k, sent in enumerate(self.rollouts.submit(chunks, sde_steps)):
                    res = self.rollouts.result(sent, k)
                    pending.append(self.rewards.submit(res.images, res.trajectories.prompts))
                    trajs.append(res.trajectories)
                    images.extend(res.images)
        sampled = time.perf_counter()
        scored = RewardBatch.concat([p.result() for p in pending])
        timing = {"rollout_time_s": sampled - start, "reward_wait_s": time.perf_counter() - sampled,
                  "images_per_s": len(images) / max(sampled - start, 1e-9)}
        if self.rollouts is not None:
            timing |= {"rollout/stale": float(self.rollouts.take_stale()),
                       "rollout/actor_restarts": float(self.rollouts.restarts)}
        return trajs, images, scored, timing

    @contextlib.contextmanager
    def _rollout_phase(self):
        """Colocated on CUDA: the trainer's policy, reference and optimizer state wait in host memory
        while the rollout actors sample, and the actors' copies go there while the trainer updates.
        Nothing moves on the CPU or in the disaggregated layout."""
        swap = self.cfg.rollout.layout == "colocated" and self.device.type == "cuda" and self.group is None
        if swap:
            move_training_state([self.policy, self.reference], self.optimizer, torch.device("cpu"))
            self.rollouts.onload()
        try:
            yield
        finally:
            if swap:
                self.rollouts.offload()
                move_training_state([self.policy, self.reference], self.optimizer, self.device)

    def update(self, trajs: list[Trajectories], advantages: torch.Tensor, keep: torch.Tensor) -> UpdateStats:
        """Inner epochs of clipped-ratio updates over the rollout's micro-batches (`rl.update`): in the
        driver, or split by sample over the sharded training workers, whose gathered weights then
        replace the driver's copy (and are what `push_weights` sends next)."""
        if self.group is not None:
            import ray

            stats = self.group.update(self.step, trajs, advantages, keep)
            self._trained_weights = self.group.weights_ref()
            load_pushed(self.policy, ray.get(self._trained_weights), self.lora, "the training workers' weights")
            return stats
        ctx = UpdateContext(self.policy, self.reference_model, self.optimizer, self.params,
                            lambda model, samples: self.worker.session(model, samples, use_cache=False), self.device,
                            lora=self.lora, log_prob=transition_log_prob)
        return run_update(ctx, self.cfg, self.step, trajs, advantages, keep)

    def iteration(self) -> tuple[dict[str, float], list[np.ndarray], list[dict]]:
        """One GRPO step -> (metrics, images, per-sample records)."""
        start = time.perf_counter()
        r, w = self.cfg.rollout, self.cfg.reward
        prompts, seeds, sde_steps = self.pick()
        trajs, images, scored, timing = self.rollout_and_score(prompts, seeds, sde_steps)
        components = {k: np.asarray(v) for k, v in scored.components.items()}
        total = combine_rewards(components, w.weights)
        advantages, keep = group_advantages(torch.as_tensor(total), r.group_size, self.cfg.grpo.global_std,
                                            self.cfg.grpo.adv_clip)
        updating = time.perf_counter()
        stats = self.update(trajs, advantages, keep)
        timing["update_time_s"] = time.perf_counter() - updating
        self.step += 1
        self.push_weights()
        elapsed = time.perf_counter() - start
        # Counters as they are: a group whose rewards are all equal has zero advantages and is
        # skipped; `trained_steps` counts the SDE steps that received a gradient (0 when every
        # group was skipped and no optimizer step ran).
        with_spread = keep.view(-1, r.group_size)[:, 0]
        groups_std = torch.as_tensor(total).view(-1, r.group_size).std(dim=1, unbiased=False)
        metrics = {"reward_mean": float(total.mean()), "reward_std": float(total.std()),
                   "reward_group_std_mean": float(groups_std.mean()),
                   "groups": float(with_spread.numel()), "groups_trained": float(with_spread.sum()),
                   "groups_skipped": float((~with_spread).sum()),
                   "ocr_failures": float(scored.failures), "reward_actor_restarts": float(self.rewards.restarts),
                   "step_time_s": elapsed, **timing,
                   "trained_steps": float(len(sde_steps) if stats.optimizer_steps else 0), **stats.metrics()}
        for name, values in components.items():
            metrics[f"reward/{name}_mean"] = float(values.mean())
            metrics[f"reward/{name}_std"] = float(values.std())
        metrics.update(self.monitors.image_metrics(images))
        records = [{"prompt": p, "seed": s, "reward": float(rw), "advantage": float(a), "text": t,
                    **{name: float(v[i]) for name, v in components.items()}}
                   for i, (p, s, rw, a, t) in enumerate(zip(prompts, seeds, total, advantages, scored.texts))]
        return metrics, images, records

    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        """Held-out OCR accuracy: mean OCR reward of deterministic ODE samples (seed i per prompt),
        over the held-out prompts or their first `limit`."""
        prompts = self.eval_prompts[:limit]
        if not prompts:
            return {}
        r = self.cfg.rollout
        seeds = list(range(len(prompts)))
        if self.rollouts is not None:
            with self._rollout_phase():
                images = self.rollouts.evaluate(prompts, seeds, r.eval_steps, r.eval_cfg_scale)
        else:
            images = self.worker.evaluate(prompts, seeds, r.eval_steps, r.eval_cfg_scale)
        scored = self.rewards.score(images, prompts)
        out = {"eval/ocr_accuracy": float(np.mean(scored.components["ocr"])),
               "eval/ocr_exact": float(np.mean(scored.components["ocr_exact"]))}
        if "ocr_ctc" in scored.components:
            out["eval/ocr_ctc"] = float(np.mean(scored.components["ocr_ctc"]))
        weights = self.cfg.reward.weights
        if set(weights) <= set(scored.components):  # the training reward, on the held-out samples
            out["eval/reward"] = float(np.mean(combine_rewards(
                {k: np.asarray(v) for k, v in scored.components.items()}, weights)))
        return out


# ------------------------------------------------------------------------------------ the run
@dataclass
class RLResult:
    steps: int
    metrics: dict[str, float]
    checkpoint: Path
    run_id: str | None
    history: list[dict[str, float]]
    # held-out metrics of the starting policy (logged at step 0), to compare with the final ones in
    # `metrics`; empty when the run resumed past step 0 or has no held-out prompts
    initial: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None  # why a monitor rule with `action: stop` ended the run early


def _open_tracker(cfg: RLConfig, workdir: Path, parent_run_id: str | None) -> Tracker | None:
    if not cfg.tracking:
        return None
    tracker = Tracker(default_tracking_uri(workdir), cfg.experiment, workdir / "mlartifacts")
    id_file = workdir / RUN_ID_FILE
    previous = id_file.read_text().strip() if cfg.resume and id_file.is_file() else None
    run_id = tracker.start(cfg.name, parent_run_id=parent_run_id, run_id=previous, tags={"stage": "rl"})
    if run_id and not previous:
        id_file.write_text(run_id)
        tracker.log_params(flatten(to_dict(cfg)))
        tracker.log_dict(to_dict(cfg), "config/rl.yaml")
    return tracker


def train_grpo(cfg: RLConfig, parent_run_id: str | None = None,
               report: Callable[[dict[str, float]], None] | None = None) -> RLResult:
    """Run (or resume) a GRPO run to `cfg.steps` iterations. `report(metrics)` is called after every
    iteration (Ray Tune uses it). Reward actors need Ray: a local one is started unless connected."""
    from lance_platform.runtime import init_ray

    cfg.validate()
    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    load_prompts(cfg)  # prompt and OCR setup errors before Ray and the model
    preflight(cfg.reward.ocr)
    init_ray(cfg.ray_address)
    trainer = GrpoTrainer(cfg)
    tracker = None
    history: list[dict[str, float]] = []
    initial: dict[str, float] = {}
    checkpoint = None
    finished = False
    stopped: str | None = None

    def finish() -> None:
        """End the MLflow run and free the reward actors. Runs *before* the last `report()`: Ray Tune
        stops a trial's actor as soon as its final result arrives and does not wait for the trial
        function to return, so nothing after that call is guaranteed to run."""
        nonlocal finished
        finished = True
        trainer.close()
        if tracker is not None:
            if checkpoint is not None:
                tracker.set_tags({"checkpoint": str(checkpoint)})
            tracker.end("FINISHED")

    try:
        latest, skipped = latest_checkpoint(workdir) if cfg.resume else (None, [])
        if latest is not None:
            trainer.restore(latest)
        tracker = _open_tracker(cfg, workdir, parent_run_id)
        if skipped and tracker is not None:
            tracker.set_tags({"resume_fallback": ckpt.fallback_note(latest, skipped)})
        log.info("GRPO: %d prompts (%d held out), reward engines %s, from step %d to %d",
                 len(trainer.train_prompts), len(trainer.eval_prompts),
                 sorted({i["engine"] for i in trainer.rewards.info()}), trainer.step, cfg.steps)
        samples_dir = workdir / "samples"
        samples_dir.mkdir(exist_ok=True)
        checkpoint = latest
        if trainer.step == 0 and trainer.eval_prompts:
            initial = trainer.evaluate()  # the same prompts and seeds as the final evaluation
            log.info("GRPO held-out before training: %s", ", ".join(f"{k}={v:.4g}" for k, v in initial.items()))
            if tracker is not None:
                tracker.log_metrics(initial, step=0)
        while trainer.step < cfg.steps:
            metrics, images, records = trainer.iteration()
            step = trainer.step
            scheduled = step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)
            if scheduled or (trainer.eval_prompts and trainer.monitors.wants_heldout(step)):
                # an evaluation only the monitors ask for may take a subset, which feeds them only:
                # the eval/* curves stay full-set
                subset = 0 if scheduled else trainer.monitors.cfg.prompts
                held = trainer.evaluate(limit=subset or None)
                if not subset:
                    metrics.update(held)
                metrics.update(trainer.monitors.heldout_metrics({**metrics, **held}))
            alarms = trainer.monitors.check(step, metrics)
            for alarm in alarms:
                log.warning("%s", alarm.message)
            stop = next((a for a in alarms if a.rule.action == "stop"), None)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop is not None:
                checkpoint = trainer.save()
            if stop is not None:
                stopped = f"{stop.message}: run stopped at step {step} of {cfg.steps}, checkpoint {checkpoint}"
                log.error("GRPO %s", stopped)
            if alarms and tracker is not None:
                tracker.set_tags({a.tag: a.message for a in alarms} | ({"monitor_stop": stopped} if stopped else {}))
            log.info("GRPO step %d/%d: %s", step, cfg.steps,
                     ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in _SHOWN))
            history.append(metrics)
            if tracker is not None:
                tracker.log_metrics(metrics, step=step)
                if step % cfg.sample_grid_every == 0 or step == cfg.steps:
                    grid = samples_dir / f"step-{step:06d}.png"
                    _save_png(grid, image_grid(images, cfg.rollout.group_size))
                    tracker.log_artifact(grid, "samples")
                    tracker.log_dict(records, f"samples/step-{step:06d}.json")
            if step == cfg.steps or stopped:
                finish()
            if report is not None:
                # A trial that Tune stops early (ASHA) never returns from here; the sweep driver
                # ends its MLflow run as KILLED once the sweep is over.
                report(metrics)
            if stopped:
                break
        if not finished:  # resumed at or past cfg.steps: nothing ran
            finish()
    except BaseException:
        if not finished:
            trainer.close()
            if tracker is not None:
                tracker.end("FAILED")
        raise
    return RLResult(trainer.step, history[-1] if history else {}, checkpoint,
                    tracker.run_id if tracker else None, history, initial, stopped)


def merge_lora_checkpoint(adapters: str | Path, target: str | Path, device: str = "cpu") -> Path:
    """Fold the adapters of a LoRA GRPO checkpoint into the base it records and write a full,
    verified checkpoint in the official layout to `target` (loadable by `Lance.from_pretrained`,
    usable as `policy.checkpoint` or a stage's init)."""
    adapters = Path(adapters)
    ckpt.verify(adapters)
    state = ckpt.read_trainer_state(adapters)
    record = state.get("lora")
    if not isinstance(record, dict) or not isinstance(record.get("base"), dict):
        raise ckpt.CheckpointError(f"{adapters} is not a LoRA adapter checkpoint (no 'lora' in its trainer state)")
    base = record["base"]
    if base.get("checkpoint"):
        policy_cfg = PolicyConfig(checkpoint=base["checkpoint"], weights=base.get("weights", "auto"), device=device)
    else:
        policy_cfg = PolicyConfig(preset=base["preset"], device=device)
    model = build_policy(policy_cfg, int(base.get("seed") or 0), torch.device(device)).eval()
    lora.add_adapters(model, lora.LoraConfig(enabled=True, rank=int(record["rank"]), alpha=float(record["alpha"]),
                                             targets=tuple(record["targets"])))
    lora.load_adapter_state(model, ckpt.read_model_state(adapters), str(adapters / ckpt.MODEL_FILE))
    out = ckpt.save(target, int(state["step"]), config=model.config, model_state=lora.merged_state(model),
                    trainer_state={"merged_from": str(adapters.resolve())})
    log.info("merged the LoRA adapters of %s into %s", adapters, out)
    return out


_SHOWN = ("reward_mean", "reward_std", "groups_skipped", "optimizer_steps", "kl", "clip_frac", "eval/ocr_accuracy",
          "eval/reward", "images_per_s", "step_time_s", "rollout_time_s", "reward_wait_s", "update_time_s")

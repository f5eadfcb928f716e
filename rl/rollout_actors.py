"""Rollout workers as Ray actors (RL.md §7): N replicas of the policy sampling GRPO micro-batches.

`rollout.num_workers: N` (> 0) starts N `RolloutActor`s, each reserving `rollout.num_cpus` CPUs
and `rollout.num_gpus` GPUs (CUDA when > 0, else the CPU). Every actor builds the policy as the
driver does (`rl.policy.build_run_policy`: same config, same seed; no reference copy) and owns a
`RolloutWorker` on its device. The rollout's micro-batches (the same `rollout.microbatch` chunks as
in-process, with the per-sample seeds the trainer picked) are dealt to the actors in contiguous
runs; each returns its `Trajectories` as CPU tensors with the decoded images, so with the same
seeds the result is the in-process rollout's (up to the float rounding of another process).

Weights carry a version (the trainer's step). `push(state, version)` puts the state dict once in
the object store (`ray.put`; with LoRA only the adapter tensors) and every actor loads that one
object; Ray runs an actor's calls in the order they were sent, so a rollout sent after a push
samples with the pushed weights. Every result says which version made it: one older than the
current version by more than `rollout.max_lag` raises `StaleRolloutError`; an older one within the
lag is accepted and counted (`stale`, logged as `rollout/stale`). With the default lag 0 any
rollout made with old weights is an error.

A dead actor (killed, out of memory) surfaces as `RayActorError` on its micro-batch: the pool
starts a fresh actor in its place, sends it the current weights, and samples the same micro-batch
with the same seeds again, up to `rollout.max_retries` times per micro-batch (`restarts` counts).

Layouts: *colocated* actors share the training GPUs; on CUDA the idle side is moved to host memory
(`offload` / `onload`: the actors' policies between rollouts, the trainer's policy, reference and
optimizer state during rollouts). On the CPU there is nothing to free and both are no-ops.
*Disaggregated* actors have GPUs of their own and stay resident.
"""
from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import RLConfig
from .policy import build_run_policy, load_pushed, move_training_state, sampler_options
from .rollout import RolloutWorker, Trajectories

log = logging.getLogger(__name__)


class StaleRolloutError(RuntimeError):
    """A rollout was made with weights older than the current version by more than `rollout.max_lag`."""


class RolloutWorkersFailed(RuntimeError):
    """A micro-batch could not be sampled after restarting its actor `rollout.max_retries` times."""


@dataclass
class RolloutResult:
    """One sampled micro-batch, as an actor returns it."""

    trajectories: Trajectories
    images: list[np.ndarray]
    version: int  # the weights version that sampled it
    actor: int


def check_version(version: int, current: int, max_lag: int, what: str) -> bool:
    """True when `version` is behind `current` (stale but within `max_lag`); raises when too old or
    from the future (a version the trainer never pushed)."""
    lag = current - version
    if lag < 0 or lag > max_lag:
        raise StaleRolloutError(f"{what} was made with weights version {version}, but the current version is "
                                f"{current} (rollout.max_lag={max_lag}: at most {max_lag} version(s) behind)")
    return lag > 0


class RolloutActor:
    """One rollout replica: a copy of the policy on its device and a `RolloutWorker` (a Ray actor)."""

    def __init__(self, cfg: RLConfig, index: int) -> None:
        r = cfg.rollout
        self.index = index
        self.device = torch.device("cuda") if r.num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")
        self.lora = cfg.lora.enabled
        policy, _ = build_run_policy(cfg, self.device, with_reference=False)
        self.worker = RolloutWorker(policy, sampler_options(cfg), r.height, r.width, r.kv_cache)
        self.worker.weights_version = -1  # nothing pushed yet

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        load_pushed(self.worker.model, state, self.lora, f"weights version {version}")
        self.worker.weights_version = version
        return version

    def rollout(self, prompts: list[str], seeds: list[int], sde_steps: list[int]) -> RolloutResult:
        traj = self.worker.rollout(prompts, seeds, sde_steps)
        traj.timesteps = traj.timesteps.cpu()
        images = self.worker.decode(traj.final_latents())
        return RolloutResult(traj, images, self.worker.weights_version, self.index)

    def evaluate(self, prompts: list[str], seeds: list[int], steps: int, cfg_scale: float
                 ) -> tuple[list[np.ndarray], int]:
        return self.worker.evaluate(prompts, seeds, steps, cfg_scale), self.worker.weights_version

    def offload(self) -> None:
        if self.device.type == "cuda":
            move_training_state([self.worker.model], None, torch.device("cpu"))

    def onload(self) -> None:
        if self.device.type == "cuda":
            move_training_state([self.worker.model], None, self.device)

    def info(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "device": str(self.device),
                "version": self.worker.weights_version}


def deal(num_items: int, num_actors: int) -> list[int]:
    """Actor index of each of `num_items` micro-batches: contiguous, near-equal runs."""
    bounds = np.linspace(0, num_items, num_actors + 1).round().astype(int)
    return [k for k in range(num_actors) for _ in range(int(bounds[k + 1] - bounds[k]))]


class _Pending:
    def __init__(self, actor: int, handle, args: tuple, ref) -> None:
        self.actor, self.handle, self.args, self.ref, self.attempts = actor, handle, args, ref, 0


class RolloutPool:
    """`rollout.num_workers` rollout actors with versioned weight pushes (see the module docstring)."""

    def __init__(self, cfg: RLConfig) -> None:
        import ray

        r = cfg.rollout
        if r.num_workers < 1:
            raise ValueError(f"rollout.num_workers={r.num_workers}: a rollout pool needs at least one worker")
        self.cfg, self.max_lag, self.max_retries = cfg, r.max_lag, r.max_retries
        self.colocated = r.layout == "colocated"
        self._remote = ray.remote(RolloutActor).options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_restarts=0)
        self.actors = [self._remote.remote(cfg, i) for i in range(r.num_workers)]
        self.version: int | None = None
        self._weights = None  # object ref of the current weights
        self._loads: list = []
        self.restarts = 0
        self.stale = 0  # stale micro-batches accepted (within max_lag) since the last `take_stale`

    # ------------------------------------------------------------------ weights
    def push(self, state, version: int) -> None:
        """Put `state` (a state dict, or the object ref of one already in the store) in the object
        store once; every actor loads that object as `version`."""
        import ray

        self._weights = state if isinstance(state, ray.ObjectRef) else ray.put(state)
        self.version = version
        self._loads = [(a, a.load_weights.remote(self._weights, version)) for a in self.actors]

    def _wait_loads(self) -> None:
        """Wait for the last push; an actor that died meanwhile is replaced (and gets the weights)."""
        import ray
        from ray.exceptions import RayActorError

        loads, self._loads = self._loads, []
        for k, (handle, ref) in enumerate(loads):
            try:
                ray.get(ref)
            except RayActorError as exc:
                log.warning("rollout actor %d died (%s) before loading weights version %s; restarted",
                            k, type(exc).__name__, self.version)
                self._replace(k, handle)

    def _replace(self, index: int, dead) -> object:
        import ray

        if self.actors[index] is dead:
            ray.kill(dead, no_restart=True)
            fresh = self._remote.remote(self.cfg, index)
            if self._weights is not None:
                fresh.load_weights.remote(self._weights, self.version)
            self.actors[index] = fresh
            self.restarts += 1
        return self.actors[index]

    def _gather(self, pending: _Pending, what: str):
        import ray
        from ray.exceptions import RayActorError

        while True:
            try:
                return ray.get(pending.ref)
            except RayActorError as exc:
                pending.attempts += 1
                if pending.attempts > self.max_retries:
                    raise RolloutWorkersFailed(f"rollout actor {pending.actor} died {pending.attempts} times on "
                                               f"{what}; last error: {str(exc).splitlines()[0]}") from exc
                log.warning("rollout actor %d died (%s); restarted, sampling %s again (attempt %d)",
                            pending.actor, type(exc).__name__, what, pending.attempts + 1)
                pending.handle = self._replace(pending.actor, pending.handle)
                method = getattr(pending.handle, pending.args[0])
                pending.ref = method.remote(*pending.args[1:])

    def _check(self, version: int, what: str) -> None:
        if self.version is None:
            raise StaleRolloutError(f"{what}: no weights were pushed to the rollout actors")
        if check_version(version, self.version, self.max_lag, what):
            self.stale += 1
            log.warning("%s was made with weights version %d (current %d): stale, within rollout.max_lag=%d",
                        what, version, self.version, self.max_lag)

    # ------------------------------------------------------------------ sampling
    def submit(self, chunks: Sequence[tuple[list[str], list[int]]], sde_steps: list[int]) -> list[_Pending]:
        """Send micro-batches (prompts, seeds) to the actors; returns at once."""
        self._wait_loads()
        owners = deal(len(chunks), len(self.actors))
        out = []
        for k, (prompts, seeds) in zip(owners, chunks):
            handle = self.actors[k]
            args = ("rollout", list(prompts), list(seeds), list(sde_steps))
            out.append(_Pending(k, handle, args, handle.rollout.remote(*args[1:])))
        return out

    def result(self, pending: _Pending, index: int) -> RolloutResult:
        """The sampled micro-batch, its version checked (restarting a dead actor on the way)."""
        res = self._gather(pending, f"rollout micro-batch {index}")
        self._check(res.version, f"rollout micro-batch {index} (actor {res.actor})")
        return res

    def evaluate(self, prompts: list[str], seeds: list[int], steps: int, cfg_scale: float) -> list[np.ndarray]:
        """Held-out ODE samples, the prompts split in contiguous runs over the actors."""
        self._wait_loads()
        bounds = np.linspace(0, len(prompts), len(self.actors) + 1).round().astype(int)
        pending = []
        for k, (a, b) in enumerate(itertools.pairwise(bounds)):
            if b > a:
                args = ("evaluate", prompts[a:b], seeds[a:b], steps, cfg_scale)
                pending.append(_Pending(k, self.actors[k], args, self.actors[k].evaluate.remote(*args[1:])))
        images: list[np.ndarray] = []
        for p in pending:
            part, version = self._gather(p, "held-out samples")
            self._check(version, f"held-out samples of actor {p.actor}")
            images += part
        return images

    def take_stale(self) -> int:
        n, self.stale = self.stale, 0
        return n

    # ------------------------------------------------------------------ colocated memory
    def offload(self) -> None:
        import ray

        if self.colocated:
            ray.get([a.offload.remote() for a in self.actors])

    def onload(self) -> None:
        import ray

        if self.colocated:
            ray.get([a.onload.remote() for a in self.actors])

    def info(self) -> list[dict]:
        import ray

        return ray.get([a.info.remote() for a in self.actors])

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

"""A pool of Ray actors scoring rewards, so OCR runs in parallel and off the driver (RL.md §3).

The reference implementation runs PaddleOCR one image at a time in the training process. Here each
actor holds one engine (loaded once, in `__init__`) and the driver splits a batch into one chunk
per actor. `submit` returns at once with a `PendingRewards`; the driver keeps sampling the next
rollout micro-batch while the actors work, and only `result()` waits.

Failures: an OCR error on one image is handled inside the actor (`OcrReward`: reward 0, counted).
A dead actor (killed, OOM, segfault in native OCR code) surfaces as `RayActorError` on its chunk:
the pool replaces that actor with a fresh one and re-sends the chunk, up to `max_retries` times
per chunk; the batch's rewards still arrive, in order. Actors are created with `max_restarts=0`
so that the replacement is explicit and counted (`restarts`) rather than hidden in Ray.

GPUs: `num_gpus` is reserved only for an engine that can use it (`actor_gpus`): PaddleOCR with a
GPU `paddle_device`. The RapidOCR engine runs CPU onnxruntime sessions, so a reservation for it
would hold GPUs that stay idle; it is dropped with a warning.
"""
from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .ocr import OcrConfig, build_ocr_engine, preflight
from .rewards import OcrReward, RewardBatch

log = logging.getLogger(__name__)


class RewardActorsFailed(RuntimeError):
    """A chunk could not be scored after restarting its actor `max_retries` times."""


def actor_gpus(engine: str, ocr: OcrConfig, num_gpus: float) -> float:
    """The GPUs each reward actor reserves: `num_gpus` when the resolved `engine` runs on a GPU
    (PaddleOCR with `paddle_device` gpu/cuda), else 0, with a warning when `num_gpus > 0` was asked."""
    if num_gpus <= 0:
        return 0.0
    if engine == "paddleocr" and ocr.paddle_device.lower().startswith(("gpu", "cuda")):
        return float(num_gpus)
    where = "runs on the CPU (onnxruntime CPU sessions)" if engine == "rapidocr" else \
        f"runs on paddle_device={ocr.paddle_device!r}"
    log.warning("reward.num_gpus=%g ignored: the %s OCR engine %s, so no GPU is reserved for the reward actors",
                num_gpus, engine, where)
    return 0.0


class OcrRewardActor:
    """Holds one OCR engine; `score` is `OcrReward.__call__` (run as a Ray actor by the pool)."""

    def __init__(self, ocr: OcrConfig, frame_stride: int = 1) -> None:
        engine = build_ocr_engine(ocr)
        self.reward = OcrReward(engine, frame_stride)

    def score(self, items: Sequence[np.ndarray], prompts: Sequence[str]) -> RewardBatch:
        return self.reward(items, prompts)

    def info(self) -> dict:
        return {"engine": self.reward.engine.name, "pid": os.getpid()}


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `parts` contiguous, near-equal chunks of n items (empty ones dropped)."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


@dataclass
class _Chunk:
    actor_index: int
    actor: object  # the handle the chunk was sent to
    items_ref: object
    prompts: list[str]
    ref: object
    attempts: int = 0


class PendingRewards:
    """Futures of one submitted batch; `result()` gathers them, restarting dead actors."""

    def __init__(self, pool: RewardActorPool, chunks: list[_Chunk]) -> None:
        self.pool, self.chunks = pool, chunks

    def result(self) -> RewardBatch:
        import ray
        from ray.exceptions import RayActorError

        parts = []
        for chunk in self.chunks:
            while True:
                try:
                    parts.append(ray.get(chunk.ref))
                    break
                except RayActorError as exc:
                    chunk.attempts += 1
                    if chunk.attempts > self.pool.max_retries:
                        raise RewardActorsFailed(f"reward actor {chunk.actor_index} died {chunk.attempts} times "
                                                 f"on a chunk of {len(chunk.prompts)} images; last error: "
                                                 f"{str(exc).splitlines()[0]}") from exc
                    actor = self.pool.replace(chunk.actor_index, chunk.actor)
                    log.warning("reward actor %d died (%s); restarted, re-sending its %d images (attempt %d)",
                                chunk.actor_index, type(exc).__name__, len(chunk.prompts), chunk.attempts + 1)
                    chunk.actor = actor
                    chunk.ref = actor.score.remote(chunk.items_ref, chunk.prompts)
        return RewardBatch.concat(parts)


class RewardActorPool:
    """`num_actors` OCR reward actors, each reserving `num_cpus` CPUs and, for an engine on a GPU,
    `num_gpus` GPUs (fractions ok; `actor_gpus`)."""

    def __init__(self, ocr: OcrConfig, num_actors: int = 2, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 frame_stride: int = 1, max_retries: int = 2) -> None:
        import ray

        if num_actors < 1:
            raise ValueError(f"reward.num_actors={num_actors}: expected a positive integer")
        self.engine = preflight(ocr)
        self.ocr, self.frame_stride, self.max_retries = ocr, frame_stride, max_retries
        self.num_gpus = actor_gpus(self.engine, ocr, num_gpus)
        self._remote = ray.remote(OcrRewardActor).options(num_cpus=num_cpus, num_gpus=self.num_gpus, max_restarts=0)
        self.actors = [self._start() for _ in range(num_actors)]
        self.restarts = 0

    def _start(self):
        return self._remote.remote(self.ocr, self.frame_stride)

    def info(self) -> list[dict]:
        """Engine and pid of every actor (waits for them to be ready: engines load in `__init__`)."""
        import ray

        return ray.get([a.info.remote() for a in self.actors])

    def replace(self, index: int, dead) -> object:
        """A fresh actor at `index` (unless another chunk already replaced `dead`)."""
        import ray

        if self.actors[index] is dead:
            ray.kill(dead, no_restart=True)
            self.actors[index] = self._start()
            self.restarts += 1
        return self.actors[index]

    def submit(self, items: Sequence[np.ndarray], prompts: Sequence[str]) -> PendingRewards:
        """Start scoring `items` against `prompts`; returns immediately."""
        import ray

        if len(items) != len(prompts):
            raise ValueError(f"{len(items)} images but {len(prompts)} prompts")
        chunks = []
        for k, (a, b) in enumerate(split_evenly(len(items), len(self.actors))):
            actor = self.actors[k]
            items_ref = ray.put(list(items[a:b]))
            chunk_prompts = list(prompts[a:b])
            chunks.append(_Chunk(k, actor, items_ref, chunk_prompts, actor.score.remote(items_ref, chunk_prompts)))
        return PendingRewards(self, chunks)

    def score(self, items: Sequence[np.ndarray], prompts: Sequence[str]) -> RewardBatch:
        return self.submit(items, prompts).result()

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

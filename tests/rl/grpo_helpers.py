"""Shared pieces of the distributed GRPO tests: a driver-side brightness reward pool (rewards that
differ per sample, so every group trains) and the small run config."""
from __future__ import annotations

import numpy as np
import torch

from rl.rewards import RewardBatch
from rl.trainer import GrpoTrainer


class _Done:
    def __init__(self, batch: RewardBatch) -> None:
        self.batch = batch

    def result(self) -> RewardBatch:
        return self.batch


class BrightnessPool:
    """Scores each image by its mean brightness, in the driver (no reward actors). `spread`: added
    to every second image of a submitted batch (a micro-batch is whole groups), so that every group's
    rewards differ by about that much and its advantages (r - mean) / (std + 1e-4) are well
    conditioned: a 1e-6 difference in brightness then moves an advantage by about 1e-6 / spread."""

    restarts = 0

    def __init__(self, spread: float = 0.0) -> None:
        self.spread = spread

    def submit(self, items, prompts) -> _Done:
        values = [float(np.asarray(im, dtype=np.float64).mean() / 255.0) + self.spread * (i % 2)
                  for i, im in enumerate(items)]
        return _Done(RewardBatch({"ocr": values, "ocr_exact": [0.0] * len(items)}, [""] * len(items)))

    def score(self, items, prompts) -> RewardBatch:
        return self.submit(items, prompts).result()

    def info(self) -> list[dict]:
        return [{"engine": "brightness"}]

    def shutdown(self) -> None:
        pass


# optim.eps=1: AdamW steps in proportion to the gradient (with a tiny eps every element moves by about
# lr whatever its gradient, so an element whose gradient is ~0 would flip with the last bit of a sum)
BASE = ("rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.microbatch=2", "rollout.steps=2",
        "policy.device=cpu", "optim.lr=0.5", "optim.eps=1.0", "optim.weight_decay=0", "grpo.clip_range=0.2")


def state(trainer: GrpoTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}

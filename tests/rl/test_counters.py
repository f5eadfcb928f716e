"""GRPO iteration counters report what happened: skipped groups, optimizer steps taken, weights
changed or not. A scripted reward pool stands in for the Ray actors (no Ray here)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rl.rewards import RewardBatch
from rl.trainer import GrpoTrainer


class _Done:
    def __init__(self, batch: RewardBatch) -> None:
        self.batch = batch

    def result(self) -> RewardBatch:
        return self.batch


class ScriptedPool:
    """Returns the given `ocr` rewards for every batch, in order."""

    restarts = 0

    def __init__(self, rewards: list[float]) -> None:
        self.rewards = rewards

    def submit(self, items, prompts) -> _Done:
        n = len(items)
        values = (self.rewards * n)[:n]
        return _Done(RewardBatch({"ocr": values, "ocr_exact": [0.0] * n}, [""] * n))

    def score(self, items, prompts) -> RewardBatch:
        return self.submit(items, prompts).result()

    def info(self) -> list[dict]:
        return [{"engine": "scripted"}]

    def shutdown(self) -> None:
        pass


def _trainer(rl_config, rewards: list[float]) -> GrpoTrainer:
    cfg = rl_config("rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.microbatch=2",
                    "rollout.steps=2", "policy.device=cpu", "optim.lr=0.01")
    return GrpoTrainer(cfg, reward_pool=ScriptedPool(rewards))


def _weights(trainer: GrpoTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}


def test_equal_rewards_skip_every_group_and_take_no_optimizer_step(rl_config):
    trainer = _trainer(rl_config, [0.0])
    before = _weights(trainer)
    metrics, _, records = trainer.iteration()
    assert metrics["groups"] == 2 and metrics["groups_skipped"] == 2 and metrics["groups_trained"] == 0
    assert metrics["optimizer_steps"] == 0 and metrics["trained_steps"] == 0
    assert metrics["trained_samples"] == 0 and metrics["trained_transitions"] == 0
    assert all(r["advantage"] == 0 for r in records)
    after = trainer.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rewards_with_spread_train_every_group_and_change_the_weights(rl_config):
    trainer = _trainer(rl_config, [0.2, 0.6])  # each group of 2 gets 0.2 and 0.6
    before = _weights(trainer)
    metrics, _, _ = trainer.iteration()
    assert metrics["groups_skipped"] == 0 and metrics["groups_trained"] == 2
    assert metrics["reward_group_std_mean"] == pytest.approx(0.2)
    assert metrics["optimizer_steps"] == 2  # two micro-batches of one group each
    assert metrics["trained_steps"] == 2 and metrics["trained_samples"] == 4 and metrics["trained_transitions"] == 8
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert np.isfinite(metrics["loss"])

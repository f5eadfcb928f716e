"""Reward-hacking monitors: image statistics against hand-computed values, rule checks, and a GRPO
run (no Ray: a scripted in-process reward pool) where a `flag` rule warns and tags while the run
goes on and a `stop` rule ends it cleanly with a checkpoint."""
from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from lance_model.configio import ConfigError
from lance_platform import checkpoint as ckpt
from lance_platform.tracking import default_tracking_uri
from rl.monitors import MonitorConfig, MonitorRule, Monitors, colour_entropy, image_stats
from rl.rewards import RewardBatch

BLACK = np.zeros((4, 4, 3), dtype=np.uint8)
WHITE = np.full((4, 4, 3), 255, dtype=np.uint8)
RED = np.zeros((4, 4, 3), dtype=np.uint8)
RED[..., 0] = 255


def test_one_colour_images_give_the_hand_computed_statistics():
    black = image_stats([BLACK])
    assert black == {"brightness": 0.0, "dark_share": 1.0, "white_share": 0.0, "saturation": 0.0,
                     "colour_entropy": 0.0}
    white = image_stats([WHITE])
    assert white["brightness"] == pytest.approx(1.0) and white["white_share"] == 1.0
    assert white["dark_share"] == 0.0 and white["saturation"] == 0.0 and white["colour_entropy"] == 0.0
    red = image_stats([RED])  # luma 0.299: neither dark nor white; fully saturated
    assert red["brightness"] == pytest.approx(0.299) and red["saturation"] == 1.0
    assert red["dark_share"] == 0.0 and red["white_share"] == 0.0 and red["colour_entropy"] == 0.0


def test_mixed_images_give_the_hand_computed_statistics():
    half = BLACK.copy()
    half[:2] = 255  # 8 black and 8 white pixels: entropy 1 bit
    s = image_stats([half])
    assert s["brightness"] == pytest.approx(0.5) and s["dark_share"] == 0.5 and s["white_share"] == 0.5
    assert s["colour_entropy"] == pytest.approx(1.0)
    quarters = np.zeros((4, 4, 3), dtype=np.uint8)  # black, red, green, blue quarters: 2 bits
    quarters[:2, 2:, 0] = 255
    quarters[2:, :2, 1] = 255
    quarters[2:, 2:, 2] = 255
    q = image_stats([quarters])
    assert q["colour_entropy"] == pytest.approx(2.0)
    assert q["brightness"] == pytest.approx((0 + 0.299 + 0.587 + 0.114) / 4)
    assert q["saturation"] == pytest.approx(0.75) and q["dark_share"] == 0.25 and q["white_share"] == 0.0
    # grey (128,128,128) and (130,130,130) fall into one 8-level bin: one colour; 16 levels split them
    grey = np.full((2, 2, 3), 128, dtype=np.uint8)
    grey[0] = 130
    assert colour_entropy(grey, 8) == 0.0
    assert colour_entropy(np.concatenate([grey, np.full((2, 2, 3), 100, np.uint8)]), 8) == pytest.approx(1.0)
    # over several images, each image counts once; a video counts each frame
    both = image_stats([BLACK, half])
    assert both["brightness"] == pytest.approx(0.25) and both["dark_share"] == pytest.approx(0.75)
    assert image_stats([np.stack([BLACK, half])]) == both


def test_bad_images_are_named():
    with pytest.raises(ValueError, match=r"image 1: expected RGB uint8.*float32"):
        image_stats([BLACK, BLACK.astype(np.float32)])
    with pytest.raises(ValueError, match="at least one image"):
        image_stats([])


def test_rules_trip_on_their_bound_and_bad_rules_are_config_errors():
    cfg = MonitorConfig(rules=[MonitorRule("monitor/dark_share", max=0.8, action="stop"),
                               MonitorRule("reward_mean", min=0.1)])
    monitors = Monitors(cfg)
    assert monitors.check(3, {"monitor/dark_share": 0.8, "reward_mean": 0.1}) == []  # bounds are inclusive
    alarms = monitors.check(3, {"monitor/dark_share": 0.93, "reward_mean": 0.05})
    assert [(a.metric, a.rule.action) for a in alarms] == [("monitor/dark_share", "stop"), ("reward_mean", "flag")]
    assert "monitor/dark_share=0.93" in alarms[0].message and "max 0.8" in alarms[0].message
    assert monitors.check(4, {"reward_mean": 0.5}) == []  # dark_share not measured at this step
    with pytest.raises(ConfigError, match=r"monitors\.rules\[0\]\.metric='dark'"):
        MonitorConfig(rules=[MonitorRule("dark", max=1.0)]).validate()
    with pytest.raises(ConfigError, match=r"monitors\.rules\[0\].*a `max` or a `min`"):
        MonitorConfig(rules=[MonitorRule("kl")]).validate()
    with pytest.raises(ConfigError, match="dark_threshold"):
        MonitorConfig(dark_threshold=0.9, white_threshold=0.5).validate()


def test_heldout_reward_and_gap():
    monitors = Monitors(MonitorConfig())
    out = monitors.heldout_metrics({"reward_mean": 0.7, "eval/reward": 0.25, "eval/ocr_accuracy": 0.2})
    assert out == {"monitor/heldout_reward": 0.25, "monitor/reward_gap": pytest.approx(0.45)}
    assert monitors.heldout_metrics({"reward_mean": 0.7}) == {}
    assert [monitors.wants_heldout(s) for s in (1, 2)] == [True, True]
    assert [Monitors(MonitorConfig(every=2)).wants_heldout(s) for s in (1, 2)] == [False, True]


# ------------------------------------------------------------------------------------ in a run
class _Done:
    def __init__(self, batch: RewardBatch) -> None:
        self.batch = batch

    def result(self) -> RewardBatch:
        return self.batch


class RisingPool:
    """Training batch k (1-based) scores 0.3 k and 0.3 k + 0.1 alternately; held-out images 0.1."""

    restarts = 0

    def __init__(self, *args, **kwargs) -> None:
        self.batches = 0

    def submit(self, items, prompts) -> _Done:
        self.batches += 1
        values = [0.3 * self.batches + 0.1 * (i % 2) for i in range(len(items))]
        return _Done(RewardBatch({"ocr": values, "ocr_exact": [0.0] * len(items)}, [""] * len(items)))

    def score(self, items, prompts) -> RewardBatch:
        n = len(items)
        return RewardBatch({"ocr": [0.1] * n, "ocr_exact": [0.0] * n}, [""] * n)

    def info(self) -> list[dict]:
        return [{"engine": "scripted"}]

    def shutdown(self) -> None:
        pass


def test_a_flag_rule_warns_and_tags_and_a_stop_rule_ends_the_run_with_a_checkpoint(rl_config, monkeypatch,
                                                                                   caplog, tmp_path):
    import lance_platform.runtime
    import rl.trainer

    monkeypatch.setattr(lance_platform.runtime, "init_ray", lambda address=None: None)
    monkeypatch.setattr(rl.trainer, "RewardActorPool", RisingPool)
    cfg = rl_config("steps=4", "checkpoint_every=10", "rollout.prompts_per_step=2", "rollout.group_size=2",
                    "rollout.microbatch=4", "rollout.steps=2", "rollout.eval_steps=2", "policy.device=cpu",
                    "monitors.rules=[{metric: monitor/brightness, min: 2.0}, "
                    "{metric: reward_mean, max: 0.6, action: stop}]")
    with caplog.at_level(logging.WARNING, logger="rl.trainer"):
        result = rl.trainer.train_grpo(cfg)

    # step 1: mean 0.35 (flag only); step 2: mean 0.65 > 0.6 -> stop, two iterations before steps=4
    assert result.steps == 2 and len(result.history) == 2
    assert result.stopped is not None and "reward_mean=0.65" in result.stopped and "step 2 of 4" in result.stopped
    assert result.checkpoint.name == "step-000002"  # written for the stop (checkpoint_every=10)
    ckpt.verify(result.checkpoint)
    flags = [r for r in caplog.records if "monitor/brightness" in r.getMessage()]
    assert [("step 1" in r.getMessage(), "step 2" in r.getMessage()) for r in flags] == [(True, False), (False, True)]

    for step, metrics in zip((1, 2), result.history):
        assert metrics["monitor/heldout_reward"] == pytest.approx(0.1)
        assert metrics["monitor/reward_gap"] == pytest.approx(metrics["reward_mean"] - 0.1)
        assert metrics["reward_mean"] == pytest.approx(0.3 * step + 0.05)
        # the image statistics are those of the very images in the logged sample grid
        grid = np.asarray(Image.open(tmp_path / "rl" / "samples" / f"step-{step:06d}.png").convert("RGB"))
        images = [grid[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] for r in range(2) for c in range(2)]
        expected = image_stats(images)
        for name, value in expected.items():
            assert metrics[f"monitor/{name}"] == pytest.approx(value, abs=1e-12)

    client = MlflowClient(default_tracking_uri(cfg.workdir))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "step 2" in run.data.tags["alarm.monitor/brightness"]
    assert run.data.tags["monitor_stop"] == result.stopped
    assert [m.step for m in client.get_metric_history(result.run_id, "monitor/dark_share")] == [1, 2]


class CountingPool(RisingPool):
    """RisingPool that records how many held-out images each evaluation scored."""

    scored: ClassVar[list[int]] = []

    def score(self, items, prompts) -> RewardBatch:
        CountingPool.scored.append(len(items))
        return super().score(items, prompts)


def test_monitor_only_evaluations_use_the_prompt_subset_and_leave_the_eval_curve_full(rl_config, monkeypatch):
    import lance_platform.runtime
    import rl.trainer

    monkeypatch.setattr(lance_platform.runtime, "init_ray", lambda address=None: None)
    monkeypatch.setattr(rl.trainer, "RewardActorPool", CountingPool)
    CountingPool.scored = []
    cfg = rl_config("steps=3", "eval_every=0", "checkpoint_every=10", "rollout.prompts_per_step=2",
                    "rollout.group_size=2", "rollout.microbatch=4", "rollout.steps=2", "rollout.eval_steps=2",
                    "policy.device=cpu", "prompts.eval_synthetic=3", "monitors.prompts=1")
    result = rl.trainer.train_grpo(cfg)

    # before training (full), steps 1 and 2 (the monitors' subset), step 3 (the final evaluation, full)
    assert CountingPool.scored == [3, 1, 1, 3]
    first, second, last = result.history
    for metrics in (first, second):
        assert "eval/ocr_accuracy" not in metrics
        assert metrics["monitor/heldout_reward"] == pytest.approx(0.1)
        assert metrics["monitor/reward_gap"] == pytest.approx(metrics["reward_mean"] - 0.1)
    assert last["eval/ocr_accuracy"] == pytest.approx(0.1) and "monitor/heldout_reward" in last

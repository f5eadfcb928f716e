"""GRPO options that must do what they say, on a `tiny` policy without Ray: the windowed variant
trains only its window's transitions, `inner_epochs` runs that many passes, an OCR failure on one
image scores 0 and is counted, and `reward.num_gpus` reserves GPUs only for an OCR engine on a GPU."""
from __future__ import annotations

import logging

import numpy as np
import torch

import rl.trainer
from rl.actors import actor_gpus
from rl.ocr import OcrConfig, OcrEngine, OcrError
from rl.rewards import OcrReward
from rl.trainer import GrpoTrainer


class NoRewards:
    restarts = 0

    def shutdown(self) -> None:
        pass


class TransitionSpy:
    """Wraps `transition_log_prob` in rl.trainer and records the (t, t_next) of every call."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[float, float]] = []
        real = rl.trainer.transition_log_prob

        def spy(session, x, x_next, t, t_next, noise_level):
            self.calls.append((t, t_next))
            return real(session, x, x_next, t, t_next, noise_level)

        monkeypatch.setattr(rl.trainer, "transition_log_prob", spy)


def _trainer(rl_config, *extra: str, pool=None) -> GrpoTrainer:
    cfg = rl_config("rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.microbatch=2", "policy.device=cpu",
                    "optim.lr=1e-2", *extra)
    return GrpoTrainer(cfg, reward_pool=pool or NoRewards())


def _rollouts(trainer: GrpoTrainer):
    prompts, seeds, steps = trainer.pick()
    mb = trainer.cfg.rollout.microbatch
    return [trainer.worker.rollout(prompts[a:a + mb], seeds[a:a + mb], steps) for a in range(0, len(prompts), mb)]


def test_windowed_grpo_scores_and_trains_only_the_window_transitions(rl_config, monkeypatch):
    trainer = _trainer(rl_config, "rollout.steps=4", "rollout.windowed=true", "rollout.window=[2, 2]",
                       "grpo.beta=0")
    trajs = _rollouts(trainer)
    window = trajs[0].sde_steps
    assert len(window) == 2 and window == list(range(window[0], window[0] + 2))
    outside = [j for j in range(4) if j not in window]
    for traj in trajs:
        assert traj.sde_steps == window
        assert torch.all(traj.log_probs[:, outside] == 0) and torch.all(traj.log_probs[:, window] != 0)
    spy = TransitionSpy(monkeypatch)
    stats = trainer.update(trajs, torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.ones(4, dtype=torch.bool))
    ts = trajs[0].timesteps
    scored = sorted(spy.calls)
    assert scored == sorted([(float(ts[j]), float(ts[j + 1])) for j in window] * len(trajs))
    assert stats.optimizer_steps == 2 and stats.trained_transitions == 4 * 2
    assert stats.first_ratio_max_dev == 0.0
    assert trainer.cfg.grpo.resolved_clip_range(True) == 1e-5


def test_inner_epochs_make_that_many_passes_with_the_first_ratio_exactly_one(rl_config, monkeypatch):
    trainer = _trainer(rl_config, "rollout.steps=2", "grpo.inner_epochs=3", "grpo.beta=0")
    trajs = _rollouts(trainer)
    steps_taken = []
    real_step = trainer.optimizer.step

    def counted(*args, **kwargs):
        steps_taken.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", counted)
    spy = TransitionSpy(monkeypatch)
    stats = trainer.update(trajs, torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.ones(4, dtype=torch.bool))
    assert len(trajs) == 2 and len(steps_taken) == stats.optimizer_steps == 3 * 2
    assert len(spy.calls) == len(stats.terms) == 3 * 2 * 2  # epochs x micro-batches x SDE steps
    assert stats.trained_samples == 3 * 4
    # exactly on-policy on the first optimizer step; later passes see the moved policy
    assert stats.first_ratio_max_dev == 0.0
    later = stats.terms[2:]
    assert any(t["ratio_min"] != 1.0 or t["ratio_max"] != 1.0 for t in later)
    assert trainer.optimizer.state[trainer.params[0]]["step"].item() == 6


class FailingEngine(OcrEngine):
    """Reads "HELLO" on every image, except that it raises on an image whose first pixel is 7."""

    name = "failing"

    def _read_bgr(self, image: np.ndarray) -> str:
        if int(image[0, 0, 0]) == 7:
            raise RuntimeError("segfault-like engine error")
        return "HELLO"


def test_an_ocr_failure_on_one_image_scores_zero_and_is_counted():
    images = [np.full((8, 8, 3), v, dtype=np.uint8) for v in (0, 7, 200)]
    batch = OcrReward(FailingEngine())(images, ['a sign "HELLO"'] * 3)
    assert batch.failures == 1 and batch.failed_indices == [1]
    assert batch.components["ocr"] == [1.0, 0.0, 1.0] and batch.components["ocr_exact"] == [1.0, 0.0, 1.0]
    assert batch.texts == ["HELLO", "", "HELLO"]


class _Done:
    def __init__(self, batch) -> None:
        self.batch = batch

    def result(self):
        return self.batch


class FaultyPool:
    """In-process reward pool: OcrReward with an engine that fails on the second image of each batch."""

    restarts = 0

    def __init__(self) -> None:
        class SecondFails(OcrEngine):
            name = "second-fails"

            def __init__(self) -> None:
                self.seen = 0

            def read(self, images):
                if len(images) > 1:
                    raise OcrError("batched read failed")  # OcrReward then reads one at a time
                self.seen += 1
                if self.seen % 2 == 0:
                    raise OcrError("engine fault")
                return ["HELLO"]

        self.reward = OcrReward(SecondFails())

    def submit(self, items, prompts):
        self.reward.engine.seen = 0
        return _Done(self.reward(items, prompts))

    def shutdown(self) -> None:
        pass


def test_an_ocr_failure_inside_a_grpo_iteration_is_counted_and_that_sample_gets_zero(rl_config):
    trainer = _trainer(rl_config, "rollout.steps=2", "prompts.eval_synthetic=0", pool=FaultyPool())
    metrics, _, records = trainer.iteration()
    # two micro-batches of 2: the second image of each failed
    assert metrics["ocr_failures"] == 2
    assert [r["text"] for r in records] == ["HELLO", "", "HELLO", ""]
    assert [r["ocr"] for r in records][1::2] == [0.0, 0.0] and [r["reward"] for r in records][1::2] == [0.0, 0.0]


def test_reward_gpus_are_reserved_only_for_an_ocr_engine_on_a_gpu(caplog):
    with caplog.at_level(logging.WARNING, logger="rl.actors"):
        assert actor_gpus("rapidocr", OcrConfig(), 0.5) == 0.0
    assert "reward.num_gpus=0.5 ignored" in caplog.text and "rapidocr" in caplog.text
    assert actor_gpus("paddleocr", OcrConfig(paddle_device="gpu:0"), 0.5) == 0.5
    assert actor_gpus("paddleocr", OcrConfig(paddle_device="cpu"), 1.0) == 0.0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rl.actors"):
        assert actor_gpus("rapidocr", OcrConfig(), 0.0) == 0.0
    assert caplog.text == ""


def test_the_pool_asks_ray_for_no_gpu_with_rapidocr(monkeypatch):
    """What the pool passes to Ray (recorded by a stand-in for `ray.remote`, no Ray started)."""
    import ray

    from rl.actors import RewardActorPool

    asked = {}

    class Remote:
        def options(self, **kwargs):
            asked.update(kwargs)
            return self

        def remote(self, *args):
            return object()

    monkeypatch.setattr(ray, "remote", lambda cls: Remote())
    pool = RewardActorPool(OcrConfig(engine="rapidocr"), num_actors=2, num_cpus=1.0, num_gpus=0.5)
    assert asked["num_gpus"] == 0.0 and asked["num_cpus"] == 1.0 and pool.num_gpus == 0.0
    assert len(pool.actors) == 2

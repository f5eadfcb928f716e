"""GRPO iterations on `tiny` (2 prompts x 4 samples) end to end through Ray reward actors.

The per-sample records logged to MLflow are checked against the very images logged with them: the
sample grid is cut back into its images, which are scored again here, and the advantages are
recomputed by hand from the rewards. A random `tiny` policy draws no legible text, so the OCR
reward is 0 for most images; the resume test therefore scores with reward actors whose score is
the images' mean brightness (a known, varying function of the pixels), so that rewards and
advantages differ per sample and a mix-up of images, rewards or groups shows.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from lance_model import Lance
from lance_model.checkpoint import read_tensors
from lance_platform.tracking import default_tracking_uri
from rl.rewards import OcrReward, RewardBatch
from rl.trainer import train_grpo

EXPECTED = {"reward_mean", "reward_std", "reward/ocr_mean", "reward/ocr_exact_mean", "ocr_failures", "kl",
            "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "step_time_s", "images_per_s",
            "rollout_time_s", "reward_wait_s", "update_time_s", "eval/ocr_accuracy"}
SIZE = 32  # rollout.height / width in configs/rl/grpo_ocr.yaml


def logged_step(client: MlflowClient, run_id: str, step: int, dst: Path) -> tuple[list[dict], list[np.ndarray]]:
    """(per-sample records, images cut out of the sample grid) of one logged step."""
    dst.mkdir(parents=True, exist_ok=True)
    name = f"samples/step-{step:06d}"
    records = json.loads(Path(client.download_artifacts(run_id, f"{name}.json", str(dst))).read_text())
    grid = np.asarray(Image.open(client.download_artifacts(run_id, f"{name}.png", str(dst))).convert("RGB"))
    columns = grid.shape[1] // SIZE
    images = [grid[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE]
              for r, c in (divmod(i, columns) for i in range(len(records)))]
    return records, images


def hand_advantages(rewards: list[float], group_size: int) -> list[float]:
    """(r - group mean) / (population std + 1e-4), clipped to +-5; 0 for a group of equal rewards."""
    out = []
    for g in range(0, len(rewards), group_size):
        r = np.asarray(rewards[g:g + group_size], dtype=np.float64)
        if r.max() == r.min():
            out += [0.0] * group_size
        else:
            out += list(np.clip((r - r.mean()) / (r.std() + 1e-4), -5, 5))
    return out


def check_groups(records: list[dict], group_size: int) -> None:
    """Each group is one prompt repeated, the seeds run on within the step."""
    prompts = [r["prompt"] for r in records]
    assert all(len(set(prompts[g:g + group_size])) == 1 for g in range(0, len(prompts), group_size))
    seeds = [r["seed"] for r in records]
    assert seeds == list(range(seeds[0], seeds[0] + len(seeds)))


def test_two_grpo_iterations_log_to_mlflow_and_write_a_loadable_checkpoint(ray_local, rl_config, rapid_engine,
                                                                           tmp_path):
    cfg = rl_config("steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4")
    result = train_grpo(cfg)
    assert result.steps == 2 and len(result.history) == 2
    assert all(h["ocr_failures"] == 0 and h["reward_actor_restarts"] == 0 for h in result.history)
    for h in result.history:  # the phases are parts of the iteration
        parts = h["rollout_time_s"] + h["reward_wait_s"] + h["update_time_s"]
        assert h["update_time_s"] > 0 and parts <= h["step_time_s"]

    client = MlflowClient(default_tracking_uri(cfg.workdir))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert EXPECTED <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(result.run_id, "reward_mean")] == [1, 2]
    assert run.data.params["rollout.group_size"] == "4"

    # The logged rewards are the OCR actors' scores of the very images logged with them.
    rescore = OcrReward(rapid_engine)
    for step, metrics in zip((1, 2), result.history):
        records, images = logged_step(client, result.run_id, step, tmp_path / f"step{step}")
        assert len(records) == 8 and all(im.shape == (SIZE, SIZE, 3) for im in images)
        check_groups(records, 4)
        again = rescore(images, [r["prompt"] for r in records])
        assert [r["text"] for r in records] == again.texts
        assert [r["ocr"] for r in records] == pytest.approx(again.components["ocr"], abs=1e-9)
        assert [r["reward"] for r in records] == pytest.approx(again.components["ocr"], abs=1e-9)  # weights {ocr: 1}
        assert [r["advantage"] for r in records] == pytest.approx(
            hand_advantages([r["reward"] for r in records], 4), abs=1e-5)
        assert metrics["reward_mean"] == pytest.approx(float(np.mean(again.components["ocr"])), abs=1e-9)

    assert result.checkpoint.name == "step-000002"
    loaded = Lance.from_pretrained(result.checkpoint)
    policy_keys = set(loaded.state_dict())
    assert "llm2vae.weight" in policy_keys and any(k.startswith("language_model.") for k in policy_keys)


@pytest.fixture
def brightness_actors(monkeypatch):
    """Reward actors (real Ray actors in the real pool) scoring `ocr` = mean pixel value / 255 and
    `ocr_exact` = 1 when that is above 0.5; no OCR engine is loaded."""
    from rl import actors

    class BrightnessRewardActor(actors.OcrRewardActor):
        def __init__(self, ocr, frame_stride: int = 1) -> None:
            pass

        def score(self, items, prompts):
            value = [float(np.asarray(x, dtype=np.float64).mean() / 255.0) for x in items]
            return RewardBatch({"ocr": value, "ocr_exact": [float(v > 0.5) for v in value]},
                               [f"{v:.6f}" for v in value])

        def info(self) -> dict:
            return {"engine": "brightness", "pid": os.getpid()}

    monkeypatch.setattr(actors, "OcrRewardActor", BrightnessRewardActor)


def test_rewards_follow_the_images_and_a_resumed_run_repeats_the_uninterrupted_one(
        ray_local, rl_config, brightness_actors, tmp_path):
    common = ("rollout.prompts_per_step=2", "rollout.group_size=4", "reward.weights={ocr: 1.0, ocr_exact: 0.5}",
              "optim.lr=1e-3")
    straight = train_grpo(rl_config(*common, "steps=3", f"workdir={tmp_path / 'a'}"))
    first = train_grpo(rl_config(*common, "steps=2", f"workdir={tmp_path / 'b'}"))
    resumed = train_grpo(rl_config(*common, "steps=3", f"workdir={tmp_path / 'b'}"))

    # The resumed run did one iteration, step 3, in the same MLflow run.
    assert (straight.steps, first.steps, resumed.steps) == (3, 2, 3)
    assert len(resumed.history) == 1 and resumed.run_id == first.run_id
    client_b = MlflowClient(default_tracking_uri(tmp_path / "b"))
    assert [m.step for m in client_b.get_metric_history(resumed.run_id, "reward_mean")] == [1, 2, 3]
    assert client_b.get_run(resumed.run_id).info.status == "FINISHED"

    client_a = MlflowClient(default_tracking_uri(tmp_path / "a"))
    records_a, images_a = logged_step(client_a, straight.run_id, 3, tmp_path / "dl-a")
    records_b, images_b = logged_step(client_b, resumed.run_id, 3, tmp_path / "dl-b")
    # Same prompts and seeds at step 3 as the uninterrupted run, and (exact resume) the same images.
    assert [(r["prompt"], r["seed"]) for r in records_b] == [(r["prompt"], r["seed"]) for r in records_a]
    check_groups(records_b, 4)
    for a, b in zip(images_a, images_b):
        assert np.array_equal(a, b)

    for records, images in ((records_a, images_a), (records_b, images_b)):
        brightness = [float(im.astype(np.float64).mean() / 255.0) for im in images]
        assert [r["ocr"] for r in records] == pytest.approx(brightness, abs=1e-12)
        assert [r["reward"] for r in records] == pytest.approx([v + 0.5 * (v > 0.5) for v in brightness], abs=1e-12)
        advantages = hand_advantages([r["reward"] for r in records], 4)
        assert [r["advantage"] for r in records] == pytest.approx(advantages, abs=1e-5)
        assert sum(abs(a) > 0.1 for a in advantages) >= 4  # the rewards do differ within groups

    # Earlier steps drew other prompts or seeds than step 3.
    records_a1, _ = logged_step(client_a, straight.run_id, 1, tmp_path / "dl-a1")
    assert [r["seed"] for r in records_a1] != [r["seed"] for r in records_a]

    # And the weights after step 3 agree.
    wa = read_tensors(straight.checkpoint / "model.safetensors")
    wb = read_tensors(resumed.checkpoint / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")

"""A 2-trial Ray Tune sweep of GRPO on `tiny` finishes and reports each trial's mean reward."""
from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lance_platform.tracking import default_tracking_uri
from rl.tune import load_tune_config, run_sweep

OVERRIDES = ("overrides=[steps=1, rollout.steps=2, rollout.eval_steps=2, prompts.eval_synthetic=1, "
             "reward.num_actors=1]")
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "rl" / "tune_ocr.yaml"


def test_two_trial_sweep_reports_each_trials_mean_reward(ray_local, tmp_path):
    cfg, base = load_tune_config(CONFIG, [f"workdir={tmp_path / 'tune'}", "num_samples=2",
                                          OVERRIDES])
    summaries = run_sweep(cfg, base)
    assert len(summaries) == 2
    for s in summaries:
        assert s.status == "TERMINATED" and s.iterations == 1
        assert s.reward_mean is not None and s.ocr_accuracy is not None
        assert "grpo.beta" in s.params and "optim.lr" in s.params

    client = MlflowClient(default_tracking_uri(cfg.workdir))
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("stage") == "rl-tune"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert len(children) == 2
    # Each trial ended its own run (FINISHED, not left RUNNING by Tune's stop) and logged the same
    # reward that Tune reported for it, and its checkpoint exists on disk.
    for s in summaries:
        run = children[f"trial-{s.trial_id}"]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["reward_mean"] == pytest.approx(s.reward_mean)
        assert run.data.metrics["eval/ocr_accuracy"] == pytest.approx(s.ocr_accuracy)
        assert (Path(run.data.tags["checkpoint"]) / "model.safetensors").is_file()


def test_a_trial_reserves_its_policy_rollout_training_and_reward_resources():
    from rl.tune import trial_bundles, trial_config

    cfg, base = load_tune_config(CONFIG, [])
    plain = trial_config(base, {})
    assert trial_bundles(plain) == [{"CPU": 1.0}] + [{"CPU": plain.reward.num_cpus}] * plain.reward.num_actors
    # auto on a GPU cluster: the policy runs in the trial, which then needs a GPU
    assert trial_bundles(plain, cluster_gpus=8)[0] == {"CPU": 1.0, "GPU": 1.0}
    spread = trial_config({**base, "rollout": {**base.get("rollout", {}), "num_workers": 2, "num_gpus": 0.5},
                           "grpo": {**base.get("grpo", {}), "train_workers": 2, "train_num_gpus": 1.0},
                           "reward": {**base.get("reward", {}), "num_actors": 3, "num_cpus": 0.5}}, {})
    bundles = trial_bundles(spread, cluster_gpus=8)
    assert bundles == ([{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 0.5}] * 2 + [{"CPU": 1.0, "GPU": 1.0}] * 2
                       + [{"CPU": 0.5}] * 3)
    assert sum(b.get("GPU", 0) for b in bundles) == 3.0

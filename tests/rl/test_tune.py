"""A 2-trial Ray Tune sweep of GRPO on `tiny` finishes and reports each trial's mean reward."""
from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.tracking import default_tracking_uri
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
        assert s.reward_mean is not None and 0.0 <= s.reward_mean <= 1.0
        assert s.ocr_accuracy is not None
        assert "grpo.beta" in s.params and "optim.lr" in s.params

    client = MlflowClient(default_tracking_uri(cfg.workdir))
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("stage") == "rl-tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(children) == 2
    assert all("reward_mean" in c.data.metrics and c.info.status == "FINISHED" for c in children)

"""Two GRPO iterations on `tiny` (2 prompts x 4 samples) end to end through Ray reward actors."""
from __future__ import annotations

import torch
from mlflow.tracking import MlflowClient

from lance_model import Lance
from lance_platform.tracking import default_tracking_uri
from rl.trainer import train_grpo

EXPECTED = {"reward_mean", "reward_std", "reward/ocr_mean", "reward/ocr_exact_mean", "ocr_failures", "kl",
            "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "step_time_s", "images_per_s",
            "eval/ocr_accuracy"}


def test_two_grpo_iterations_log_to_mlflow_and_write_a_loadable_checkpoint(ray_local, rl_config):
    cfg = rl_config("steps=2", "rollout.prompts_per_step=2", "rollout.group_size=4")
    result = train_grpo(cfg)
    assert result.steps == 2 and len(result.history) == 2
    assert all(0.0 <= h["reward_mean"] <= 1.0 and h["ocr_failures"] == 0 for h in result.history)

    client = MlflowClient(default_tracking_uri(cfg.workdir))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert EXPECTED <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(result.run_id, "reward_mean")] == [1, 2]
    assert run.data.params["rollout.group_size"] == "4"
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "samples")}
    assert "samples/step-000002.png" in artifacts and "samples/step-000002.json" in artifacts

    assert result.checkpoint.name == "step-000002"
    loaded = Lance.from_pretrained(result.checkpoint)
    policy_keys = set(loaded.state_dict())
    assert "llm2vae.weight" in policy_keys and any(k.startswith("language_model.") for k in policy_keys)
    state = torch.load(result.checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2

"""A GRPO run resuming past a damaged newest checkpoint (Ray reward actors, `tiny` policy)."""
from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from lance_platform import checkpoint as ckpt
from lance_platform.tracking import default_tracking_uri
from rl.trainer import train_grpo


def test_truncated_newest_checkpoint_resumes_from_the_previous_one_recorded_in_mlflow(ray_local, rl_config, caplog):
    common = ("rollout.prompts_per_step=1", "rollout.group_size=2", "prompts.eval_synthetic=0")
    first = train_grpo(rl_config(*common, "steps=2"))
    root = first.checkpoint.parent
    assert sorted(d.name for d in root.iterdir()) == ["step-000001", "step-000002"]
    model = root / "step-000002" / ckpt.MODEL_FILE
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])

    with caplog.at_level(logging.WARNING, logger="lance_platform.checkpoint"):
        resumed = train_grpo(rl_config(*common, "steps=3"))
    assert "step-000002" in caplog.text and str(model) in caplog.text
    # Steps 2 and 3 ran again from step 1's state, in the same MLflow run, which names the fallback.
    assert resumed.steps == 3 and len(resumed.history) == 2 and resumed.run_id == first.run_id
    assert ckpt.verify(root / "step-000002")["step"] == 2  # rewritten whole
    client = MlflowClient(default_tracking_uri(resumed.checkpoint.parents[1]))
    tag = client.get_run(resumed.run_id).data.tags["resume_fallback"]
    assert "skipped step-000002" in tag and "model.safetensors" in tag and tag.endswith("resumed from step-000001")

"""Staged training on Ray Train (CPU, tiny preset, 2 workers with FSDP2 over gloo)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from lance_model import Lance
from lance_model.checkpoint import read_tensors
from lance_platform.checkpoint import verify
from lance_platform.config import ConfigError
from lance_platform.tracking import default_tracking_uri
from pipelines.config import load_stage_config
from pipelines.trainer import run_pipeline, run_stage

pytestmark = pytest.mark.slow

MIXTURE = "mixture.groups={gen: {tasks: [t2i]}, und: {tasks: [i2t]}, edit: {tasks: [i2i], weight: 0.5}}"


@pytest.fixture(scope="module")
def ray_local():
    import os

    import ray

    from lance_platform.runtime import init_ray

    # Ray Train's controller polls its workers every 2 s and its preemption watcher every 5 s: on
    # runs this short, the end of each stage (and the failed worker) was noticed seconds late. The
    # watcher (an actor per stage, for node drains, which no test here makes) is left out. Ray Train
    # hands these variables from the driver to its controller and workers; what the tests check is
    # unchanged. The local Ray is shared with the next modules (tests/conftest.py shuts it down).
    polls = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
             "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    saved = {k: os.environ.get(k) for k in polls}
    os.environ.update(polls)
    init_ray(num_cpus=2)  # "existing" when a local Ray is up already
    yield ray
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def stage(shards, *extra: str):
    return load_stage_config(None, [
        f"data.shards={shards}", "steps=8", "checkpoint_every=2", "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5", "data.max_tokens=900", "optim.lr=0.003", MIXTURE,
        "model.overrides={freeze_embeddings: false, freeze_lm_head: false}", "ema_decay=0.9",
        "data.holdout_per_group=1", *extra])


def test_stage_resumes_after_a_worker_failure_to_the_same_weights(ray_local, tmp_path, shard_dir, monkeypatch,
                                                                 fail_once_at_step):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    reference = run_stage(stage(shard_dir), tmp_path / "a")

    # The uninterrupted run trained, checkpointed in the official layout and tracked everything.
    model = Lance.from_pretrained(reference.checkpoint)
    assert (reference.checkpoint / "ema.safetensors").is_file()
    # Every checkpoint is one complete, pickle-free directory of the shared format: rank 1's share
    # (its data state) landed beside rank 0's, listed by its own manifest; the export verifies too.
    exported = verify(reference.checkpoint)
    assert {"optimizer.safetensors", "optimizer.json", "trainer_state.json"} <= set(exported["files"])
    assert exported["step"] == 8 and exported["parts"] == []
    # during the stage: sharded checkpoints, every rank's own files, the newest keep_checkpoints=2 kept
    sharded = sorted(d for d in (tmp_path / "a" / "pt" / "checkpoints").iterdir() if d.is_dir())
    assert [d.name for d in sharded] == ["step-000006", "step-000008"]
    for d in sharded:
        manifest = verify(d)
        assert manifest["layout"] == "sharded" and manifest["parts"] == ["manifest.rank1.json"]
        assert (d / "data_state_rank1.json").is_file() and (d / "model.rank1.safetensors").is_file()
        assert not (d / "optim").exists() and not list(d.glob("*.pt"))
    client = MlflowClient(default_tracking_uri(tmp_path / "a"))
    run = client.get_run(reference.run_id)
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.003"
    losses = [m.value for m in client.get_metric_history(reference.run_id, "loss")]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    assert {"val_loss/t2i", "val_loss/i2t", "val_loss/i2i", "tokens_per_s", "grad_norm"} <= set(run.data.metrics)
    assert "stage.yaml" in [a.path.split("/")[-1] for a in client.list_artifacts(reference.run_id, "config")]
    validation = {a.path.split("/")[-1] for a in client.list_artifacts(reference.run_id, "validation")}
    assert {"samples_step000007.png", "answers_step000007.json"} <= validation

    # The same stage with a worker that raises once at step 5 resumes from the step-3 checkpoint.
    fail_once_at_step(5)
    resumed = run_stage(stage(shard_dir), tmp_path / "b")
    assert (tmp_path / "b" / "pt" / ".fault_injected").read_text() == "5"
    a, b = read_tensors(reference.checkpoint / "model.safetensors"), read_tensors(resumed.checkpoint / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    client_b = MlflowClient(default_tracking_uri(tmp_path / "b"))
    runs = client_b.search_runs([client_b.get_experiment_by_name("lance").experiment_id])
    assert [r.info.run_id for r in runs] == [resumed.run_id]  # one run, continued after the restart
    steps = {m.step for m in client_b.get_metric_history(resumed.run_id, "loss")}
    assert steps == set(range(8))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def pipeline_file(tmp_path, shard_dir, stages: tuple[tuple[str, str], ...]):
    """A pipeline config of (name, init.kind) stages of 2 steps each on one worker."""
    paths = []
    for name, init in stages:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "steps": 2, "init": {"kind": init}, "checkpoint_every": 0,
            "data": {"max_tokens": 900},
            "mixture": {"groups": {"gen": {"tasks": ["t2i"]}, "und": {"tasks": ["i2t"]}}},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}}))
        paths.append(str(path))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "demo", "workdir": str(tmp_path / "work"), "shards": str(shard_dir),
                                        "stages": paths}))
    return pipeline


def test_pipeline_chains_pt_and_ct(ray_local, tmp_path, shard_dir, monkeypatch):
    # Two stages on Ray Train: each further stage cost ~17 s of start-up; which checkpoint a third
    # stage starts from is checked without Ray below, and the demo (tests/jobs/test_demo.py) runs
    # pt -> ct -> sft on Ray Train.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    results = run_pipeline(pipeline_file(tmp_path, shard_dir, (("pt", "preset"), ("ct", "previous"))))
    assert [r.name for r in results] == ["pt", "ct"]
    client = MlflowClient(default_tracking_uri(tmp_path / "work"))
    runs = client.search_runs([client.get_experiment_by_name("lance").experiment_id])
    parent = [r for r in runs if r.info.run_name == "demo"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["ct", "pt"]
    # each stage started from the previous stage's weights: CT's first step begins from PT's final
    # weights, so the CT run's init path is PT's checkpoint and its weights moved away from it.
    pt, ct = (read_tensors(r.checkpoint / "model.safetensors") for r in results[:2])
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(pt[key], ct[key])
    assert (pt[key] - ct[key]).abs().max() < 0.1  # a few small steps from PT, not a fresh init


def test_pipeline_starts_each_previous_stage_from_the_stage_just_before(tmp_path, shard_dir, monkeypatch):
    """Without Ray (the stages themselves are recorded, not run): in pt -> ct -> sft, CT gets PT's
    checkpoint and SFT gets CT's, not PT's; every stage is a child of the one parent run."""
    from pipelines import trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    calls = []

    def record_stage(stage, workdir, parent_run_id=None, init_path=None, experiment="lance", address=None):
        calls.append((stage.name, init_path, parent_run_id))
        return trainer.StageResult(stage.name, stage.steps, 1.0, Path(workdir) / stage.name / "final", None, {})

    monkeypatch.setattr(trainer, "run_stage", record_stage)
    pipeline = pipeline_file(tmp_path, shard_dir, (("pt", "preset"), ("ct", "previous"), ("sft", "previous")))
    results = run_pipeline(pipeline)
    work = (tmp_path / "work").resolve()
    parent = (work / "mlflow_parent_run_id").read_text().strip()
    assert parent and calls == [("pt", None, parent), ("ct", str(work / "pt" / "final"), parent),
                                ("sft", str(work / "ct" / "final"), parent)]
    assert [r.name for r in results] == ["pt", "ct", "sft"]
    summary = json.loads((work / "summary.json").read_text())
    assert [(s["name"], s["checkpoint"]) for s in summary] == [(n, str(work / n / "final")) for n in ("pt", "ct", "sft")]


def test_bad_config_fails_before_ray_naming_the_field(tmp_path, shard_dir):
    with pytest.raises(ConfigError, match=r"mixture\.groups\.gen\.tasks"):
        load_stage_config(None, [f"data.shards={shard_dir}", "mixture.groups={gen: {tasks: [t2x]}}"])
    with pytest.raises(ConfigError, match=r"mixture\.groups\.\*\.weight"):
        load_stage_config(None, [f"data.shards={shard_dir}", "mixture.groups={gen: {tasks: [t2i], weight: 0}}"])
    with pytest.raises(ConfigError, match=r"data\.shards='/nonexistent/shards'"):
        load_stage_config(None, ["data.shards=/nonexistent/shards"])
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        load_stage_config(None, [f"data.shards={shard_dir}", "optim.lrr=1"])

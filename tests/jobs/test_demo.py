"""`lance-pipeline demo` end to end, as a user runs it (a subprocess with a local Ray), then
`lance-pipeline generate` from its final checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from lance_model import Lance
from lance_platform.checkpoint import read_trainer_state, verify
from lance_platform.tracking import PARENT_TAG

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CHILDREN = {"curate", "pt", "ct", "sft", "rl"}


def cli(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # Ray Train's controller polls its workers every 2 s and preemption every 5 s: each stage then ends
    # 2-4.5 s after its last report; 0.5 s polls change nothing else. The preemption watcher (one more
    # actor process per stage, for node drains, which no test makes) is left out.
    env.update(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5",
               RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, cli("demo", "--workdir", str(workdir), timeout=1500)


@pytest.fixture(scope="module")
def demo(demo_run):
    workdir, proc = demo_run
    return workdir, proc.stdout


def test_demo_output_is_short_when_not_a_terminal(demo_run):
    workdir, proc = demo_run  # stdout and stderr are pipes here, as in CI or a Ray job's log
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert len(lines) < 300, f"{len(lines)} lines; the most frequent: {Counter(lines).most_common(5)}"
    assert not [line for line in lines if "Running Dataset" in line or "execution finished" in line]
    logs = workdir / "logs"
    assert f"full logs: {logs}" in proc.stderr
    assert "curate run 0:" in (logs / "lance-pipeline.log").read_text()
    assert (logs / "ray").is_dir() and any((logs / "ray").glob("worker-*.out"))


def test_demo_tracks_one_parent_and_five_stage_runs(demo):
    workdir, out = demo
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {uri}" in out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lance").experiment_id])
    parents = [r for r in runs if r.info.run_name == "demo"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get(PARENT_TAG) == parent.info.run_id}
    assert set(children) == CHILDREN and len(runs) == 6
    for name, run in children.items():
        assert run.info.status == "FINISHED", name
        assert run.data.params, name
        assert run.data.metrics, name
        assert client.list_artifacts(run.info.run_id), name
    assert children["curate"].data.metrics["curated"] > 0
    for name in ("pt", "ct", "sft"):
        losses = [m.value for m in client.get_metric_history(children[name].info.run_id, "loss")]
        assert losses and all(np.isfinite(losses)), name
    assert "reward_mean" in children["rl"].data.metrics
    assert any(a.path == "samples" for a in client.list_artifacts(children["rl"].info.run_id))
    assert {"curate/rows", "pt/final_loss", "rl/final_reward", "demo_seconds"} <= set(parent.data.metrics)

    summary = json.loads((workdir / "summary.json").read_text())
    assert [s["stage"] for s in summary] == ["curate", "pt", "ct", "sft", "rl"]
    assert [s["run_id"] for s in summary] == [children[s["stage"]].info.run_id for s in summary]
    for stage in ("curate", "pt", "ct", "sft", "rl"):  # the printed table names every stage's output
        line = next(line for line in out.splitlines() if line.startswith(f"{stage} "))
        assert str(workdir) in line


def test_demo_checkpoints_load(demo):
    workdir, _ = demo
    summary = json.loads((workdir / "summary.json").read_text())
    for entry in summary[1:]:
        model = Lance.from_pretrained(entry["output"])
        assert all(torch.isfinite(p).all() for p in model.parameters()), entry["stage"]
    rl = Path(summary[-1]["output"])
    assert rl.parent == workdir / "rl" / "checkpoints"
    assert verify(rl)["step"] == read_trainer_state(rl)["step"] > 0  # a complete checkpoint of the one format


def test_generate_an_image_from_the_final_checkpoint(demo, tmp_path):
    from jobs.cli import main

    workdir, _ = demo
    checkpoint = json.loads((workdir / "summary.json").read_text())[-1]["output"]
    # `lance-pipeline generate` in this process: the demo above ran the CLI as a subprocess already,
    # and a second interpreter only re-imported torch and transformers (~5 s)
    assert main(["generate", "--checkpoint", checkpoint, "--task", "t2i", "--prompt", 'a sign that says "OPEN"',
                 "--height", "32", "--width", "32", "--steps", "4", "--out", str(tmp_path)]) == 0
    image = np.asarray(Image.open(tmp_path / "000_t2i.png"))
    assert image.shape == (32, 32, 3) and image.std() > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results[0]["file"] == "000_t2i.png" and results[0]["task"] == "t2i"


def test_demo_grpo_trains_on_rewards_with_spread_and_changes_the_weights(demo, tmp_path):
    from safetensors.torch import load_file

    workdir, out = demo
    summary = json.loads((workdir / "summary.json").read_text())
    rl, sft = summary[-1], summary[-2]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run_id = rl["run_id"]
    group_size = int(client.get_run(run_id).data.params["rollout.group_size"])

    spread_groups = 0  # groups with reward > 0 and rewards that differ: the ones GRPO learns from
    for step in (1, 2):
        records = json.loads(Path(client.download_artifacts(run_id, f"samples/step-{step:06d}.json", str(tmp_path)))
                             .read_text())
        for g in range(0, len(records), group_size):
            group = records[g:g + group_size]
            assert len({r["prompt"] for r in group}) == 1
            rewards = [r["reward"] for r in group]
            if max(rewards) > 0 and max(rewards) > min(rewards):
                spread_groups += 1
                assert any(r["advantage"] != 0 for r in group)
    assert spread_groups >= 1

    steps = [m.value for m in client.get_metric_history(run_id, "optimizer_steps")]
    skipped = [m.value for m in client.get_metric_history(run_id, "groups_skipped")]
    assert len(steps) == 2 and sum(steps) >= 1  # real updates, counted as they ran
    counters = rl["counters"]
    assert counters["optimizer_steps"] == sum(steps) and counters["groups_skipped"] == sum(skipped)
    assert counters["groups_trained"] + counters["groups_skipped"] == counters["groups"]
    assert "start_eval/reward" in counters and rl["start_value"] == counters["start_eval/reward"]
    line = next(line for line in out.splitlines() if line.startswith("GRPO: "))
    assert f"{int(counters['optimizer_steps'])} optimizer steps" in line

    before = load_file(Path(sft["output"]) / "model.safetensors")  # the weights GRPO started from
    after = load_file(Path(rl["output"]) / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "GRPO took optimizer steps but no weight changed"

"""MLflow tracking wrapper: runs, parent/child, resume by id, and tolerance of a broken backend."""
from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from lance_platform.tracking import PARENT_TAG, Tracker, default_tracking_uri, tracked_run


def test_parent_child_runs_with_params_metrics_artifacts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracked_run(tmp_path, "pipeline") as parent:  # noqa: SIM117 - the child needs the parent id
        with tracked_run(tmp_path, "pt", parent_run_id=parent.run_id) as child:
            child.log_params({"optim": {"lr": 1e-4, "betas": [0.9, 0.95]}, "steps": 3})
            for step in range(3):
                child.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            child.log_dict({"a": 1}, "config.yaml")
            child.log_input("shards", source=str(tmp_path), digest="abc123")
    client = MlflowClient(default_tracking_uri(tmp_path))
    run = client.get_run(child.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0001" and run.data.params["steps"] == "3"
    assert run.data.tags[PARENT_TAG] == parent.run_id
    history = client.get_metric_history(child.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2] and history[-1].value == 1 / 3
    assert [a.path for a in client.list_artifacts(child.run_id)] == ["config.yaml"]
    assert run.inputs.dataset_inputs[0].dataset.digest == "abc123"
    assert (tmp_path / "mlflow.db").is_file()


def test_resume_reopens_the_same_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracked_run(tmp_path, "pt") as first:
        first.log_metrics({"loss": 2.0}, step=0)
    with tracked_run(tmp_path, "pt", run_id=first.run_id) as again:
        again.log_metrics({"loss": 1.0}, step=1)
    client = MlflowClient(default_tracking_uri(tmp_path))
    assert again.run_id == first.run_id
    assert [m.value for m in client.get_metric_history(first.run_id, "loss")] == [2.0, 1.0]


def test_failing_body_marks_run_failed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_id = None
    try:
        with tracked_run(tmp_path, "pt") as t:
            run_id = t.run_id
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert MlflowClient(default_tracking_uri(tmp_path)).get_run(run_id).info.status == "FAILED"


def test_unreachable_backend_warns_once_and_work_goes_on(caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    tracker = Tracker("http://127.0.0.1:9", "lance")
    with caplog.at_level(logging.WARNING):
        tracker.start("pt")
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_params({"a": 1})
        tracker.end()
    warnings = [r for r in caplog.records if "MLflow tracking" in r.getMessage()]
    assert len(warnings) == 1 and "goes on without tracking" in warnings[0].getMessage()


def test_end_open_children_closes_only_runs_left_running(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracked_run(tmp_path, "sweep") as parent:
        with tracked_run(tmp_path, "done", parent_run_id=parent.run_id) as done:
            pass
        abandoned = Tracker(default_tracking_uri(tmp_path))
        abandoned.start("abandoned", parent_run_id=parent.run_id)
        other = Tracker(default_tracking_uri(tmp_path))
        other.start("unrelated")  # RUNNING, but not a child of the sweep
        assert parent.end_open_children("KILLED", {"stopped_by": "tune"}) == [abandoned.run_id]
    client = MlflowClient(default_tracking_uri(tmp_path))
    assert client.get_run(done.run_id).info.status == "FINISHED"
    killed = client.get_run(abandoned.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["stopped_by"] == "tune"
    assert client.get_run(other.run_id).info.status == "RUNNING"

"""MLflow tracking wrapper: runs, parent/child, resume by id, experiment kind and artifact location,
HTTP client defaults, and tolerance of a broken backend."""
from __future__ import annotations

import logging
import socket
import time

from mlflow.tracking import MlflowClient

from lance_platform.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    HTTP_DEFAULTS,
    PARENT_TAG,
    Tracker,
    default_tracking_uri,
    http_client_env,
    tracked_run,
)


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


def test_without_mlflow_installed_every_call_is_a_warning_not_a_crash(tmp_path, caplog, monkeypatch):
    # a GPU machine may lack MLflow: the client is imported inside the guarded call, not before it
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    tracker = Tracker(default_tracking_uri(tmp_path), "lance", tmp_path / "mlartifacts")
    (tmp_path / "a.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        assert tracker.start("pt") is None
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_params({"a": 1})
        tracker.set_tags({"k": "v"})
        tracker.log_artifact(tmp_path / "a.txt")
        tracker.end("FAILED")
    warnings = [r for r in caplog.records if "MLflow tracking" in r.getMessage()]
    assert len(warnings) == 1 and "mlflow" in warnings[0].getMessage().lower()


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


def test_embedded_store_keeps_artifacts_in_the_workdir_and_marks_model_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracked_run(tmp_path, "pt") as t:
        t.log_dict({"a": 1}, "config.yaml")
    client = MlflowClient(default_tracking_uri(tmp_path))
    exp = client.get_experiment_by_name("lance")
    assert exp.artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    assert list((tmp_path / "mlartifacts").rglob("config.yaml"))


def test_an_experiment_made_elsewhere_gets_the_kind_tag(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("older")
    Tracker(uri, "older").start("pt")
    assert MlflowClient(uri).get_experiment_by_name("older").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_a_server_uri_sends_no_client_artifact_location():
    tracker = Tracker("https://mlflow.example:5000", "lance", "/tmp/workdir/mlartifacts")
    assert tracker.remote and tracker.artifact_root is None
    assert not Tracker("sqlite:///x.db", "lance", "/tmp/w/mlartifacts").remote


def test_http_defaults_fill_in_but_never_override(monkeypatch):
    for key in HTTP_DEFAULTS:
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    env = http_client_env()
    assert env["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
    assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2" and env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 60 and MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2


def test_refused_server_fails_in_seconds_with_our_defaults(caplog, monkeypatch):
    for key in HTTP_DEFAULTS:
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    begin = time.monotonic()
    with caplog.at_level(logging.WARNING):
        tracker = Tracker(f"http://127.0.0.1:{port}", "lance")
        assert tracker.start("pt") is None
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.end()
    assert time.monotonic() - begin < 15
    assert [r.name for r in caplog.records if r.levelno >= logging.WARNING] == ["lance_platform.tracking"]

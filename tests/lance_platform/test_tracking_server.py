"""Tracking against a real `mlflow server` on loopback: artifacts reach the server's artifact store
(proxied artifacts, nothing on the client's disk), and a server killed mid-run costs one warning and
seconds, not minutes."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed_helpers import free_port
from mlflow.tracking import MlflowClient

from lance_platform.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, HTTP_DEFAULTS, Tracker

START_TIMEOUT_S = 180.0
MLFLOW = Path(sys.executable).parent / "mlflow"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def kill_server(proc: subprocess.Popen) -> None:
    """SIGKILL the server and every worker it started (they share its process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """One server for the module (its start takes a minute on a busy machine); the kill test, last
    in the file, ends it."""
    tmp_path = tmp_path_factory.mktemp("mlflow-server")
    if not MLFLOW.is_file():
        pytest.fail(f"no mlflow executable next to {sys.executable}")
    port = free_port()
    artifacts = tmp_path / "server-artifacts"
    log_file = tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(artifacts)],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(url):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_file.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {START_TIMEOUT_S:.0f} s:\n{log_file.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url, artifacts, proc
    finally:
        kill_server(proc)


@pytest.fixture
def default_http_env() -> Iterator[None]:
    """Our HTTP defaults, not a value left in the environment, decide the timings here."""
    saved = {k: os.environ.pop(k, None) for k in HTTP_DEFAULTS}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_artifacts_go_to_the_servers_store_not_the_client(server, tmp_path, default_http_env):
    url, artifacts, _ = server
    workdir = tmp_path / "client-workdir"
    report = tmp_path / "report.json"
    report.write_text('{"curated": 11}')
    tracker = Tracker(url, "lance", workdir / "mlartifacts")
    run_id = tracker.start("curate")
    assert run_id is not None
    tracker.log_artifact(report, "reports")
    tracker.log_dict({"steps": 3}, "config/stage.yaml")
    tracker.end()

    stored = sorted(p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file())
    assert any(p.endswith(f"{run_id}/artifacts/reports/report.json") for p in stored), stored
    assert any(p.endswith(f"{run_id}/artifacts/config/stage.yaml") for p in stored), stored
    served = next(artifacts.rglob("report.json"))
    assert served.read_text() == '{"curated": 11}'
    assert not (workdir / "mlartifacts").exists()
    assert [p.name for p in tmp_path.rglob("*")] == ["report.json"]  # the client wrote nothing of its own

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("lance")
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["config", "reports"]


def test_server_killed_mid_run_costs_one_warning_and_seconds(server, caplog, default_http_env):
    url, _, proc = server
    parent = Tracker(url, "lance")
    parent.start("pipeline")
    stage = Tracker(url, "lance")
    stage.start("pt", parent_run_id=parent.run_id)
    for step in range(3):
        stage.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    assert [m.step for m in MlflowClient(url).get_metric_history(stage.run_id, "loss")] == [0, 1, 2]

    kill_server(proc)
    killed = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="lance_platform.tracking"):
        for step in range(3, 50):  # the rest of the stage: every call returns
            stage.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            if step % 10 == 0:
                stage.log_params({"step": step})
                stage.set_tags({"last_step": str(step)})
        stage.log_dict({"done": True}, "summary.json")
        stage.end("FINISHED")
        parent.log_metrics({"pt/final_loss": 0.02})
        parent.end("FINISHED")
        late = Tracker(url, "lance")  # a stage opened after the failure skips the dead server
        assert late.start("ct") is None
        late.end()
    elapsed = time.monotonic() - killed
    assert elapsed < 30, f"the remaining work took {elapsed:.1f} s after the kill"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert url in warnings[0].getMessage() and "goes on without tracking" in warnings[0].getMessage()

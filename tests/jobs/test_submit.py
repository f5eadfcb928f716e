"""`lance-pipeline submit` against a real Ray head started here (loopback, own ports and temp dir).

The head is stopped by killing the process group this test started: never `ray stop`, which would
stop every Ray instance on the machine, other people's included.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from distributed_helpers import free_port

from jobs.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CURATION = REPO / "configs" / "curation" / "synthetic.yaml"
# The interpreter's own scripts directory: `ray` and the job's `python` are found there, not on a
# PATH that may lack them (`venv/bin/python -m pytest` without an activated venv).
SCRIPTS = Path(sys.executable).parent


def wait_for_dashboard(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> None:
    """Until the dashboard answers: 200, or 401 from a head that requires a token."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`ray start` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return
            time.sleep(0.25)
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"the Ray dashboard at {url} did not come up in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def head_process(extra_env: dict[str, str]) -> Iterator[str]:
    """A Ray head with the dashboard (job server) on loopback; yields the dashboard URL."""
    # A short private temp dir: Ray's socket paths are length-limited, and `ray start` records the
    # cluster address there, so no other process on this machine can pick this head up by accident.
    temp_dir = tempfile.mkdtemp(prefix="lpray")
    gcs, dashboard = free_port(), free_port()
    log = Path(temp_dir) / "ray-start.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PATH"] = os.pathsep.join([str(SCRIPTS), env.get("PATH", "")])  # the job's `python` is this one
    # On SIGTERM, `ray start --block` first drains the node for up to 30 s (for Serve traffic this
    # head never has) before stopping its processes: without this the teardown below outwaits it.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    env.update(extra_env)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(SCRIPTS / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
             "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats",
             # every per-node port of its own: another Ray on this machine (a test's local Ray)
             # holds the defaults, e.g. the dashboard agent's 52365
             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(url, proc, log)
        yield url
    finally:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    # a loopback test head: no token auth (Ray >= 2.5x enables it by default)
    with head_process({"RAY_AUTH_MODE": "disabled"}) as url:
        yield url


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A head that requires a token; its token lives only in its environment and private HOME
    (never the machine's ~/.ray/auth_token)."""
    home = tmp_path_factory.mktemp("token-head-home")
    with head_process({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "HOME": str(home)}) as url:
        yield url


def small_curation(tmp_path: Path) -> Path:
    cfg = yaml.safe_load(CURATION.read_text())
    cfg["sources"][0]["synthetic"].update(images=2, videos=0, edits=0, qa=0)
    cfg["output"]["dir"] = str(tmp_path / "curated")
    cfg["tracking"]["workdir"] = str(tmp_path / "tracking")
    path = tmp_path / "curation.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_submitted_curate_job_succeeds_and_reports_its_status(ray_head, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = small_curation(tmp_path)
    code = main(["submit", "--address", ray_head, "--working-dir", str(REPO), "curate", "--config", str(config)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    job_id = out.split("submitted Ray job ", 1)[1].split()[0]
    assert f"Ray job {job_id} SUCCEEDED" in out
    assert "curate run 0: 2 new items" in out  # the job's own output, followed live
    assert sorted(p.name for p in (tmp_path / "curated" / "shards").glob("*.parquet"))
    assert (tmp_path / "curated" / "manifest.json").is_file()
    assert (tmp_path / "tracking" / "mlflow.db").is_file()

    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(ray_head).get_job_info(job_id)
    assert str(info.status) in ("SUCCEEDED", "JobStatus.SUCCEEDED") and info.driver_exit_code == 0
    assert info.entrypoint.startswith("python -m jobs.cli") and " curate --config " in info.entrypoint


def test_a_failing_job_gives_a_non_zero_exit(ray_head, tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    code = main(["submit", "--address", ray_head, "--working-dir", str(REPO), "curate", "--config", str(missing)])
    out = capsys.readouterr().out
    assert code == 2  # the job's own exit code: a user error inside the job
    assert "FAILED" in out and f"config file not found: {missing}" in out


def test_no_wait_returns_at_once_with_the_job_id(ray_head, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient

    started = time.time()
    code = main(["submit", "--address", ray_head, "--working-dir", str(REPO), "--no-wait", "--job-id",
                 f"lance-nowait-{os.getpid()}", "curate", "--config", str(tmp_path / "missing.yaml")])
    assert code == 0 and time.time() - started < 60
    assert f"submitted Ray job lance-nowait-{os.getpid()}" in capsys.readouterr().out
    client = JobSubmissionClient(ray_head)
    deadline = time.time() + 120
    while str(client.get_job_status(f"lance-nowait-{os.getpid()}")).split(".")[-1] not in ("FAILED", "SUCCEEDED"):
        assert time.time() < deadline
        time.sleep(0.25)
    assert client.get_job_info(f"lance-nowait-{os.getpid()}").driver_exit_code == 2


def test_a_token_auth_head_without_a_token_gets_one_line_where_plain_ray_prints_a_traceback(token_head, tmp_path):
    # The client has no token: no RAY_AUTH_* variables and a HOME without ~/.ray/auth_token.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["HOME"] = str(tmp_path)
    ours = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "--address", token_head, "--working-dir",
                           str(REPO), "curate", "--config", str(CURATION)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    expected = (f"lance-pipeline: error: the Ray dashboard at {token_head} requires a token: set RAY_AUTH_MODE=token "
                "and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token")
    assert ours.returncode == 2, ours.stderr[-3000:]
    assert expected in ours.stderr.splitlines() and "Traceback" not in ours.stderr
    assert "submitted Ray job" not in ours.stdout

    plain = subprocess.run([str(SCRIPTS / "ray"), "job", "submit", "--address", token_head, "--", "python", "-c", "1"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert plain.returncode == 1
    assert "Traceback (most recent call last)" in plain.stderr and "AuthenticationError" in plain.stderr

"""Console output modes and the environment Ray workers get (no Ray started here)."""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lance_platform import logs
from lance_platform.runtime import with_env_vars

KEYS = (*logs.QUIET_RAY_ENV, *logs.QUIET_LOCAL_ENV, *logs.QUIET_DRIVER_ENV)


@pytest.fixture
def clean_output(monkeypatch) -> Iterator[None]:
    """Undo what configure_output does to the root logger, the environment and the module state."""
    for key in KEYS:
        monkeypatch.setenv(key, "placeholder")
        monkeypatch.delenv(key)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setattr(logs, "_mode", None)
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def console_passes(name: str, level: int) -> bool:
    console = next(h for h in logging.getLogger().handlers if h.name == "lance-console")
    record = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    return level >= console.level and all(f.filter(record) for f in console.filters)


def test_non_interactive_keeps_own_lines_and_warnings_only(clean_output, tmp_path):
    mode = logs.configure_output(logging.INFO, tmp_path / "work", interactive=False)
    assert not mode.interactive and mode.log_dir == (tmp_path / "work" / "logs").resolve()
    assert console_passes("pipelines.trainer", logging.INFO)
    assert console_passes("jobs.demo", logging.INFO)
    assert not console_passes("mlflow.store.db.utils", logging.INFO)
    assert not console_passes("ray.train.v2", logging.INFO)
    assert console_passes("ray.train.v2", logging.WARNING) and console_passes("urllib3", logging.ERROR)
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    config = yaml.safe_load(Path(os.environ["RAY_DATA_LOGGING_CONFIG"]).read_text())
    assert config["handlers"]["console"]["level"] == "WARNING"
    assert config["loggers"]["ray.data"]["handlers"] == ["file", "console"]
    skip = re.compile(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
    assert skip.search("(PlacementGroupCleaner pid=1) Failed to query Ray Train Controller actor state. State API")
    assert not skip.search("(RayTrainWorker pid=2) step 3: non-finite loss")


def test_interactive_shows_everything_and_leaves_ray_alone(clean_output):
    logs.configure_output(logging.INFO, interactive=True)
    assert console_passes("mlflow.store.db.utils", logging.INFO)
    assert not any(k in os.environ for k in KEYS)
    assert logs.ray_worker_env() == {}


def test_user_settings_win_and_reach_cluster_workers(clean_output, monkeypatch):
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "0")
    logs.configure_output(logging.WARNING, interactive=False)
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "0"
    assert logs.ray_worker_env() == {"RAY_DATA_DISABLE_PROGRESS_BARS": "0"}
    assert not console_passes("pipelines.trainer", logging.INFO)  # --log-level WARNING holds


def test_configuring_twice_keeps_one_console_handler(clean_output):
    logs.configure_output(logging.INFO, interactive=False)
    logs.configure_output(logging.DEBUG, interactive=True)
    consoles = [h for h in logging.getLogger().handlers if h.name == "lance-console"]
    assert len(consoles) == 1 and consoles[0].level == logging.DEBUG and not consoles[0].filters


def test_worker_env_skips_variables_the_job_or_caller_already_set(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = {"A": "1", "B": "2"}
    assert with_env_vars(None, env) == {"env_vars": {"A": "1", "B": "2"}}
    assert with_env_vars({"working_dir": ".", "env_vars": {"A": "mine"}}, env) == \
        {"working_dir": ".", "env_vars": {"A": "mine", "B": "2"}}
    assert with_env_vars(None, {}) is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"B": "job"}}}))
    assert with_env_vars(None, env) == {"env_vars": {"A": "1"}}

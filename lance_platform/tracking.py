"""MLflow tracking for every stage (curate, pt, ct, sft, rl, refresh): one small wrapper, used by
the driver / rank 0 only.

- Tracking URI: `MLFLOW_TRACKING_URI` when set, else `sqlite:///<workdir>/mlflow.db` with
  artifacts under `<workdir>/mlartifacts` (the embedded default: no server to start).
- With a tracking server (an http/https URI) the experiment is created without a client-side
  artifact location, so artifacts go to the server's store (`mlflow server --artifacts-destination`,
  served as `mlflow-artifacts:`), never to the client's disk.
- Experiments are tagged `mlflow.experimentKind=custom_model_development`, so MLflow 3's UI opens
  them as model training, not in its GenAI view.
- MLflow's HTTP client defaults (2 minutes of timeouts and retries per call) are shortened for every
  process that tracks (`HTTP_DEFAULTS`; values the user set win), so a dead server is detected in
  seconds. Once a server has failed, every tracker of this process skips it: one warning per process.
- Runs are created through `MlflowClient` (no global "active run" state), so a parent run and its
  child stage runs can be open at once, and a restarted stage can reopen its run by id.
- If the tracking backend fails, the failure is reported once, clearly, and the work goes on
  without tracking: losing metrics must never lose a training run.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lance_platform.config import flatten

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "lance"
PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI reads the experiment kind from this tag (values as in its bundle's ExperimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
MAX_PARAM_LEN = 6000
LOCK_RETRIES = 8
REMOTE_SCHEMES = ("http", "https")

# MLflow's defaults are a 120 s timeout and 7 retries with backoff factor 2 (about 2 minutes per
# call against a dead server). Ours: refused connections fail in about 3 s, a silent host in ~30 s.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}

# Remote tracking URIs that failed in this process: later trackers skip them without waiting again.
_failed_servers: set[str] = set()


def http_client_env() -> dict[str, str]:
    """Set `HTTP_DEFAULTS` in this process's environment where the user has not set them; returns
    the values in effect (for forwarding to Ray workers)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in HTTP_DEFAULTS}


class _TrackerRetryFilter(logging.Filter):
    """Drops urllib3's per-attempt "Retrying ..." warnings raised inside a tracker call: the one
    warning the tracker logs when the last attempt fails already names the cause."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(self.local, "depth", 0) and str(record.msg).startswith("Retrying"))

    @contextmanager
    def active(self) -> Iterator[None]:
        self.local.depth = getattr(self.local, "depth", 0) + 1
        try:
            yield
        finally:
            self.local.depth -= 1


_retry_filter = _TrackerRetryFilter()


def is_remote(tracking_uri: str) -> bool:
    """A tracking server (http/https), as opposed to a local store (sqlite, a file path, ...)."""
    return urlsplit(tracking_uri).scheme.lower() in REMOTE_SCHEMES


def default_tracking_uri(workdir: str | Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = Path(workdir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


class Tracker:
    """A handle on one MLflow run. Methods never raise once tracking has failed: they log once and no-op."""

    def __init__(self, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT,
                 artifact_root: str | Path | None = None) -> None:
        """`artifact_root` is where a local store keeps artifacts; a tracking server ignores it and
        uses its own artifact store."""
        http_client_env()
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.remote = is_remote(tracking_uri)
        if self.remote:
            pool_log = logging.getLogger("urllib3.connectionpool")
            if _retry_filter not in pool_log.filters:
                pool_log.addFilter(_retry_filter)
        self.artifact_root = Path(artifact_root).resolve() if artifact_root and not self.remote else None
        self.run_id: str | None = None
        self._client = None
        self._failed = False

    # ------------------------------------------------------------------ internals
    def _fail(self, what: str, exc: Exception) -> None:
        if not self._failed:
            log.warning("MLflow tracking at %s failed during %s (%s); the work goes on without tracking",
                        self.tracking_uri, what, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self._failed = True
        if self.remote:
            _failed_servers.add(self.tracking_uri)

    def _call(self, what: str, fn, *args, **kwargs):
        if not self._failed and self.remote and self.tracking_uri in _failed_servers:
            log.debug("MLflow tracking at %s already failed in this process; skipping %s", self.tracking_uri, what)
            self._failed = True
        if self._failed or self.run_id is None and what != "start":
            return None
        for attempt in range(LOCK_RETRIES + 1):
            try:
                with _retry_filter.active():
                    return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any backend failure: report once, keep working
                # SQLite allows one writer at a time: processes logging at once (Ray workers, Tune
                # trials) briefly see "database is locked", which is worth waiting out.
                if "locked" in str(exc).lower() and attempt < LOCK_RETRIES:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                self._fail(what, exc)
                return None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            # No artifact location for a server: it stores artifacts itself (proxied artifacts).
            location = self.artifact_root.as_uri() if self.artifact_root else None
            try:
                return self.client.create_experiment(self.experiment, artifact_location=location,
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except Exception:
                exp = self.client.get_experiment_by_name(self.experiment)  # another process created it
                if exp is None:
                    raise
        if EXPERIMENT_KIND_TAG not in exp.tags:  # an experiment created before the kind tag existed
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    # ------------------------------------------------------------------ lifecycle
    def start(self, run_name: str, parent_run_id: str | None = None, run_id: str | None = None,
              tags: dict[str, str] | None = None) -> str | None:
        """Open a new run, or reopen `run_id` (a resumed stage continues its own run)."""
        def _start():
            if run_id:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags[PARENT_TAG] = parent_run_id
            run = self.client.create_run(self._experiment_id(), run_name=run_name, tags=all_tags)
            return run.info.run_id

        self.run_id = self._call("start", _start)
        return self.run_id

    def end(self, status: str = "FINISHED") -> None:
        self._call("end", lambda: self.client.set_terminated(self.run_id, status=status))

    def end_open_children(self, status: str, tags: dict[str, str] | None = None) -> list[str]:
        """End every child run of this run that is still RUNNING (e.g. trials whose process was
        stopped from outside before it could end its own run); returns their run ids."""
        def _end():
            runs = self.client.search_runs([self._experiment_id()],
                                           filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}' "
                                                         "and attributes.status = 'RUNNING'")
            for run in runs:
                for k, v in (tags or {}).items():
                    self.client.set_tag(run.info.run_id, k, v)
                self.client.set_terminated(run.info.run_id, status=status)
            return [r.info.run_id for r in runs]

        return self._call("end_open_children", _end) or []

    # ------------------------------------------------------------------ logging
    def log_params(self, params: Any) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self._call("log_params", lambda chunk=items[i:i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        self._call("log_metrics", lambda: self.client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._call("set_tag", lambda k=k, v=v: self.client.set_tag(self.run_id, k, str(v)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        self._call("log_artifact", lambda: (self.client.log_artifacts if path.is_dir() else self.client.log_artifact)(
            self.run_id, str(path), artifact_path))

    def log_dict(self, obj: Any, name: str) -> None:
        """A JSON/YAML artifact from a Python object (e.g. the resolved config); `name` may hold a folder."""
        plain = json.loads(json.dumps(obj, default=str))  # tuples -> lists, paths -> strings
        folder = str(Path(name).parent)
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / Path(name).name
            if name.endswith((".yaml", ".yml")):
                import yaml

                target.write_text(yaml.safe_dump(plain, sort_keys=False))
            else:
                target.write_text(json.dumps(plain, indent=2))
            self.log_artifact(target, None if folder == "." else folder)

    def log_input(self, name: str, source: str, digest: str, context: str = "training",
                  schema: dict | None = None) -> None:
        """Dataset lineage: a named dataset (e.g. a shard manifest) as an input of this run."""
        def _log():
            from mlflow.entities import Dataset, DatasetInput, InputTag

            ds = Dataset(name=name, digest=digest, source_type="local", source=source,
                         schema=json.dumps(schema) if schema else None)
            self.client.log_inputs(self.run_id, [DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])

        self._call("log_input", _log)


@contextmanager
def tracked_run(workdir: str | Path, run_name: str, experiment: str = DEFAULT_EXPERIMENT,
                parent_run_id: str | None = None, run_id: str | None = None,
                tags: dict[str, str] | None = None) -> Iterator[Tracker]:
    """Open a run for the body; it ends FINISHED, or FAILED if the body raises."""
    tracker = Tracker(default_tracking_uri(workdir), experiment, Path(workdir) / "mlartifacts")
    tracker.start(run_name, parent_run_id=parent_run_id, run_id=run_id, tags=tags)
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")

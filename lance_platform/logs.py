"""Console output for every command: live progress bars on a terminal, a few lines otherwise.

Interactive (stdout is a terminal): logging at the chosen level and Ray Data's live progress bars.

Non-interactive (a log file, CI, `ray job submit` logs): the console gets this platform's own log
lines (stage start/end with their figures, step lines), warnings and errors from everyone, and what
the command prints (its final table). Ray Data's progress reports are off and its per-execution
INFO lines go only to its log file, in every Ray process: both are set through environment
variables that Ray Data reads when it is imported (`RAY_DATA_DISABLE_PROGRESS_BARS`,
`RAY_DATA_LOGGING_CONFIG`), set before Ray starts so that local workers inherit them (the progress
switch is also forwarded to a cluster's workers by `init_ray`); a known once-a-second Ray Train
warning is kept out of the console with Ray's own `RAY_DEDUP_LOGS_SKIP_REGEX`. The full logs go to files: this
process's log in `<workdir>/logs/lance-pipeline.log` and the Ray session's logs (workers, Ray
Data, Ray Train) linked as `<workdir>/logs/ray`; the folder's path is logged once when Ray starts.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

OWN_PACKAGES = ("lance_model", "lance_platform", "data_curation", "pipelines", "rl", "jobs", "__main__")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DIR = "logs"
LOG_FILE = "lance-pipeline.log"
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")
# Environment for every Ray process of a non-interactive run; values the user set win.
QUIET_RAY_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# Only meaningful where this package sits at the same path (the driver and local workers).
QUIET_LOCAL_ENV = {"RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING)}
# Read by the driver when `ray` is imported: worker lines it leaves out of the console (they stay in
# the workers' log files). Ray Train's placement-group cleaner asks the State API every second,
# which a local Ray without the dashboard does not serve: one warning a second per training stage.
QUIET_DRIVER_ENV = {"RAY_DEDUP_LOGS_SKIP_REGEX": "Failed to query Ray Train Controller actor state"}


@dataclass
class OutputMode:
    interactive: bool
    log_dir: Path | None = None
    file_handler: logging.Handler | None = None


_mode: OutputMode | None = None


class OwnOrWarning(logging.Filter):
    """Passes this platform's records and any library's warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in OWN_PACKAGES


def configure_output(level: int = logging.INFO, workdir: str | Path | None = None,
                     interactive: bool | None = None) -> OutputMode:
    """Set up logging and Ray's output for this process, once, before Ray starts.

    `interactive` defaults to whether stdout is a terminal; the full logs go to `<workdir>/logs`
    (created when Ray starts; without a work dir: the Ray session's own log folder only)."""
    global _mode
    interactive = sys.stdout.isatty() if interactive is None else interactive
    root = logging.getLogger()
    root.setLevel(min(level, logging.INFO))
    console = next((h for h in root.handlers if getattr(h, "name", None) == "lance-console"), None)
    if console is None:
        console = logging.StreamHandler(sys.stderr)
        console.name = "lance-console"
        console.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(console)
    console.setLevel(level)
    for f in [f for f in console.filters if isinstance(f, OwnOrWarning)]:
        console.removeFilter(f)
    if not interactive:
        console.addFilter(OwnOrWarning())
        for key, value in {**QUIET_RAY_ENV, **QUIET_LOCAL_ENV, **QUIET_DRIVER_ENV}.items():
            os.environ.setdefault(key, value)
        if "ray.data" in sys.modules:  # imported before this call: apply the quiet settings now
            from ray.data import DataContext
            from ray.data._internal.logging import configure_logging

            configure_logging()
            DataContext.get_current().enable_progress_bars = False
    _mode = OutputMode(interactive, Path(workdir).resolve() / LOG_DIR if workdir else None)
    return _mode


def output_mode() -> OutputMode:
    """The mode set by `configure_output`, else the default (interactive iff stdout is a terminal)."""
    return _mode if _mode is not None else configure_output()


def ray_worker_env() -> dict[str, str]:
    """Output settings a cluster's workers need (they do not inherit this process's environment)."""
    if output_mode().interactive:
        return {}
    return {key: os.environ[key] for key in QUIET_RAY_ENV if key in os.environ}


def start_log_files() -> Path | None:
    """After Ray started: the full-log folder with this process's log and a link to the Ray
    session's logs; returns the folder (None when there is none)."""
    mode = output_mode()
    session_logs = _ray_session_logs()
    if mode.log_dir is None:
        if session_logs is not None and not mode.interactive:
            log.info("full Ray and Ray Data logs: %s", session_logs)
        return session_logs
    mode.log_dir.mkdir(parents=True, exist_ok=True)
    if mode.file_handler is None:
        mode.file_handler = logging.FileHandler(mode.log_dir / LOG_FILE, encoding="utf-8")
        mode.file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        mode.file_handler.setLevel(logging.INFO)
        logging.getLogger().addHandler(mode.file_handler)
    if session_logs is not None:
        link = mode.log_dir / "ray"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(session_logs, target_is_directory=True)
    log.info("full logs: %s (%s%s)", mode.log_dir, LOG_FILE,
             "; Ray, Ray Data and Ray Train under ray/" if session_logs is not None else "")
    return mode.log_dir


def stop_log_files() -> None:
    """Close this process's log file (e.g. before its folder is removed)."""
    mode = output_mode()
    if mode.file_handler is not None:
        logging.getLogger().removeHandler(mode.file_handler)
        mode.file_handler.close()
        mode.file_handler = None


def _ray_session_logs() -> Path | None:
    """The Ray session's log folder on this machine (None for a Ray Client connection)."""
    try:
        import ray

        node = ray._private.worker._global_node  # no public API names the session folder
        return Path(node.get_session_dir_path()) / "logs" if node is not None else None
    except Exception:  # noqa: BLE001 - the link is a convenience; never fail a run over it
        return None

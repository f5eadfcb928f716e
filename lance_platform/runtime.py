"""Ray for every command: connect to a cluster (`--address` or `RAY_ADDRESS`) or start a local one.

Local Ray is sized to the machine and started without the dashboard, so the embedded default needs
no services. An unreachable address is a user error with one clear line, not a traceback.

Ray's output follows `lance_platform.logs` (quiet when stdout is not a terminal): its environment
is set before Ray starts, so local workers inherit it; a cluster's workers get the variables they
need (the Ray Data progress switch, the MLflow HTTP client defaults) through the runtime env,
except those the job's own runtime env already sets.
"""
from __future__ import annotations

import json
import logging
import os

from lance_platform import logs
from lance_platform.tracking import http_client_env

log = logging.getLogger(__name__)


class RayUnavailableError(ConnectionError):
    """The configured Ray cluster cannot be reached."""


def init_ray(address: str | None = None, num_cpus: int | None = None, runtime_env: dict | None = None) -> str:
    """Initialise Ray once per process; returns "cluster <address>" or "local"."""
    logs.output_mode()  # the output environment is in place before Ray is imported and started
    import ray

    if ray.is_initialized():
        return "existing"
    worker_env = {**http_client_env(), **logs.ray_worker_env()}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, runtime_env=with_env_vars(runtime_env, worker_env), log_to_driver=True)
        except Exception as exc:  # Ray raises several types for an unreachable head
            raise RayUnavailableError(f"cannot connect to Ray at {address}: {exc}".splitlines()[0]) from exc
        log.info("connected to Ray cluster at %s", address)
        logs.start_log_files()
        return f"cluster {address}"
    # address="local": always a new local instance, never a cluster another `ray start` left behind
    try:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
    except (TimeoutError, ConnectionError, RuntimeError) as exc:  # e.g. GCS start timed out on a loaded machine
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RayUnavailableError(f"could not start a local Ray: {first}; retry when the machine is less "
                                  "loaded, or connect to a running cluster with --address / RAY_ADDRESS") from exc
    log.info("started local Ray with %s CPUs", num_cpus or os.cpu_count())
    logs.start_log_files()
    return "local"


def with_env_vars(runtime_env: dict | None, env: dict[str, str]) -> dict | None:
    """`runtime_env` plus `env` for the workers, leaving out variables that `runtime_env` or the Ray
    job this driver runs in already sets (Ray refuses to merge the same variable twice)."""
    job_env = {}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # the driver of a `ray job submit` job
        job_config = json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])
        job_env = (job_config.get("runtime_env") or {}).get("env_vars") or {}
    merged = dict(runtime_env or {})
    env_vars = dict(merged.get("env_vars") or {})
    env_vars.update({k: v for k, v in env.items() if k not in job_env and k not in env_vars})
    if env_vars:
        merged["env_vars"] = env_vars
    return merged or None

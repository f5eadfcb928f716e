"""Ray for every command: connect to a cluster (`--address` or `RAY_ADDRESS`) or start a local one.

Local Ray is sized to the machine and started without the dashboard, so the embedded default needs
no services. An unreachable address is a user error with one clear line, not a traceback.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


class RayUnavailableError(ConnectionError):
    """The configured Ray cluster cannot be reached."""


def init_ray(address: str | None = None, num_cpus: int | None = None, runtime_env: dict | None = None) -> str:
    """Initialise Ray once per process; returns "cluster <address>" or "local"."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        except Exception as exc:  # Ray raises several types for an unreachable head
            raise RayUnavailableError(f"cannot connect to Ray at {address}: {exc}".splitlines()[0]) from exc
        log.info("connected to Ray cluster at %s", address)
        return f"cluster {address}"
    # address="local": always a new local instance, never a cluster another `ray start` left behind
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             runtime_env=runtime_env, log_to_driver=True, configure_logging=False)
    log.info("started local Ray with %s CPUs", num_cpus or os.cpu_count())
    return "local"

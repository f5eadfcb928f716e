"""`lance-pipeline submit COMMAND [args]`: run any `lance-pipeline` command as a Ray job on a cluster.

    lance-pipeline submit refresh --config configs/curation/synthetic.yaml
    lance-pipeline submit --address http://head:8265 --no-wait pipeline --config configs/pipelines/default.yaml

The command line is checked here first (an unknown command or option fails before anything is
sent), then submitted through Ray's `JobSubmissionClient` with a runtime_env: the working directory
(the repository by default, without run outputs, caches and VCS data) uploaded as the job's code,
and the environment variables the job needs (`MLFLOW_TRACKING_URI` when set, plus `--env`). The
job's entrypoint is `python -m jobs.cli COMMAND ...`, so the uploaded code is what runs. The job id
is printed, the logs are followed until the job ends, and the exit status is the job's: 0 when it
SUCCEEDED, its driver's exit code (or 1) otherwise. `--no-wait` returns right after submission.

Paths in the command are resolved on the cluster, inside the job's working directory: use absolute
paths on shared storage for data, checkpoints and MLflow (an MLflow server via MLFLOW_TRACKING_URI).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from jobs.errors import UsageError
from lance_platform.runtime import RayUnavailableError

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
# Never uploaded: run outputs, tracking stores, caches, VCS data, large binaries.
EXCLUDES = [".git", "runs/", "mlruns/", "mlartifacts/", "mlflow.db", "__pycache__/", ".pytest_cache/",
            ".ruff_cache/", "*.egg-info/", ".venv/", ".whl/", ".device/", ".benchmarks/", "*.parquet",
            "*.safetensors", "*.pt", "*.pth", "*.mp4"]
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 120.0


def dashboard_address(args: argparse.Namespace) -> str:
    """--address, else RAY_ADDRESS (the form `ray job submit` reads: http://head:8265), else local."""
    return (args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_DASHBOARD).rstrip("/")


def job_env(extra: list[str]) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def runtime_env(working_dir: str, env: dict[str, str]) -> dict:
    path = Path(working_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"--working-dir not found: {working_dir}")
    return {"working_dir": str(path.resolve()), "excludes": list(EXCLUDES), "env_vars": env}


def entrypoint(args: argparse.Namespace) -> str:
    """`python -m jobs.cli [--debug] [--log-level L] COMMAND ARGS`, validated by the local parser."""
    from jobs.cli import build_parser

    command = [args.job_command, *args.job_args]
    if args.job_command == "submit":
        raise UsageError("submit: the job must be another command (demo, curate, refresh, train, ...)")
    build_parser().parse_args(command)  # usage errors here, not on the cluster
    prefix = ["--debug"] if args.debug else []
    return shlex.join(["python", "-m", "jobs.cli", *prefix, "--log-level", args.log_level, *command])


def client_for(address: str):
    from urllib.parse import urlsplit

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from jobs.cli import ensure_listening

    hint = "pass --address http://<head>:8265 or set RAY_ADDRESS"
    parts = urlsplit(address if "://" in address else f"http://{address}")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        host, port = None, None
    if parts.scheme not in ("http", "https") or not host:
        raise RayUnavailableError(f"dashboard address {address!r}: expected http://host:port; {hint}")
    ensure_listening(host, port, "the Ray dashboard", hint)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise RayUnavailableError(f"the Ray dashboard at {address} requires a token: set RAY_AUTH_MODE=token and "
                                  "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailableError(f"cannot reach the Ray dashboard at {address} ({str(exc).splitlines()[0]}); "
                                  f"{hint}") from None


def submit_when_ready(client, timeout_s: float = AGENT_WAIT_S, **job) -> str:
    """Submit; a head that has just started answers "no available agent" for a while: retry then."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


async def follow_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def job_status(info) -> str:
    return str(getattr(info.status, "value", info.status))  # JobStatus is a str enum: its value


def exit_status(info) -> int:
    """0 for SUCCEEDED; else the driver's exit code when it has one, else 1."""
    if job_status(info) == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else 1


def wait_for_end(client, job_id: str, poll_s: float = 1.0):
    """The job's final info (tail_job_logs can end a moment before the status turns terminal)."""
    while True:
        info = client.get_job_info(job_id)
        if job_status(info) in TERMINAL:
            return info
        time.sleep(poll_s)


def cmd_submit(args: argparse.Namespace) -> int:
    command = entrypoint(args)
    env = runtime_env(args.working_dir, job_env(args.env))
    address = dashboard_address(args)
    client = client_for(address)
    job_id = submit_when_ready(client, entrypoint=command, runtime_env=env, submission_id=args.job_id,
                               metadata={"lance-pipeline": args.job_command})
    print(f"submitted Ray job {job_id} to {address}: {command}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --follow --address {address} {job_id}")
        return 0
    try:
        asyncio.run(follow_logs(client, job_id))
        info = wait_for_end(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Stop it with: ray job stop --address {address} {job_id}",
              file=sys.stderr)
        return 130
    status = job_status(info)
    message = f": {info.message}" if status != "SUCCEEDED" and info.message else ""
    print(f"Ray job {job_id} {status}{message}")
    return exit_status(info)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="run a command as a Ray job on a cluster (follows its logs)",
                       description=__doc__.split("\n\n")[0] + " Options go before COMMAND.")
    p.add_argument("--address", help="Ray dashboard address, e.g. http://head:8265 (default: RAY_ADDRESS, "
                                     f"else {DEFAULT_DASHBOARD})")
    p.add_argument("--working-dir", default=".",
                   help="directory uploaded as the job's code (default: the current directory, i.e. the "
                        "repository; runs/, .git, MLflow stores, Parquet and weight files are left out)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable); MLFLOW_TRACKING_URI is forwarded "
                        "when set")
    p.add_argument("--job-id", help="submission id to use (default: Ray generates one)")
    p.add_argument("--no-wait", action="store_true", help="return right after submission (exit 0)")
    p.add_argument("job_command", metavar="COMMAND", help="the lance-pipeline command to run, e.g. refresh")
    p.add_argument("job_args", nargs=argparse.REMAINDER, metavar="...",
                   help="the command's own options and key.sub=value overrides")
    p.set_defaults(func=cmd_submit)

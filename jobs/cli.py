"""The `lance-pipeline` command line: one entrypoint for every stage, locally or as a Ray job.

    lance-pipeline [--address HOST:PORT] [--debug] COMMAND [options] [key.sub=value ...]

Commands register themselves: each module in `COMMAND_MODULES` exposes `register(subparsers)`,
which adds its parser and sets `func`. Every command that uses Ray connects to `--address` (or
`RAY_ADDRESS`, which Ray sets inside a Ray job) and otherwise starts a local Ray sized to the
machine, so `ray job submit -- lance-pipeline COMMAND ...` runs the same code as a local call.

Exit codes: 0 on success; 2 with ONE line on stderr for user mistakes, the typed errors of
`jobs.errors.USER_ERRORS` (a bad option, config value or override, a missing file, an unreachable
Ray cluster, ...); `--debug` shows the full traceback instead. Anything else (a plain `ValueError`
included) is a bug or an infrastructure failure and keeps its traceback. Config errors come before
Ray starts. Parsing the command line (`--help`, a mistyped command) imports none of torch, Ray,
MLflow or transformers: each command imports them when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
import sys
from urllib.parse import urlsplit

from jobs.errors import is_user_error
from lance_platform.logs import configure_output
from lance_platform.runtime import RayUnavailableError

# Each command module exposes `register(subparsers)`, which adds its parser and sets `func`.
COMMAND_MODULES = ("jobs.demo", "jobs.recipe", "jobs.curate", "jobs.train", "jobs.rl", "jobs.generate", "jobs.export",
                   "jobs.submit")

# Commands that run on Ray: their cluster address is checked before any work starts.
RAY_COMMANDS = ("demo", "recipe", "curate", "refresh", "train", "pipeline", "rl", "rl-tune")
REACH_TIMEOUT_S = 5.0


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (`lance-pipeline: error: ...`), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"lance-pipeline: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> Parser:
    p = Parser(prog="lance-pipeline", description=__doc__.split("\n\n")[0],
               epilog="`lance-pipeline COMMAND --help` explains the options of each command.")
    p.add_argument("--address", dest="ray_address", metavar="HOST:PORT",
                   help="Ray cluster for every command that uses Ray (host:port of the head's GCS, or "
                        "ray://host:10001); default: RAY_ADDRESS when set, else a local Ray sized to this machine")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level (default: INFO)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def ray_address(args: argparse.Namespace) -> str | None:
    """The cluster a command connects to: its own --address, the global one, else RAY_ADDRESS."""
    return getattr(args, "address", None) or args.ray_address or os.environ.get("RAY_ADDRESS") or None


def ensure_listening(host: str, port: int, what: str, hint: str) -> None:
    """Fail in seconds when nothing listens at host:port (Ray's own clients retry for minutes)."""
    try:
        socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise RayUnavailableError(f"cannot reach {what} at {host}:{port} ({exc.strerror or exc}); {hint}") from None


def check_ray_address(address: str) -> None:
    """A Ray cluster address (host:port or ray://host:port) must answer before a command starts."""
    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if parts.scheme != "ray" or not host or not port:
        raise RayUnavailableError(f"Ray address {address!r}: expected host:port (the head's GCS port, e.g. "
                                  "127.0.0.1:6379) or ray://host:10001")
    ensure_listening(host, port, "Ray", "start a head with `ray start --head` or fix --address / RAY_ADDRESS")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; `key=value` overrides may come before and after options
    (`recipe workdir=w --stages pt pt.steps=10`): argparse alone takes only the first run of them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # quiet Ray output when stdout is not a terminal; full logs under the command's --workdir
    configure_output(getattr(logging, args.log_level), getattr(args, "workdir", None))
    if args.ray_address:
        # Every Ray-using stage (and every Ray process it starts) reads RAY_ADDRESS.
        os.environ["RAY_ADDRESS"] = args.ray_address
    try:
        if args.command in RAY_COMMANDS and ray_address(args):
            check_ray_address(ray_address(args))
        return args.func(args)
    except KeyboardInterrupt:
        print("lance-pipeline: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not is_user_error(exc):
            raise
        print(f"lance-pipeline: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

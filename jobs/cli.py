"""The `lance-pipeline` command line.

User mistakes (bad config, missing files) end with one line on stderr and exit code 2; `--debug`
shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lance_model.config import ConfigError

USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)


# Each command module exposes `register(subparsers)`, which adds its parser and sets `func`.
COMMAND_MODULES = ("jobs.demo", "jobs.generate", "jobs.curate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lance-pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"lance-pipeline: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

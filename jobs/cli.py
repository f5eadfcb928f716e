"""The `lance-pipeline` command line.

User mistakes (bad config, missing files) end with one line on stderr and exit code 2; `--debug`
shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import sys

from lance_model.config import ConfigError

USER_ERRORS = (ConfigError, FileNotFoundError, ValueError)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    r = run_demo(workdir=args.workdir, preset=args.preset, steps=args.steps, images=args.images, seed=args.seed)
    print(f"\n{'stage':<8} {'steps':>6} {'first loss':>11} {'final loss':>11}  checkpoint")
    print(f"{'train':<8} {r.steps:>6} {r.first_loss:>11.4f} {r.final_loss:>11.4f}  {r.checkpoint}")
    print(f"done in {r.seconds:.1f} s; the checkpoint loads with Lance.from_pretrained('{r.checkpoint}')")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lance-pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the end-to-end demo at toy scale (CPU, offline)",
                          description="Synthetic corpus -> encoders -> training -> checkpoint, on embedded defaults.")
    demo.add_argument("--workdir", default="runs/demo", help="where checkpoints and logs go (default: runs/demo)")
    demo.add_argument("--preset", default="tiny", choices=["tiny", "nano"], help="model preset (default: tiny)")
    demo.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    demo.add_argument("--images", type=int, default=8, help="synthetic images to render (default: 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=cmd_demo)
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

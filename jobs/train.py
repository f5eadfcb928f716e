"""`lance-pipeline train` (one stage) and `lance-pipeline pipeline` (PT -> CT -> SFT) on Ray Train.

Both validate their configs before Ray starts; `key.sub=value` overrides follow the config file.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from jobs.errors import UsageError
from pipelines.config import load_stage_config

if TYPE_CHECKING:
    from pipelines.trainer import StageResult


def print_results(results: list[StageResult]) -> None:
    print(f"\n{'stage':<6} {'steps':>6} {'final loss':>11}  checkpoint")
    for r in results:
        loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "-"
        print(f"{r.name:<6} {r.steps:>6} {loss:>11}  {r.checkpoint}")


def cmd_train(args: argparse.Namespace) -> int:
    config = args.config or f"configs/stages/{args.stage}.yaml"
    # data.shards is checked by run_stage, whose error says how to make shards
    stage = load_stage_config(config, [f"name={args.stage}", *args.overrides], require_shards=False)
    if stage.init.kind == "previous" and not args.init:
        raise UsageError(f"stage {args.stage} starts from the previous stage: pass --init <checkpoint dir> "
                         "(e.g. runs/pipeline/pt/final) or override init.kind")
    if args.init and not Path(args.init).is_dir():
        raise FileNotFoundError(f"--init checkpoint directory not found: {args.init}")
    from pipelines.trainer import run_stage

    print_results([run_stage(stage, args.workdir, init_path=args.init, address=args.address)])
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from pipelines.trainer import run_pipeline

    print_results(run_pipeline(args.config, args.overrides, address=args.address))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run one training stage (pt, ct or sft) on Ray Train",
                       description="Run one stage of the Lance recipe on Ray Train, tracked in MLflow.")
    p.add_argument("--stage", required=True, choices=["pt", "ct", "sft"], help="which stage")
    p.add_argument("--config", help="stage YAML (default: configs/stages/<stage>.yaml)")
    p.add_argument("--init", help="checkpoint directory the stage starts from (for init.kind=previous)")
    p.add_argument("--workdir", default="runs/train", help="checkpoints, Ray results, MLflow (default: runs/train)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pipeline", help="run PT -> CT -> SFT, each stage from the previous checkpoint",
                       description="Run the staged recipe under one parent MLflow run.")
    p.add_argument("--config", default="configs/pipelines/default.yaml", help="pipeline YAML")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=cmd_pipeline)

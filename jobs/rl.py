"""`lance-pipeline rl` and `lance-pipeline rl-tune`: Flow-GRPO with OCR reward actors, and reward-tuning
sweeps with Ray Tune (RL.md).

    lance-pipeline rl --config configs/rl/grpo_ocr.yaml steps=100 policy.checkpoint=runs/demo/final
    lance-pipeline rl-tune --config configs/rl/tune_ocr.yaml num_samples=8

Configs are validated (and prompts checked for a quoted target) before Ray or a model starts.
"""
from __future__ import annotations

import argparse

from lance_platform.config import load_config


def cmd_rl(args: argparse.Namespace) -> int:
    from rl.config import RLConfig
    from rl.trainer import train_grpo

    cfg = load_config(RLConfig, args.config, args.overrides)
    if args.address:
        cfg.ray_address = args.address
    result = train_grpo(cfg)
    m = result.metrics
    print(f"GRPO: {result.steps} steps, reward_mean={m.get('reward_mean', float('nan')):.4f}, "
          f"held-out OCR accuracy={m.get('eval/ocr_accuracy', float('nan')):.4f}")
    print(f"checkpoint: {result.checkpoint} (Lance.from_pretrained); MLflow run {result.run_id}")
    return 0


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def cmd_rl_tune(args: argparse.Namespace) -> int:
    from rl.tune import load_tune_config, run_sweep

    cfg, base = load_tune_config(args.config, args.overrides)
    if args.address:
        cfg.ray_address = args.address
    summaries = run_sweep(cfg, base)
    print(f"{'trial':<12} {'iters':>5} {'reward_mean':>12} {'ocr_acc':>8}  params")
    for s in summaries:
        print(f"{s.trial_id:<12} {s.iterations:>5} {_fmt(s.reward_mean):>12} {_fmt(s.ocr_accuracy):>8}  {s.params}")
    return 0 if all(s.status != "ERROR" for s in summaries) else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rl", help="Flow-GRPO with OCR reward actors on Ray",
                       description="Run (or resume) a GRPO run from a YAML config.")
    p.add_argument("--config", default="configs/rl/grpo_ocr.yaml", help="GRPO config YAML")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=cmd_rl)
    t = sub.add_parser("rl-tune", help="Ray Tune sweep of GRPO reward/algorithm settings (ASHA)",
                       description="Reward-tuning sweep: each trial a GRPO run and an MLflow child run.")
    t.add_argument("--config", default="configs/rl/tune_ocr.yaml", help="sweep config YAML")
    t.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides of the sweep config")
    t.set_defaults(func=cmd_rl_tune)

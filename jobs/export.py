"""`lance-pipeline export`: a sharded training checkpoint as one full checkpoint, on the CPU.

    lance-pipeline export --checkpoint runs/train/pt/checkpoints/step-000100 --out exported/pt-100
    lance-pipeline export --checkpoint runs/train/pt/checkpoints --out exported/pt --layout official

A stage writes sharded checkpoints while it trains (`<workdir>/<stage>/checkpoints/step-<N>`, every
rank its own files) and exports the last one to `<stage>/final` at its end; this command exports
any of them on demand. `--checkpoint` is one checkpoint directory or a directory of them (the
newest complete one is taken, damaged ones skipped with their reason). Layouts: `lance` (default:
`model.safetensors` + `ema.safetensors` in the official key layout, configs, the name-keyed
optimizer state, `trainer_state.json` and a manifest: a later stage or GRPO starts from it) or
`official` (weights and configs only). Tensors are streamed one at a time; no GPU, no Ray.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from jobs.errors import UsageError

LAYOUTS = ("lance", "official")  # lance_platform.sharded_checkpoint.EXPORT_LAYOUTS (no torch import here)


def source_checkpoint(path: Path) -> Path:
    """The checkpoint `--checkpoint` names: the directory itself, or the newest complete one in it."""
    from lance_platform import checkpoint as ckpt
    from lance_platform import sharded_checkpoint

    if not path.exists():
        raise FileNotFoundError(f"--checkpoint: no such directory: {path}")
    if not path.is_dir():
        raise UsageError(f"--checkpoint {path} is a file; give a checkpoint directory (step-<N>) or the "
                         "stage's checkpoints directory")
    if (path / ckpt.MANIFEST).is_file():
        return path
    if not any(path.glob("step-*")):
        raise UsageError(f"--checkpoint {path}: neither a checkpoint (no manifest.json) nor a directory of "
                         "step-<N> checkpoints")
    chosen, skipped = sharded_checkpoint.latest_valid(path, "step-*")
    if chosen is None:
        reasons = "; ".join(f"{s.path.name}: {s.reason}" for s in skipped)
        raise ckpt.InvalidCheckpointError(path, f"no complete checkpoint in it ({reasons})")
    for s in skipped:
        print(f"skipped {s.path.name}: {s.reason}")
    return chosen


def cmd_export(args: argparse.Namespace) -> int:
    from lance_platform.sharded_checkpoint import export

    source = source_checkpoint(Path(args.checkpoint))
    out = Path(args.out)
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise UsageError(f"--out {out} is inside the checkpoint it exports; choose another directory")
    written = export(source, out, layout=args.layout)
    print(f"exported {source} -> {written} ({args.layout} layout)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a sharded training checkpoint to the full/official layout (CPU)",
                       description="Stream a sharded training checkpoint, tensor by tensor, into one full "
                                   "checkpoint directory.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory (step-<N>) or a directory of them (the newest complete one)")
    p.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    p.add_argument("--layout", default="lance", choices=LAYOUTS,
                   help="lance: weights + optimizer + trainer state + manifest (default); official: weights "
                        "and configs only")
    p.set_defaults(func=cmd_export)

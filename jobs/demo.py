"""`lance-pipeline demo`: the platform's real pipeline at toy scale, on embedded defaults, offline.

    synthetic corpus -> curate (Ray Data) -> PT -> CT -> SFT (Ray Train) -> GRPO (Ray actors) -> summary

Every stage is the production code path (`data_curation.pipeline.run_curation`,
`pipelines.trainer.run_stage`, `rl.trainer.train_grpo`) driven by the small configs in
`configs/demo/` (tiny preset, a few steps each); nothing here is a separate toy implementation.
Ray is the local one sized to the machine (or RAY_ADDRESS / --address); MLflow tracks into
`sqlite:///<workdir>/mlflow.db` (or MLFLOW_TRACKING_URI) as ONE parent run `demo` with a child run
per stage (curate, pt, ct, sft, rl). The run ends with a table of what each stage produced, a line
of GRPO counters as they are (iterations, optimizer steps taken, groups skipped for equal rewards,
the reward before and after) and the `mlflow ui` command to browse it.

Overrides address one stage's config: `pt.steps=10`, `rl.rollout.group_size=4`,
`curate.encode.vae_actors=2`. All five configs are validated before the work directory is touched.
A work directory that holds a previous demo is replaced; any other non-empty directory is refused.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from data_curation.config import CurationConfig
from jobs.errors import UsageError
from lance_platform.config import ConfigError, load_config
from pipelines.config import StageConfig, load_stage_config
from rl.config import RLConfig

if TYPE_CHECKING:
    from lance_platform.tracking import Tracker

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "demo"
TRAIN_STAGES = ("pt", "ct", "sft")
STAGES = ("curate", *TRAIN_STAGES, "rl")
MARKER = ".lance-demo"


@dataclass
class DemoConfigs:
    curate: CurationConfig
    stages: list[StageConfig]
    rl: RLConfig


@dataclass
class StageSummary:
    stage: str
    rows: int                   # rows curated, or optimisation steps
    amount: str                 # the same, with its unit
    metric: str | None          # "loss" / "reward" (None for curation)
    value: float | None         # its final value
    output: str                 # shards or checkpoint directory
    run_id: str | None
    start_value: float | None = None  # the metric before the stage trained (GRPO: held-out reward)
    counters: dict[str, float] = field(default_factory=dict)  # GRPO: optimizer steps, groups skipped, ...

    @property
    def result(self) -> str:
        if self.metric is None or self.value is None:
            return "-"
        if self.start_value is not None:
            return f"{self.metric} {self.start_value:.4f} -> {self.value:.4f}"
        return f"{self.metric} {self.value:.4f}"


@dataclass
class DemoResult:
    parent_run_id: str | None
    tracking_uri: str
    stages: list[StageSummary]
    checkpoint: Path  # the final (GRPO) policy, loadable with Lance.from_pretrained
    seconds: float


# ------------------------------------------------------------------------------------------ configs
def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """`pt.steps=10` -> {"pt": ["steps=10"]}; every override must name a stage."""
    out: dict[str, list[str]] = {s: [] for s in STAGES}
    for item in overrides:
        stage, dot, rest = item.partition(".")
        if not dot or stage not in out or "=" not in rest:
            raise ConfigError(f"override {item!r}: expected <stage>.key=value with <stage> one of {list(STAGES)}")
        out[stage].append(rest)
    return out


def load_demo_configs(workdir: Path, config_dir: Path, overrides: list[str], experiment: str) -> DemoConfigs:
    """The five stage configs with the demo's paths filled in, each validated (no Ray, no I/O yet)."""
    by_stage = split_overrides(overrides)

    def path(name: str) -> Path:
        file = config_dir / f"{name}.yaml"
        if not file.is_file():
            raise FileNotFoundError(f"demo config not found: {file}")
        return file

    # Errors name the field as the user wrote it: `pt.optim.lr`, `curate.encode.vae_actors`.
    curate = load_config(CurationConfig, path("curation"), [
        f"output.dir={workdir / 'curated'}", f"tracking.workdir={workdir}", f"tracking.experiment={experiment}",
        *by_stage["curate"]], prefix="curate.")
    stages = [load_stage_config(path(name), [f"name={name}", *by_stage[name]], require_shards=False,
                                prefix=f"{name}.")
              for name in TRAIN_STAGES]
    rl = load_config(RLConfig, path("rl"), [f"workdir={workdir / 'rl'}", f"experiment={experiment}",
                                             *by_stage["rl"]], prefix="rl.")
    return DemoConfigs(curate, stages, rl)


def prepare_workdir(workdir: Path) -> None:
    """Replace a previous demo; refuse to delete anything else."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise UsageError(f"--workdir {workdir} is not empty and holds no previous demo; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("written by `lance-pipeline demo`; the next demo run replaces this directory\n")


@contextmanager
def tracking_store(uri: str) -> Iterator[None]:
    """Point every stage at one MLflow store for the demo (GRPO would default to its own work dir)."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


# ------------------------------------------------------------------------------------------ the run
def run_stages(cfg: DemoConfigs, workdir: Path, parent: Tracker, experiment: str) -> tuple[list[StageSummary], Path]:
    """curate -> PT -> CT -> SFT -> GRPO, each a child run of `parent`; returns the summaries and the
    final policy checkpoint."""
    from data_curation.pipeline import run_curation
    from pipelines.trainer import run_stage
    from rl.trainer import train_grpo

    curated = run_curation(cfg.curate, "curate", parent_run_id=parent.run_id)
    shards = Path(cfg.curate.output.dir)
    rows = int(curated.counts.get("curated", 0))
    summaries = [StageSummary("curate", rows, f"{rows} rows", None, None, str(shards), curated.mlflow_run_id)]
    previous: Path | None = None
    for stage in cfg.stages:
        stage.data.shards = str(shards)
        result = run_stage(stage.validate(), workdir, parent_run_id=parent.run_id,
                           init_path=str(previous) if stage.init.kind == "previous" else None, experiment=experiment)
        previous = result.checkpoint
        summaries.append(StageSummary(stage.name, result.steps, f"{result.steps} steps", "loss", result.final_loss,
                                      str(result.checkpoint), result.run_id))
    cfg.rl.policy.checkpoint = str(previous)
    rl = train_grpo(cfg.rl, parent_run_id=parent.run_id)
    summaries.append(grpo_summary(rl))
    return summaries, rl.checkpoint


def grpo_summary(rl) -> StageSummary:
    """The GRPO row: iterations run, the held-out reward (the configured weighted reward on the
    deterministic samples of the held-out prompts) before and after, and the counters summed over
    the iterations as they happened: optimizer steps taken, groups trained and skipped (all rewards
    of a group equal: zero advantages, nothing learned from it), training reward of the first and
    last iteration."""
    history = rl.history
    total = {k: float(sum(h.get(k, 0.0) for h in history))
             for k in ("optimizer_steps", "groups", "groups_trained", "groups_skipped", "trained_transitions")}
    counters = {"iterations": float(len(history)), **total,
                "reward_first_iteration": history[0]["reward_mean"] if history else float("nan"),
                "reward_last_iteration": history[-1]["reward_mean"] if history else float("nan"),
                "reward_group_std_mean": float(sum(h.get("reward_group_std_mean", 0.0) for h in history)
                                               / max(len(history), 1))}
    for key in ("eval/reward", "eval/ocr_ctc", "eval/ocr_accuracy"):
        if key in rl.initial:
            counters[f"start_{key}"] = rl.initial[key]
        if key in rl.metrics:
            counters[f"end_{key}"] = rl.metrics[key]
    held_out = "eval/reward" in rl.metrics
    value = rl.metrics.get("eval/reward") if held_out else rl.metrics.get("reward_mean")
    start = rl.initial.get("eval/reward") if held_out else None
    return StageSummary("rl", rl.steps, f"{rl.steps} iters", "reward", value, str(rl.checkpoint), rl.run_id,
                        start, counters)


def grpo_line(s: StageSummary) -> str:
    """One line of what GRPO did, from the counters (no rounding of counts)."""
    c = s.counters
    text = (f"GRPO: {int(c['iterations'])} iterations, {int(c['optimizer_steps'])} optimizer steps, "
            f"{int(c['groups_skipped'])} of {int(c['groups'])} groups skipped (equal rewards); "
            f"training reward {c['reward_first_iteration']:.4f} (first iteration) -> "
            f"{c['reward_last_iteration']:.4f} (last)")
    if "start_eval/reward" in c and "end_eval/reward" in c:
        text += f"; held-out reward {c['start_eval/reward']:.4f} -> {c['end_eval/reward']:.4f}"
    if "start_eval/ocr_accuracy" in c and "end_eval/ocr_accuracy" in c:
        text += f", OCR accuracy {c['start_eval/ocr_accuracy']:.4f} -> {c['end_eval/ocr_accuracy']:.4f}"
    return text


def run_demo(workdir: str | Path = "runs/demo", config_dir: str | Path = CONFIG_DIR,
             overrides: list[str] | None = None, experiment: str = "lance") -> DemoResult:
    from lance_platform.runtime import init_ray
    from lance_platform.tracking import Tracker, default_tracking_uri

    start = time.time()
    workdir = Path(workdir).resolve()
    cfg = load_demo_configs(workdir, Path(config_dir), list(overrides or []), experiment)
    prepare_workdir(workdir)
    uri = default_tracking_uri(workdir)
    with tracking_store(uri):
        # RAY_ADDRESS (set by --address or inside a Ray job), else a local Ray sized to the machine.
        ray_mode = init_ray()
        try:
            parent = Tracker(uri, experiment, workdir / "mlartifacts")
            parent.start("demo", tags={"pipeline": "demo"})
            parent.log_dict({"curate": cfg.curate, "stages": cfg.stages, "rl": cfg.rl}, "config/demo.yaml")
            try:
                summaries, checkpoint = run_stages(cfg, workdir, parent, experiment)
            except BaseException:
                parent.end("FAILED")
                raise
            seconds = time.time() - start
            table = [{**s.__dict__, "result": s.result} for s in summaries]
            parent.log_metrics({"demo_seconds": seconds, "curate/rows": summaries[0].rows,
                                **{f"{s.stage}/final_{s.metric}": s.value for s in summaries if s.metric},
                                **{f"{s.stage}/start_{s.metric}": s.start_value for s in summaries
                                   if s.start_value is not None},
                                **{f"{s.stage}/{k.replace('eval/', 'eval_')}": v for s in summaries
                                   for k, v in s.counters.items()}})
            parent.log_dict(table, "summary.json")
            parent.set_tags({"checkpoint": str(checkpoint)})
            parent.end("FINISHED")
        finally:
            if ray_mode != "existing":
                import ray

                ray.shutdown()  # also stops the workers' log stream, so the summary prints last
    (workdir / "summary.json").write_text(json.dumps(table, indent=2))
    return DemoResult(parent.run_id, uri, summaries, checkpoint, seconds)


def print_summary(r: DemoResult, workdir: Path) -> None:
    print(f"\n{'stage':<7} {'rows/steps':>11}  {'final loss/reward':<24} output")
    for s in r.stages:
        print(f"{s.stage:<7} {s.amount:>11}  {s.result:<24} {s.output}")
    for s in r.stages:
        if s.stage == "rl" and s.counters:
            print(grpo_line(s))
    embedded = r.tracking_uri == f"sqlite:///{workdir / 'mlflow.db'}"
    print(f"\nMLflow {r.tracking_uri}: parent run 'demo' ({r.parent_run_id}) with child runs "
          f"{', '.join(s.stage for s in r.stages)}; artifacts (configs, reports, sample grids) "
          f"{'under ' + str(workdir / 'mlartifacts') if embedded else 'in the tracking server'}")
    print(f"final policy: Lance.from_pretrained('{r.checkpoint}'); try "
          f"`lance-pipeline generate --checkpoint {r.checkpoint} --task t2i --prompt 'a sign that says \"OPEN\"' "
          f"--height 32 --width 32 --steps 8 --out {workdir / 'samples'}`")
    print(f"done in {r.seconds:.0f} s. Browse the runs with:\n  mlflow ui --backend-store-uri {r.tracking_uri}")


def cmd_demo(args: argparse.Namespace) -> int:
    result = run_demo(args.workdir, args.config_dir, args.overrides, args.experiment)
    print_summary(result, Path(args.workdir).resolve())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the whole pipeline at toy scale: curate -> PT -> CT -> SFT -> GRPO (CPU, offline)",
        description="The real pipeline at toy scale on embedded defaults: synthetic corpus -> curate (Ray Data) "
                    "-> PT -> CT -> SFT (Ray Train) -> GRPO (OCR reward actors), one parent MLflow run with a "
                    "child run per stage, then a summary table and the `mlflow ui` command.")
    p.add_argument("--workdir", default="runs/demo",
                   help="shards, checkpoints, MLflow store and artifacts (default: runs/demo; a previous demo "
                        "there is replaced)")
    p.add_argument("--config-dir", default=str(CONFIG_DIR),
                   help="directory with curation.yaml, pt.yaml, ct.yaml, sft.yaml, rl.yaml "
                        "(default: the repository's configs/demo)")
    p.add_argument("--experiment", default="lance", help="MLflow experiment (default: lance)")
    p.add_argument("overrides", nargs="*", metavar="stage.key=value",
                   help="override one stage's config, stage in curate/pt/ct/sft/rl: pt.steps=10 "
                        "rl.rollout.group_size=4 curate.encode.vae_actors=2")
    p.set_defaults(func=cmd_demo)

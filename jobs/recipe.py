"""`lance-pipeline recipe`: a training recipe as one resumable command (curate -> PT -> SFT -> GRPO),
with a held-out evaluation after every stage.

    lance-pipeline recipe --config configs/recipes/text_rendering/recipe.yaml [--stages curate,pt] [key=value ...]

The recipe file (`RecipeConfig`) names one config per stage; each stage is the production code path
(`data_curation.pipeline.run_curation`, `pipelines.trainer.run_stage`, `rl.trainer.train_grpo`), as
in `jobs/demo.py`, under one work directory:

    <workdir>/curated        the training corpus (the `train` split of the synthetic vocabulary),
                             with heldout_words.json: the held-out words and how they were made
    <workdir>/heldout        the held-out corpus: every held-out word once as t2i and once as i2t,
                             curated by the same pipeline and encoders (its i2t rows carry the ViT
                             tokens the model reads, made exactly as in training)
    <workdir>/pt, sft        the training stages (final checkpoint in <stage>/final)
    <workdir>/rl             GRPO (checkpoints, samples); prompts: train_prompts.txt / heldout_prompts.txt
    <workdir>/stages/<s>.json   written when a stage has finished: its wall time and output; a stage
                             that has it is skipped, so the recipe runs as several shorter commands
    <workdir>/eval/<s>.json  the held-out evaluation after stage <s>
    <workdir>/recipe_results.json / .md   accuracy after each stage and wall time per stage
    <workdir>/samples_<s>.png, grpo_before_after.png   t2i samples of the held-out words

The evaluation after each training stage loads the stage's final checkpoint and, on the first
`evaluation.words` held-out words: t2i OCR accuracy (the `ocr` reward, 1 - normalised edit distance,
and `ocr_exact`, of images from the deterministic ODE sampler with CFG, seed i for word i; also
`t2i_ocr_legible`, the share read as as many letters as the word has, right or wrong), scored
by the OCR reward actors; i2t exact match of greedy answers to the rendered held-out words. A stage
cut short inside its run resumes from its own checkpoints where the stage supports it (GRPO's
`resume: true`, Ray Train's per-stage storage); the finished-stage markers make the recipe skip
what is done.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from dataclasses import field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from data_curation.config import CurationConfig, SyntheticSpec
from jobs.errors import UsageError
from lance_model.configio import PositiveInt, configclass, from_dict
from lance_platform.config import ConfigError, apply_overrides, load_config, to_dict
from lance_platform.files import write_json_atomic, write_text_atomic
from pipelines.config import StageConfig, load_stage_config
from rl.config import RLConfig

log = logging.getLogger(__name__)

STAGES = ("curate", "pt", "sft", "rl")
TRAIN_STAGES = ("pt", "sft")
StageName = Literal[STAGES]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu or cuda[:N]")]
HELDOUT_FILE = "heldout_words.json"
RESULTS = "recipe_results"


@configclass
class RecipeEvaluation:
    """The held-out evaluation run after every training stage."""

    words: PositiveInt = 200          # first N held-out words (all of them when fewer)
    steps: PositiveInt = 30           # deterministic ODE sampler steps
    cfg_scale: float = 4.5            # text CFG of that sampler
    # t2i OCR accuracy also at these CFG scales (`t2i_ocr_accuracy_by_cfg` in eval/<stage>.json):
    # which guidance the model renders best with
    extra_cfg_scales: tuple[float, ...] = ()
    max_new_tokens: PositiveInt = 16  # i2t answer length limit
    batch_size: PositiveInt = 64
    grid: PositiveInt = 16            # samples in each grid PNG
    device: Device = "auto"


@configclass
class RecipeConfig:
    name: str = "recipe"
    workdir: str = "runs/recipe"
    experiment: str = "lance"
    tracking: bool = True
    # stage config files, relative to the recipe file
    curation: str = "curation.yaml"
    pt: str = "pt.yaml"
    sft: str = "sft.yaml"
    rl: str = "rl.yaml"
    evaluation: RecipeEvaluation = field(default_factory=RecipeEvaluation)


@dataclasses.dataclass
class RecipeConfigs:
    recipe: RecipeConfig
    curate: CurationConfig
    heldout: CurationConfig  # the same corpus, held-out split, every held-out word once per task
    stages: list[StageConfig]
    rl: RLConfig
    workdir: Path


# ------------------------------------------------------------------------------------------ configs
def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(recipe overrides, {stage: overrides}): `pt.steps=10` -> pt's `steps=10`; `workdir=x` -> the recipe's."""
    own: list[str] = []
    by_stage: dict[str, list[str]] = {s: [] for s in STAGES}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value or <stage>.key=value, stage in {list(STAGES)}")
        stage, dot, rest = item.partition(".")
        if dot and stage in by_stage:
            by_stage[stage].append(rest)
        else:
            own.append(item)
    return own, by_stage


def _synthetic_overrides(curate: CurationConfig, overrides: list[str]) -> None:
    """Apply `synthetic.<key>=value` overrides to every synthetic source (sources are a list, which
    dotted overrides cannot index)."""
    if not overrides:
        return
    if not any(s.kind == "synthetic" for s in curate.sources):
        raise ConfigError(f"curate.{overrides[0]}: the curation config has no synthetic source")
    for source in curate.sources:
        if source.kind == "synthetic":
            data = apply_overrides(to_dict(source.synthetic), overrides, "curate.synthetic.")
            source.synthetic = from_dict(SyntheticSpec, data, "curate.synthetic.")


def letters_only(source) -> bool:
    """A synthetic source that draws no whole words, only short letter strings or words' prefixes
    (`letters_fraction` or `prefix_fraction` 1): a curriculum's easy part, so no held-out words and no
    GRPO prompts of its own."""
    if source.kind != "synthetic":
        return False
    return source.synthetic.letters_fraction >= 1.0 or source.synthetic.prefix_fraction >= 1.0


def word_sources(curate: CurationConfig) -> list:
    return [s for s in curate.sources if not letters_only(s)]


def heldout_curation(curate: CurationConfig, workdir: Path) -> CurationConfig:
    """The held-out corpus: the training corpus's synthetic word sources switched to their held-out
    split, one t2i and one i2t item per held-out word, no tracking of its own (curated once, like the
    corpus)."""
    sources = []
    for source in curate.sources:
        spec = source.synthetic
        if source.kind != "synthetic" or not spec.vocabulary or not spec.heldout:
            raise ConfigError(f"curate.sources: the recipe needs synthetic sources with a generated vocabulary and "
                              f"held-out words (synthetic.vocabulary and synthetic.heldout > 0); {source.name!r} "
                              f"is kind={source.kind!r}, vocabulary={spec.vocabulary}, heldout={spec.heldout}")
        if letters_only(source):
            continue
        held = dataclasses.replace(spec, split="heldout", images=spec.heldout, qa=spec.heldout, videos=0, edits=0)
        sources.append(dataclasses.replace(source, synthetic=held))
    if not sources:
        raise ConfigError("curate.sources: every synthetic source draws only letters or prefixes "
                          "(letters_fraction or prefix_fraction 1); the recipe needs one that draws words, for its "
                          "held-out words")
    check_heldout_unseen(curate)
    return dataclasses.replace(curate, sources=tuple(sources),
                               output=dataclasses.replace(curate.output, dir=str(workdir / "heldout")),
                               tracking=dataclasses.replace(curate.tracking, enabled=False)).validate()


def check_heldout_unseen(curate: CurationConfig) -> None:
    """No training source draws a held-out word or part of one: a source that draws words or
    prefixes from a vocabulary of its own (another `vocabulary_seed`, size or hold-out) could."""
    from data_curation.synthetic import split_words

    held = set(heldout_words(curate))
    for i, source in enumerate(curate.sources):
        spec = source.synthetic
        if source.kind != "synthetic" or spec.letters_fraction >= 1.0:
            continue  # letters only: no words
        leaked = sorted(held & set(split_words(spec)))
        if leaked:
            raise ConfigError(f"curate.sources.{i} ({source.name!r}) trains on {len(leaked)} held-out word(s) of the "
                              f"recipe (e.g. {leaked[:3]}): give it the word sources' vocabulary (the same vocabulary, "
                              "heldout and vocabulary_seed)", f"curate.sources.{i}")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeConfigs:
    """The recipe and its four stage configs with the work directory's paths filled in, all validated
    (no Ray, no I/O)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe config not found: {path}")
    own, by_stage = split_overrides(list(overrides or []))
    recipe = load_config(RecipeConfig, path, own)
    workdir = Path(recipe.workdir).resolve()

    def stage_file(name: str, value: str) -> Path:
        file = (path.parent / value).resolve()
        if not file.is_file():
            raise ConfigError(f"{name}={value!r}: no such stage config next to {path}", name)
        return file

    synthetic = [o for o in by_stage["curate"] if o.startswith("synthetic.")]
    plain = [o for o in by_stage["curate"] if not o.startswith("synthetic.")]
    curate = load_config(CurationConfig, stage_file("curation", recipe.curation), [
        f"output.dir={workdir / 'curated'}", f"tracking.workdir={workdir}", f"tracking.experiment={recipe.experiment}",
        f"tracking.enabled={str(recipe.tracking).lower()}", *plain], prefix="curate.")
    _synthetic_overrides(curate, [o[len("synthetic."):] for o in synthetic])
    curate.validate()
    heldout = heldout_curation(curate, workdir)
    stages = [load_stage_config(stage_file(name, getattr(recipe, name)), [f"name={name}", *by_stage[name]],
                                require_shards=False, prefix=f"{name}.")
              for name in TRAIN_STAGES]
    for stage in stages:
        stage.data.shards = str(workdir / "curated")
    rl = load_config(RLConfig, stage_file("rl", recipe.rl), [
        f"workdir={workdir / 'rl'}", f"experiment={recipe.experiment}", f"tracking={str(recipe.tracking).lower()}",
        f"policy.checkpoint={workdir / 'sft' / 'final'}", f"prompts.file={workdir / 'rl' / 'train_prompts.txt'}",
        f"prompts.eval_file={workdir / 'rl' / 'heldout_prompts.txt'}", *by_stage["rl"]], prefix="rl.")
    return RecipeConfigs(recipe, curate, heldout, stages, rl, workdir)


def parse_stages(text: str | None) -> tuple[str, ...]:
    if not text:
        return STAGES
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise UsageError(f"--stages {text!r}: expected a comma-separated list of {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)  # always in recipe order


# ------------------------------------------------------------------------------------------ files
def marker(workdir: Path, stage: str) -> Path:
    return workdir / "stages" / f"{stage}.json"


def finished(workdir: Path, stage: str) -> dict | None:
    """The finished-stage record, or None when the stage has not finished (or its output is gone)."""
    file = marker(workdir, stage)
    if not file.is_file():
        return None
    record = json.loads(file.read_text())
    return record if Path(record["output"]).exists() else None


def heldout_words(curate: CurationConfig) -> list[str]:
    from data_curation.synthetic import split_words

    words: list[str] = []
    for source in word_sources(curate):
        words += [w for w in split_words(dataclasses.replace(source.synthetic, split="heldout")) if w not in words]
    return words


PROMPT_SEED_KIND = 5  # seeds of GRPO's training prompts: beyond the corpus's kinds (0-3), so none repeats an item


def heldout_prompts(cfg: RecipeConfigs) -> list[tuple[str, str]]:
    """(word, caption) of every held-out word, in word order: the captions of the held-out corpus's t2i
    rows (with `captions: styled` each names the style that row is drawn in)."""
    from data_curation.synthetic import t2i_prompts

    out: dict[str, str] = {}
    for source in cfg.heldout.sources:
        for word, caption in t2i_prompts(source.synthetic):
            out.setdefault(word, caption)
    return list(out.items())


def write_prompts(cfg: RecipeConfigs) -> None:
    """GRPO's prompt files: every training word and every held-out word once, captioned as the corpus
    is (a styled caption draws the word's style from a seed of its own)."""
    from data_curation.synthetic import split_words, t2i_caption

    train: list[str] = []
    for source in word_sources(cfg.curate):
        spec = source.synthetic
        as_dict = dataclasses.asdict(spec)
        train += [t2i_caption(as_dict, w, spec.seed * 100003 + PROMPT_SEED_KIND * 1009 + i)
                  for i, w in enumerate(split_words(spec))]
    write_text_atomic(Path(cfg.rl.prompts.file), "".join(p + "\n" for p in train))
    write_text_atomic(Path(cfg.rl.prompts.eval_file), "".join(c + "\n" for _, c in heldout_prompts(cfg)))


# ------------------------------------------------------------------------------------------ evaluation
def heldout_rows(directory: Path, task: str) -> list[dict]:
    """Rows of one task from the held-out corpus, in word order (the curation orders by sample id)."""
    import pyarrow.parquet as pq

    from pipelines.trainer import shard_files

    rows = [r for f in shard_files(directory) for r in pq.read_table(f).to_pylist() if r["task"] == task]
    key = "answer" if task == "i2t" else "caption"
    return sorted(rows, key=lambda r: r[key])


def evaluate_checkpoint(checkpoint: Path, cfg: RecipeConfigs, pool) -> tuple[dict, list]:
    """Held-out t2i OCR accuracy and i2t exact match of a checkpoint -> (metrics, t2i images)."""
    import numpy as np
    import torch

    from lance_model.generation import LanceGenerator, Request, SamplerOptions, TextOptions, generate_text
    from lance_platform.schema import row_to_sample
    from rl.rewards import ocr_legible
    from rl.trainer import resolve_device

    e = cfg.recipe.evaluation
    words, prompts = map(list, zip(*heldout_prompts(cfg)[:e.words]))
    spec = word_sources(cfg.curate)[0].synthetic
    height, width = cfg.rl.rollout.height, cfg.rl.rollout.width
    device = resolve_device(e.device)
    # bf16 on a GPU, as `lance-pipeline generate` runs by default
    generator = LanceGenerator.from_pretrained(checkpoint, device=device,
                                               dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    requests = [Request("t2i", p, height, width, seed=i) for i, p in enumerate(prompts)]

    def sample(scale: float) -> list:
        options = SamplerOptions(num_steps=e.steps, text_scale=scale, noise_level=None)
        return [o.frames[0].numpy() for o in generator.generate(requests, options, batch_size=e.batch_size)]

    images = sample(e.cfg_scale)
    scored = pool.score(images, prompts)
    by_cfg = {str(e.cfg_scale): float(np.mean(scored.components["ocr"]))}
    for scale in e.extra_cfg_scales:
        by_cfg[str(scale)] = float(np.mean(pool.score(sample(scale), prompts).components["ocr"]))
    qa = [r for r in heldout_rows(cfg.workdir / "heldout", "i2t") if r["answer"] in set(words)]
    answers = []
    with torch.no_grad():
        for a in range(0, len(qa), e.batch_size):
            chunk = [row_to_sample(r, generator.model.config.vit) for r in qa[a:a + e.batch_size]]
            answers += generate_text(generator.model, generator.builder, chunk,
                                     TextOptions(max_new_tokens=e.max_new_tokens))
    exact = [float(ans.text.strip() == r["answer"]) for ans, r in zip(answers, qa)]
    chars = [char_accuracy(ans.text, r["answer"]) for ans, r in zip(answers, qa)]
    metrics = {"t2i_ocr_accuracy": float(np.mean(scored.components["ocr"])),
               "t2i_ocr_exact": float(np.mean(scored.components["ocr_exact"])),
               # letters drawn, right or wrong (as many as the word has): drawing vs drawing the asked-for ones
               "t2i_ocr_legible": float(np.mean([ocr_legible(t, w) for t, w in zip(scored.texts, words)])),
               "t2i_ocr_accuracy_by_cfg": by_cfg,
               "i2t_exact_match": float(np.mean(exact)) if exact else float("nan"),
               "i2t_char_accuracy": float(np.mean(chars)) if chars else float("nan"),
               "t2i_samples": len(images), "i2t_samples": len(exact), "image_size": [height, width],
               "sampler": {"steps": e.steps, "cfg_scale": e.cfg_scale, "ode": True},
               "examples": [{"word": w, "ocr_text": t} for w, t in zip(words[:8], scored.texts[:8])]
               + [{"word": r["answer"], "i2t_answer": ans.text} for r, ans in zip(qa[:8], answers[:8])],
               "question": spec.question}
    return metrics, images


def char_accuracy(answer: str, word: str) -> float:
    """1 - edit distance / len(word) (at least 0) between an i2t answer and the word, after the OCR
    reward's normalisation: a dense companion of exact match (a wrong letter costs 1/len)."""
    from rl.rewards import levenshtein, normalize_text

    got, want = normalize_text(answer), normalize_text(word)
    return 1.0 - min(levenshtein(got, want), len(want)) / max(len(want), 1)


def grid_png(path: Path, rows: list[list]) -> Path:
    """Rows of equal-size RGB images tiled into one PNG."""
    import numpy as np
    from PIL import Image

    from rl.trainer import image_grid

    columns = max(len(r) for r in rows)
    tiles = [im for r in rows for im in (list(r) + [np.zeros_like(r[0])] * (columns - len(r)))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    Image.fromarray(image_grid(tiles, columns)).save(tmp)
    os.replace(tmp, path)
    return path


METRICS = ("t2i_ocr_accuracy", "t2i_ocr_exact", "i2t_exact_match", "i2t_char_accuracy")


def results_table(cfg: RecipeConfigs) -> tuple[dict, str]:
    """Every finished stage's wall time and every evaluation so far -> (JSON, markdown)."""
    rows = []
    for stage in STAGES:
        done = finished(cfg.workdir, stage)
        ev = cfg.workdir / "eval" / f"{stage}.json"
        metrics = json.loads(ev.read_text()) if ev.is_file() else {}
        rows.append({"stage": stage, "finished": done is not None,
                     "seconds": done["seconds"] if done else None, "eval_seconds": metrics.get("seconds"),
                     **{k: metrics.get(k) for k in METRICS}})
    total = sum(r["seconds"] or 0.0 for r in rows) + sum(r["eval_seconds"] or 0.0 for r in rows)
    data = {"recipe": cfg.recipe.name, "workdir": str(cfg.workdir), "heldout_words": len(heldout_words(cfg.curate)),
            "evaluated_words": min(cfg.recipe.evaluation.words, len(heldout_words(cfg.curate))),
            "stages": rows, "total_seconds": total}

    def cell(v, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    lines = [f"# {cfg.recipe.name}: held-out words ({data['evaluated_words']} of {data['heldout_words']})", "",
             ("| stage | wall time (s) | eval time (s) | t2i OCR accuracy | t2i OCR exact | i2t exact match "
              "| i2t char accuracy |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {cell(r['seconds'], 1)} | {cell(r['eval_seconds'], 1)} | "
                     f"{cell(r['t2i_ocr_accuracy'])} | {cell(r['t2i_ocr_exact'])} | {cell(r['i2t_exact_match'])} | "
                     f"{cell(r.get('i2t_char_accuracy'))} |")
    lines += ["", f"total: {total:.1f} s"]
    return data, "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ stages
def run_curate(cfg: RecipeConfigs, parent_id: str | None) -> str:
    from data_curation.pipeline import run_curation
    from data_curation.store import CuratedDataset

    for curation, run_id in ((cfg.curate, parent_id), (cfg.heldout, None)):
        if CuratedDataset(curation.output.dir).load_manifest().runs:
            log.info("recipe: %s already curated; kept", curation.output.dir)
            continue
        result = run_curation(curation, "curate", parent_run_id=run_id)
        log.info("recipe: curated %s rows into %s", result.counts.get("curated", 0), curation.output.dir)
    spec = word_sources(cfg.curate)[0].synthetic
    words = heldout_words(cfg.curate)
    write_json_atomic(cfg.workdir / "curated" / HELDOUT_FILE,
                      {"words": words, "vocabulary": spec.vocabulary, "seed": spec.seed,
                       "heldout_dataset": str(cfg.workdir / "heldout"),
                       "note": "the last `heldout` words of the generated vocabulary; the train split never contains them"})
    return str(cfg.workdir / "curated")


def run_train(cfg: RecipeConfigs, stage: StageConfig, parent_id: str | None) -> str:
    from pipelines.trainer import run_stage

    previous = cfg.workdir / "pt" / "final" if stage.init.kind == "previous" else None
    if previous is not None and not previous.is_dir():
        raise UsageError(f"stage {stage.name} starts from {previous}, which does not exist: run the pt stage first")
    result = run_stage(stage.validate(), cfg.workdir, parent_run_id=parent_id,
                       init_path=str(previous) if previous else None, experiment=cfg.recipe.experiment)
    return str(result.checkpoint)


def run_rl(cfg: RecipeConfigs, parent_id: str | None) -> tuple[str, dict]:
    from rl.trainer import train_grpo

    if not Path(cfg.rl.policy.checkpoint).is_dir():
        raise UsageError(f"GRPO starts from {cfg.rl.policy.checkpoint}, which does not exist: run the sft stage first")
    write_prompts(cfg)
    result = train_grpo(cfg.rl, parent_run_id=parent_id)
    counters = {k: float(sum(h.get(k, 0.0) for h in result.history))
                for k in ("optimizer_steps", "groups", "groups_skipped")}
    return str(result.checkpoint), {"iterations": result.steps, **counters,
                                    **{f"grpo_start_{k}": v for k, v in result.initial.items()},
                                    **{f"grpo_end_{k}": v for k, v in result.metrics.items() if k.startswith("eval/")}}


def _evaluate_stage(cfg: RecipeConfigs, stage: str, checkpoint: str, pool, tracker) -> None:
    start = time.time()
    metrics, images = evaluate_checkpoint(Path(checkpoint), cfg, pool)
    metrics.update(stage=stage, checkpoint=checkpoint, seconds=time.time() - start)
    write_json_atomic(cfg.workdir / "eval" / f"{stage}.json", metrics)
    grid = grid_png(cfg.workdir / f"samples_{stage}.png", [images[:cfg.recipe.evaluation.grid]])
    log.info("recipe: after %s, held-out t2i OCR accuracy %.3f (exact %.3f), i2t exact match %.3f (characters "
             "%.3f)", stage, metrics["t2i_ocr_accuracy"], metrics["t2i_ocr_exact"], metrics["i2t_exact_match"],
             metrics["i2t_char_accuracy"])
    if tracker is not None:
        tracker.log_metrics({f"{stage}/{k}": metrics[k] for k in METRICS})
        tracker.log_artifact(grid, "samples")


def run_recipe(config: str | Path, stages: tuple[str, ...] = STAGES, overrides: list[str] | None = None) -> dict:
    """Run the requested stages in order (finished ones are skipped), evaluate after each training
    stage, and write the results files; returns the results JSON."""
    from lance_platform.runtime import init_ray
    from lance_platform.tracking import Tracker, default_tracking_uri
    from rl.actors import RewardActorPool

    cfg = load_recipe(config, overrides)
    workdir = cfg.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    ray_mode = None  # Ray starts with the first stage or evaluation that has work to do

    def ray_started() -> None:
        nonlocal ray_mode
        if ray_mode is None:
            ray_mode = init_ray(cfg.rl.ray_address)

    tracker = None
    if cfg.recipe.tracking:
        tracker = Tracker(default_tracking_uri(workdir), cfg.recipe.experiment, workdir / "mlartifacts")
        id_file = workdir / "mlflow_parent_run_id"
        run_id = tracker.start(cfg.recipe.name, run_id=id_file.read_text().strip() if id_file.is_file() else None,
                               tags={"pipeline": cfg.recipe.name})
        if run_id and not id_file.is_file():
            write_text_atomic(id_file, run_id)
            tracker.log_dict({"recipe": cfg.recipe, "curate": cfg.curate, "stages": cfg.stages, "rl": cfg.rl},
                             "config/recipe.yaml")
    parent_id = tracker.run_id if tracker else None
    w = cfg.rl.reward
    pool = None
    try:
        for stage in stages:
            if finished(workdir, stage):
                log.info("recipe: stage %s already finished (%s); skipped", stage, marker(workdir, stage))
            else:
                ray_started()
                if pool is not None:
                    # the evaluation's reward actors hold CPUs (GPUs) a stage's workers need: a stage
                    # started beside them can wait for resources that never free up
                    pool.shutdown()
                    pool = None
                start = time.time()
                extra: dict = {}
                if stage == "curate":
                    output = run_curate(cfg, parent_id)
                elif stage == "rl":
                    output, extra = run_rl(cfg, parent_id)
                else:
                    output = run_train(cfg, cfg.stages[TRAIN_STAGES.index(stage)], parent_id)
                write_json_atomic(marker(workdir, stage), {"stage": stage, "seconds": time.time() - start,
                                                           "output": output, **extra})
            if stage != "curate" and not (workdir / "eval" / f"{stage}.json").is_file():
                ray_started()
                pool = pool or RewardActorPool(w.ocr, w.num_actors, w.num_cpus, w.num_gpus, w.video_frame_stride,
                                               w.max_retries)
                _evaluate_stage(cfg, stage, finished(workdir, stage)["output"], pool, tracker)
            data, table = results_table(cfg)
            write_json_atomic(workdir / f"{RESULTS}.json", data)
            write_text_atomic(workdir / f"{RESULTS}.md", table)
        if all((workdir / f"samples_{s}.png").is_file() for s in ("sft", "rl")):
            import numpy as np
            from PIL import Image

            before, after = (np.asarray(Image.open(workdir / f"samples_{s}.png")) for s in ("sft", "rl"))
            grid = grid_png(workdir / "grpo_before_after.png", [[before], [after]])
            if tracker is not None:
                tracker.log_artifact(grid, "samples")
        data, table = results_table(cfg)
        if tracker is not None:
            tracker.log_dict(data, f"{RESULTS}.json")
            tracker.end("FINISHED")
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        if ray_mode not in (None, "existing"):
            import ray

            ray.shutdown()
    print(table, end="")
    return data


def cmd_recipe(args: argparse.Namespace) -> int:
    run_recipe(args.config, parse_stages(args.stages), args.overrides)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recipe", help="run a training recipe: curate -> PT -> SFT -> GRPO, resumable, evaluated after each stage",
        description="Runs the stages of a recipe config in order, skipping the ones already finished in its work "
                    "directory, evaluates the held-out words after each training stage and writes "
                    "recipe_results.json / .md and sample grids there.")
    p.add_argument("--config", required=True, help="recipe YAML (e.g. configs/recipes/text_rendering/recipe.yaml)")
    p.add_argument("--stages", default=None,
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all; finished ones are skipped)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="recipe fields (workdir=..., evaluation.words=...) or a stage's: curate.<key>, "
                        "curate.synthetic.<key> (every synthetic source), pt.<key>, sft.<key>, rl.<key>")
    p.set_defaults(func=cmd_recipe)

"""`lance-pipeline recipe` on the text-rendering recipe: every config validates; a 2-step run of
each stage on a tiny corpus passes end to end on CPU, writes the evaluation files with values in
range, and a second invocation skips the finished stages."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.errors import UsageError
from jobs.recipe import STAGES, load_recipe, parse_stages
from lance_platform.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "recipes" / "text_rendering" / "recipe.yaml"
# Everything shrunk: 24 + 12 rows of 32 x 32 from 40 words (4 held out) and as many of each prefix source, the
# tiny preset, 2 steps.
# The evaluation reads the first 2 of the 4 held-out words at one extra CFG scale: OCR of the noise
# a 2-step tiny model draws is ~0.7 s an image on one CPU, and each evaluated word and scale is one
# more image per evaluation (3 evaluations).
TINY = [
    "evaluation.words=2", "evaluation.extra_cfg_scales=[2.0]", "evaluation.steps=2", "evaluation.batch_size=4",
    "evaluation.grid=4", "evaluation.device=cpu", "tracking=false",
    "curate.synthetic.images=24", "curate.synthetic.qa=12", "curate.synthetic.vocabulary=40",
    "curate.synthetic.heldout=4", "curate.synthetic.height=32", "curate.synthetic.width=32",
    "curate.model.preset=tiny", "curate.buckets.vae_image_area=1024", "curate.buckets.vit_image_area=3136",
    "curate.encode.vae_batch_size=8", "curate.encode.vit_batch_size=8", "curate.encode.read_batch_size=8",
    "curate.encode.vae_actors=1", "curate.encode.vit_actors=1", "curate.encode.actor_num_cpus=0.5",
    "curate.encode.torch_threads=1", "curate.output.target_shard_bytes=4194304",
    *[f"{s}.{kv}" for s in ("pt", "sft") for kv in (
        "model.preset=tiny", "steps=2", "data.max_tokens=2048", "data.holdout_per_group=1", "scaling.use_gpu=false",
        "scaling.cpus_per_worker=1.0", "checkpoint_every=0", "validation.every=0", "validation.samples=0",
        "log_every=1")],
    "rl.policy.preset=tiny", "rl.policy.device=cpu", "rl.steps=2", "rl.checkpoint_every=1", "rl.eval_every=0",
    "rl.rollout.height=32", "rl.rollout.width=32", "rl.rollout.prompts_per_step=2", "rl.rollout.group_size=2",
    "rl.rollout.steps=2", "rl.rollout.microbatch=4", "rl.rollout.eval_steps=2", "rl.reward.num_actors=1",
    # 1.5 of a 2-CPU machine's CPUs: the evaluation's reward actor and the next stage's worker (1 CPU)
    # do not fit side by side, so the recipe must free the evaluation's actors before a stage starts
    "rl.reward.num_cpus=1.5",
    # two onnxruntime threads per OCR engine: while an engine scores, the driver waits for it
    "rl.reward.ocr.threads=2",
    # the training stages' profiler, on PT's second step (the recipe's PT and SFT pack in a process)
    "pt.profile.steps=1", "pt.profile.start_step=1",
]


def test_recipe_configs_validate(tmp_path):
    cfg = load_recipe(RECIPE, [f"workdir={tmp_path}"])
    spec = cfg.curate.sources[0].synthetic
    assert spec.images + spec.qa >= 20_000 and spec.vocabulary >= 2000 and spec.heldout > 0
    assert [s.name for s in cfg.stages] == ["pt", "sft"]
    assert all(s.model.preset == "small" for s in cfg.stages) and cfg.rl.policy.preset == "small"
    assert spec.fonts == ("default", "DejaVuSans-Bold", "DejaVuSerif-Bold", "DejaVuSansMono-Bold")
    assert cfg.stages[0].data.shards == str(tmp_path / "curated")
    assert cfg.rl.policy.checkpoint == str(tmp_path / "sft" / "final")
    assert cfg.rl.prompts.eval_file == str(tmp_path / "rl" / "heldout_prompts.txt")
    held = cfg.heldout.sources[0].synthetic
    assert (held.split, held.images, held.qa, held.videos, held.edits) == ("heldout", 200, 200, 0, 0)
    assert cfg.heldout.output.dir == str(tmp_path / "heldout") and not cfg.heldout.tracking.enabled
    # the curriculum: words' first 1..5 letters from the words' vocabulary, then whole words; PT moves
    # through them in order, both tasks at every stage; no held-out words come from them
    from data_curation.synthetic import split_words
    from pipelines.batching import mixture_weights

    sources = {s.name: s.synthetic for s in cfg.curate.sources}
    assert [sources[f"prefix{k}"].prefix_letters for k in range(1, 6)] == [1, 2, 3, 4, 5]
    assert all(split_words(sources[f"prefix{k}"]) == split_words(spec) for k in range(1, 6))
    assert [s.name for s in cfg.heldout.sources] == ["text"]
    pt, sft = cfg.stages

    def drawn(step: int) -> set[str]:
        return {k for k, w in mixture_weights(pt.mixture, step).items() if w > 0}

    assert drawn(0) == {"generation_1", "understanding_1"}
    assert drawn(200) == {"generation_2", "understanding_2"}
    assert drawn(385) == {"generation_3", "understanding_3", "generation_4", "understanding_4"}
    assert drawn(pt.steps) == {"generation", "understanding"}
    weights = mixture_weights(pt.mixture, 530)
    assert weights["generation_5"] == weights["understanding_5"] and weights["generation_4"] < weights["generation_5"]
    assert all(g.uri_prefixes == ("synthetic://text/",) for g in sft.mixture.groups.values())


def test_a_curriculum_source_with_a_vocabulary_of_its_own_is_refused(tmp_path):
    """Prefixes drawn from another vocabulary would include held-out words of the recipe's."""
    import dataclasses

    from jobs.recipe import check_heldout_unseen

    cfg = load_recipe(RECIPE, [f"workdir={tmp_path}"])
    check_heldout_unseen(cfg.curate)
    sources = list(cfg.curate.sources)
    sources[3] = dataclasses.replace(sources[3], synthetic=dataclasses.replace(sources[3].synthetic, vocabulary_seed=None))
    with pytest.raises(ConfigError, match=r"curate\.sources\.3 \('prefix3'\) trains on \d+ held-out word"):
        check_heldout_unseen(dataclasses.replace(cfg.curate, sources=tuple(sources)))


def test_i2t_char_accuracy_is_one_minus_the_edit_distance_per_letter():
    from jobs.recipe import char_accuracy

    assert char_accuracy("BALOM", "BALOM") == 1.0
    assert char_accuracy(" balom\n", "BALOM") == 1.0  # the OCR reward's normalisation
    assert char_accuracy("BALOK", "BALOM") == pytest.approx(0.8)
    assert char_accuracy("BAL", "BALOM") == pytest.approx(0.6)
    assert char_accuracy("", "BALOM") == 0.0 and char_accuracy("XXXXXXXXXX", "BALOM") == 0.0


def test_recipe_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"pt\.optim\.lr"):
        load_recipe(RECIPE, [f"workdir={tmp_path}", "pt.optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"curate\.synthetic\.backgrounds"):
        load_recipe(RECIPE, [f"workdir={tmp_path}", "curate.synthetic.backgrounds=[stripes]"])
    with pytest.raises(ConfigError, match="evaluation.words"):
        load_recipe(RECIPE, [f"workdir={tmp_path}", "evaluation.words=0"])
    with pytest.raises(ConfigError, match="synthetic.heldout"):
        load_recipe(RECIPE, [f"workdir={tmp_path}", "curate.synthetic.heldout=0"])
    assert parse_stages("rl, curate") == ("curate", "rl")
    with pytest.raises(UsageError, match="--stages"):
        parse_stages("curate,ct")


def recipe(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # Ray Train's controller polls its workers every 2 s and preemption every 5 s: each stage then ends
    # 2-4.5 s after its last report; 0.5 s polls change nothing else. The preemption watcher (one more
    # actor process per stage, for node drains, which no test makes) is left out.
    env.update(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5",
               RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "recipe", "--config", str(RECIPE), *extra,
                           f"workdir={workdir}", *TINY], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, f"recipe failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.slow
def test_recipe_runs_every_stage_and_resumes(tmp_path):
    start = time.time()
    recipe(tmp_path, "--stages", "curate,pt")
    assert sorted(p.stem for p in (tmp_path / "stages").glob("*.json")) == ["curate", "pt"]
    recipe(tmp_path)  # the rest; curate and pt are skipped
    first = time.time() - start

    from lance_platform.schema import read_shard
    from pipelines.trainer import shard_files
    from rl.rewards import target_text

    held = json.loads((tmp_path / "curated" / "heldout_words.json").read_text())
    assert len(held["words"]) == 4
    # GRPO's held-out prompts: each held-out word once, in order, captioned as the held-out corpus's
    # own t2i rows are (whatever wording the corpus's captions have)
    heldout_rows = [r for f in shard_files(tmp_path / "heldout") for r in read_shard(f).to_pylist()]
    prompts = (tmp_path / "rl" / "heldout_prompts.txt").read_text().splitlines()
    assert [target_text(p) for p in prompts] == held["words"]
    assert sorted(prompts) == sorted(r["caption"] for r in heldout_rows if r["task"] == "t2i")
    train_words = {target_text(line) for line in (tmp_path / "rl" / "train_prompts.txt").read_text().splitlines()}
    assert len(train_words) == 36 and not train_words & set(held["words"])

    results = json.loads((tmp_path / "recipe_results.json").read_text())
    assert [r["stage"] for r in results["stages"]] == list(STAGES)
    assert (results["heldout_words"], results["evaluated_words"]) == (4, 2)  # the first evaluation.words
    for row in results["stages"]:
        assert row["finished"] and row["seconds"] > 0
        if row["stage"] == "curate":
            continue
        for key in ("t2i_ocr_accuracy", "t2i_ocr_exact", "i2t_exact_match", "i2t_char_accuracy"):
            assert 0.0 <= row[key] <= 1.0, (row["stage"], key, row[key])
        assert row["i2t_char_accuracy"] >= row["i2t_exact_match"]
        ev = json.loads((tmp_path / "eval" / f"{row['stage']}.json").read_text())
        assert (ev["t2i_samples"], ev["i2t_samples"], ev["image_size"]) == (2, 2, [32, 32])
        assert [x["word"] for x in ev["examples"] if "ocr_text" in x] == held["words"][:2]
        assert ev["sampler"] == {"steps": 2, "cfg_scale": 4.5, "ode": True}
        by_cfg = ev["t2i_ocr_accuracy_by_cfg"]
        assert sorted(by_cfg) == ["2.0", "4.5"] and all(0.0 <= v <= 1.0 for v in by_cfg.values())
        assert by_cfg["4.5"] == row["t2i_ocr_accuracy"]
        from rl.rewards import ocr_legible

        reads = [(x["ocr_text"], x["word"]) for x in ev["examples"] if "ocr_text" in x]
        assert ev["t2i_ocr_legible"] == np.mean([ocr_legible(t, w) for t, w in reads])  # both words evaluated
    # the recipe's ViT trains with the model on the stored pixels (the preset has no pretrained tower)
    from lance_model.config import LanceConfig

    assert LanceConfig.from_pretrained(tmp_path / "sft" / "final").vit.trainable
    profile = json.loads((tmp_path / "pt" / "profile" / "summary.json").read_text())
    assert profile["steps"] == [1, 1] and profile["ops_per_step"] > 100 and profile["gpu_busy"] is None
    assert "aten::mm" in (tmp_path / "pt" / "profile" / "ops_by_cpu_time.txt").read_text()
    assert not (tmp_path / "sft" / "profile").exists()
    qa = [r for r in heldout_rows if r["task"] == "i2t"]
    assert qa and all(r["source_pixels"] for r in qa)
    rl = json.loads((tmp_path / "stages" / "rl.json").read_text())
    assert rl["iterations"] == 2 and rl["groups"] == 4
    table = (tmp_path / "recipe_results.md").read_text()
    assert all(f"| {s} |" in table for s in STAGES)
    grid = np.asarray(Image.open(tmp_path / "grpo_before_after.png"))
    assert grid.shape == (64, 2 * 32, 3)  # sft over rl, one tile per evaluated word
    assert np.array_equal(grid[:32], np.asarray(Image.open(tmp_path / "samples_sft.png")))

    markers = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").glob("*.json")}
    again = time.time()
    proc = recipe(tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").glob("*.json")} == markers
    assert proc.stdout.count("already finished") + proc.stderr.count("already finished") == 4
    assert time.time() - again < first

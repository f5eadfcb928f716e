"""The text-rendering recipe's prompts: the held-out evaluation and GRPO ask for held-out words with
the corpus's own styled captions, and the training prompts never name a held-out word."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from data_curation import synthetic
from jobs.recipe import heldout_prompts, heldout_words, load_recipe, write_prompts
from rl.rewards import target_text

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "text_rendering" / "recipe.yaml"
SMALL = ["curate.synthetic.vocabulary=300", "curate.synthetic.heldout=12"]


def test_heldout_prompts_are_the_heldout_corpus_captions_in_word_order(tmp_path):
    cfg = load_recipe(RECIPE, [f"workdir={tmp_path}", *SMALL])
    held = cfg.heldout.sources[0].synthetic
    assert held.captions == "styled_text_last"
    prompts = heldout_prompts(cfg)
    assert [w for w, _ in prompts] == heldout_words(cfg.curate) and len(prompts) == 12
    spec = dataclasses.asdict(held)
    curated = {item["word"]: synthetic.render_item(spec, item).text["caption"].decode()
               for item in synthetic.synthetic_specs(held) if item["task"] == "t2i"}
    for word, caption in prompts:
        assert caption == curated[word] and target_text(caption) == word
        assert caption.startswith("a sign in ") and caption.endswith(f' background that says "{word}"')


def test_grpo_prompt_files_hold_every_training_word_once_and_the_heldout_captions(tmp_path):
    cfg = load_recipe(RECIPE, [f"workdir={tmp_path}", *SMALL])
    write_prompts(cfg)
    train = Path(cfg.rl.prompts.file).read_text().splitlines()
    words = [target_text(p) for p in train]
    assert words == list(synthetic.split_words(cfg.curate.sources[0].synthetic)) and len(words) == 288
    assert not set(words) & set(heldout_words(cfg.curate))
    assert all(" letters on a" in p for p in train) and len({p.split(" in ", 1)[1] for p in train}) > 50
    assert Path(cfg.rl.prompts.eval_file).read_text().splitlines() == [c for _, c in heldout_prompts(cfg)]

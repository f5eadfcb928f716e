"""The `cells` text layout of the synthetic source (`SyntheticSpec.layout: cells`): a sign board of
letter cells, the i-th letter of a line centred in the i-th cell whatever the word's length, face or
glyph scale; OCR reads it; the config refuses a layout that cannot hold its words."""
from __future__ import annotations

import dataclasses
import io
import random

import numpy as np
import pytest
from PIL import Image

from data_curation import synthetic
from data_curation.config import SourceConfig, SyntheticSpec
from lance_platform.config import ConfigError, load_config

FONTS = ("default", "DejaVuSans-Bold", "DejaVuSerif-Bold", "DejaVuSansMono-Bold")


def glyph_columns(image: np.ndarray, fg: tuple[int, int, int]) -> np.ndarray:
    """Per column, how many pixels are (nearly) the text colour."""
    return (np.abs(image.astype(int) - np.asarray(fg)).max(axis=2) < 40).sum(axis=0)


@pytest.mark.parametrize("face", FONTS)
def test_letter_i_is_drawn_in_cell_i(face):
    fonts = synthetic.resolve_fonts([face])
    for seed, word in enumerate(["BAK", "FOLHOL", "ZUMET"]):
        image = synthetic.render_styled_text(word, 64, 96, seed, fonts, ("plain",), 0.8, named_colours=True,
                                             layout="cells", cells=6)
        style = synthetic.text_style(random.Random(seed), fonts, ("plain",), 0.8, True)
        columns = glyph_columns(image, style.fg)
        cell = 96 / 6
        for i in range(6):
            ink = columns[int(i * cell):int((i + 1) * cell)]
            if i < len(word):
                # a glyph in its own cell, centred there: ink on both halves of the cell
                centre = int((i + 0.5) * cell) - int(i * cell)
                assert ink[:centre].sum() > 0 and ink[centre:].sum() > 0, (face, word, i)
            else:
                assert ink.sum() == 0, (face, word, i)


def test_phrases_take_one_line_per_word_in_the_same_cells():
    fonts = synthetic.resolve_fonts(["DejaVuSans-Bold"])
    image = synthetic.render_styled_text("GO TAXI", 64, 64, 3, fonts, ("plain",), 1.0, named_colours=True,
                                         layout="cells", cells=6)
    style = synthetic.text_style(random.Random(3), fonts, ("plain",), 1.0, True)
    ink = np.abs(image.astype(int) - np.asarray(style.fg)).max(axis=2) < 40
    rows = np.nonzero(ink.any(axis=1))[0]
    top, bottom = ink[: (rows.min() + rows.max()) // 2], ink[(rows.min() + rows.max()) // 2:]
    cell = 64 / 6
    # "GO" on the upper line fills cells 0-1 only; "TAXI" on the lower line cells 0-3
    assert top[:, int(2 * cell):].sum() == 0 and top[:, : int(2 * cell)].sum() > 0
    assert bottom[:, int(4 * cell):].sum() == 0 and bottom[:, int(3 * cell): int(4 * cell)].sum() > 0


def test_a_line_longer_than_the_board_is_an_error():
    with pytest.raises(ValueError, match="more than cells=4"):
        synthetic.render_styled_text("FOLHOL", 64, 64, 0, ("default",), ("plain",), 1.0, layout="cells", cells=4)
    with pytest.raises(ValueError, match="layout='grid'"):
        synthetic.render_styled_text("GO", 64, 64, 0, ("default",), ("plain",), 1.0, layout="grid")


def test_the_corpus_renders_cells_and_ocr_reads_them():
    from rl.ocr import build_ocr_engine
    from rl.rewards import OcrReward

    spec = SyntheticSpec(images=6, videos=0, edits=0, qa=2, height=64, width=64, vocabulary=300, heldout=20,
                         split="heldout", fonts=FONTS, backgrounds=("plain", "gradient", "noise"),
                         min_text_scale=0.8, captions="styled", layout="cells")
    as_dict = dataclasses.asdict(spec)
    items = [i for i in synthetic.synthetic_specs(spec) if i["task"] == "t2i"]
    images, prompts = [], []
    for item in items:
        fetched = synthetic.render_item(as_dict, item)
        images.append(np.asarray(Image.open(io.BytesIO(fetched.media["target"][0])).convert("RGB")))
        prompts.append(fetched.text["caption"].decode())
    scored = OcrReward(build_ocr_engine())(images, prompts)
    assert np.mean(scored.components["ocr"]) >= 0.9, scored.texts


@pytest.mark.parametrize("overrides, field", [
    (["layout=cells"], "layout"),                                          # no generated vocabulary
    (["layout=cells", "vocabulary=300", "heldout=20", "cells=5"], "cells"),  # 6-letter words
])
def test_spec_refuses_a_board_that_cannot_hold_its_words(overrides, field):
    with pytest.raises(ConfigError, match=rf"sources\.0\.synthetic\.{field}="):
        SourceConfig(synthetic=load_config(SyntheticSpec, None, overrides, validate=False)).validate("sources.0")
    ok = load_config(SyntheticSpec, None, ["layout=cells", "vocabulary=300", "heldout=20"], validate=False)
    SourceConfig(synthetic=ok).validate("sources.0")
    assert ok.cells == 6


def test_longest_line_counts_words_and_letter_strings():
    spec = SyntheticSpec(vocabulary=300, heldout=20)
    assert synthetic.longest_line(spec) == 6
    assert synthetic.longest_line(SyntheticSpec()) == max(len(w) for w in synthetic.WORDS)

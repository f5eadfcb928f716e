"""The OCR reward on real OCR (RapidOCR, offline) of Pillow-rendered images (RL.md §3)."""
from __future__ import annotations

import numpy as np
import pytest

from rl.rewards import OcrReward

PROMPT = 'a sign that says "HELLO WORLD"'  # normalised target "helloworld": 10 characters


@pytest.fixture(scope="module")
def scored(rapid_engine, render):
    images = [render(["HELLO WORLD"]),
              render(["HELLX WORLY"]),  # two characters changed
              np.full((512, 512, 3), 255, dtype=np.uint8),
              render(["THE SIGN SAYS", "HELLO WORLD", "IN RED"])]
    return OcrReward(rapid_engine)(images, [PROMPT] * len(images))


def test_exact_text_scores_one(scored):
    assert scored.components["ocr"][0] == 1.0
    assert scored.components["ocr_exact"][0] == 1.0


def test_two_changed_characters_score_one_minus_two_over_len(scored):
    assert scored.texts[1].replace(" ", "").lower() == "hellxworly"
    assert scored.components["ocr"][1] == pytest.approx(1 - 2 / 10)
    assert scored.components["ocr_exact"][1] == 0.0


def test_blank_image_scores_zero(scored):
    assert scored.texts[2] == ""
    assert scored.components["ocr"][2] == 0.0


def test_extra_surrounding_text_still_scores_one(scored):
    assert len(scored.texts[3].replace(" ", "")) > len("helloworld")
    assert scored.components["ocr"][3] == 1.0
    assert scored.failures == 0


def test_prompt_file_names_bad_lines(tmp_path):
    import pytest

    from rl.prompts import load_prompt_file
    from rl.rewards import PromptError

    good = tmp_path / "good.txt"
    good.write_text('a sign that says "OPEN"\n\nA poster reading "SALE"\n')
    assert load_prompt_file(good) == ['a sign that says "OPEN"', 'A poster reading "SALE"']
    bad = tmp_path / "bad.txt"
    bad.write_text('a sign that says "OPEN"\na sign with no quotes\n\nanother one\n')
    with pytest.raises(PromptError, match=r"bad\.txt: 2 prompt\(s\).*line 2: 'a sign with no quotes'.*line 4"):
        load_prompt_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompt_file(tmp_path / "missing.txt")

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


def test_legible_counts_letters_drawn_whatever_they_are(scored):
    from rl.rewards import ocr_legible

    # the right letters and two wrong ones are both ten letters; a blank or a longer read is not
    assert [ocr_legible(t, "HELLO WORLD") for t in scored.texts] == [1.0, 1.0, 0.0, 0.0]
    assert ocr_legible("KAL", "FOL") == 1.0 and ocr_legible("KA", "FOL") == 0.0
    assert ocr_legible("K4L", "FOL") == 0.0 and ocr_legible("中文字", "FOL") == 0.0


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


# ------------------------------------------------------------------------------------ ocr_ctc
def small_render(render, word: str, size: int = 32) -> np.ndarray:
    """`word` filling a size x size image, as a generator at the demo's 32 x 32 would have to draw it."""
    from PIL import Image

    return np.asarray(Image.fromarray(render([word], size=256, font_size=60)).resize((size, size), Image.BILINEAR))


@pytest.fixture(scope="module")
def ctc_scored(rapid_engine, render):
    rng = np.random.default_rng(0)
    images = [small_render(render, "OPEN"),
              small_render(render, "STOP"),
              rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              np.full((32, 32, 3), 128, dtype=np.uint8),
              small_render(render, "OPEN", 64),
              np.stack([small_render(render, "OPEN"), small_render(render, "STOP")])]  # a 2-frame video
    return OcrReward(rapid_engine)(images, ['a sign that says "OPEN"'] * len(images))


def test_ctc_likelihood_ranks_the_target_far_above_other_text_and_noise(ctc_scored):
    ctc = ctc_scored.components["ocr_ctc"]
    clean, other, noise, grey, clean64 = ctc[:5]
    assert clean > 0.9 and clean64 > 0.9
    assert other < 1e-3 and clean / other > 1e3
    assert 0 < noise < 0.05 and 0 < grey < 1e-3  # never exactly 0: it still ranks unreadable images
    assert ctc_scored.components["ocr"][0] == 1.0 and ctc_scored.components["ocr"][1] == 0.0
    assert ctc[5] == pytest.approx((clean + other) / 2)  # frames above 0 are averaged
    assert ctc_scored.failures == 0


def test_ctc_likelihood_ignores_case_and_whitespace(rapid_engine, render):
    image = small_render(render, "OPEN")
    upper, lower, spaced = rapid_engine.likelihood([image] * 3, ["OPEN", "open", "O PEN"])
    assert upper == pytest.approx(lower) and upper == pytest.approx(spaced)


def test_ctc_likelihood_is_zero_for_characters_the_recogniser_lacks(rapid_engine, render):
    assert rapid_engine.likelihood([small_render(render, "OPEN")], ["OPEN\u05d0"]) == [0.0]  # Hebrew alef: not in the table


def test_ctc_likelihood_rejects_a_non_rgb_image(rapid_engine):
    from rl.ocr import OcrError

    with pytest.raises(OcrError, match=r"expected an RGB image"):
        rapid_engine.likelihood([np.zeros((32, 32), dtype=np.uint8)], ["OPEN"])


def test_engine_without_likelihood_leaves_ocr_ctc_out(render):
    from rl.ocr import OcrEngine
    from rl.rewards import check_weights, combine_rewards

    class TextOnly(OcrEngine):
        name = "text-only"

        def _read_bgr(self, image: np.ndarray) -> str:
            return "OPEN"

    batch = OcrReward(TextOnly())([small_render(render, "OPEN")], ['a sign that says "OPEN"'])
    assert set(batch.components) == {"ocr", "ocr_exact"} and batch.components["ocr"] == [1.0]
    check_weights({"ocr": 1.0, "ocr_ctc": 1.0})  # a known name: valid config
    with pytest.raises(KeyError, match="ocr_ctc"):
        combine_rewards({k: np.asarray(v) for k, v in batch.components.items()}, {"ocr": 1.0, "ocr_ctc": 1.0})

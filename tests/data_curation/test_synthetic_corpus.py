"""The generated-vocabulary synthetic corpus: vocabulary size and determinism, the held-out split,
styles (fonts, backgrounds, colours), the spec's validation, and the demo default left as it was."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from data_curation import synthetic
from data_curation.config import SourceConfig, SyntheticSpec
from lance_platform.config import ConfigError, load_config

SPEC = SyntheticSpec(images=40, videos=0, edits=0, qa=10, height=64, width=64, vocabulary=2400, heldout=200,
                     phrase_fraction=0.5, fonts="system", backgrounds=("plain", "gradient", "noise"),
                     min_text_scale=0.7, question="What does the image say?")


def test_vocabulary_is_large_distinct_and_deterministic():
    words = synthetic.generated_vocabulary(2400, 0)
    assert len(words) == len(set(words)) == 2400
    assert all(w.isalpha() and w.isupper() and 4 <= len(w) <= 6 for w in words)
    assert synthetic.generated_vocabulary(2400, 0) == words
    assert synthetic.generated_vocabulary(2400, 1) != words
    train, held = synthetic.vocabulary_split(2400, 200, 0)
    assert len(train) == 2200 and len(held) == 200 and not set(train) & set(held)


def test_train_split_never_contains_heldout_words():
    _, held = synthetic.vocabulary_split(2400, 200, 0)
    items = synthetic.synthetic_specs(dataclasses.replace(SPEC, images=400, qa=100))
    tokens = {t for item in items for t in item["word"].split()}
    assert not tokens & set(held)
    phrases = sum(" " in item["word"] for item in items)
    assert 150 < phrases < 350  # phrase_fraction 0.5 of 500 items


def test_heldout_split_cycles_through_heldout_words_once():
    spec = dataclasses.replace(SPEC, split="heldout", images=200, qa=200)
    items = synthetic.synthetic_specs(spec)
    _, held = synthetic.vocabulary_split(2400, 200, 0)
    for task in ("t2i", "i2t"):
        assert [i["word"] for i in items if i["task"] == task] == list(held)


def test_render_item_bytes_decode_and_styles_vary():
    spec = dataclasses.asdict(SPEC)
    items = synthetic.synthetic_specs(SPEC)
    images = []
    for item in items[:30]:
        fetched = synthetic.render_item(spec, item)
        data, kind = fetched.media["target"]
        assert kind == "image"
        im = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert im.shape == (64, 64, 3)
        images.append(im)
    qa = synthetic.render_item(spec, next(i for i in items if i["task"] == "i2t"))
    assert qa.text["question"] == b"What does the image say?"
    assert qa.text["answer"] and qa.text["caption"] is None  # an x2t caption is the instruction: none here
    assert len({im.tobytes() for im in images}) == len(images)
    assert len({tuple(np.median(im.reshape(-1, 3), axis=0)) for im in images}) > 10  # random colours


def test_backgrounds_and_contrast():
    import random

    plain = synthetic.background("plain", (100, 50, 200), 32, 48, random.Random(0))
    assert plain.shape == (32, 48, 3) and plain.std(axis=(0, 1)).max() == 0
    gradient = synthetic.background("gradient", (128, 128, 128), 32, 48, random.Random(0))
    assert gradient.max(axis=(0, 1)).max() - gradient.min(axis=(0, 1)).max() > 5
    noise = synthetic.background("noise", (128, 128, 128), 64, 64, random.Random(0))
    assert 9 < noise.std() < 15
    with pytest.raises(ValueError, match="stripes"):
        synthetic.background("stripes", (0, 0, 0), 8, 8, random.Random(0))
    rng = random.Random(1)
    for _ in range(50):
        bg, fg = synthetic.contrasting_colours(rng)
        assert abs(synthetic._luma(bg) - synthetic._luma(fg)) >= synthetic.MIN_CONTRAST


def test_system_fonts_include_default_and_fall_back(monkeypatch, caplog):
    fonts = synthetic.system_fonts()
    assert fonts[0] == synthetic.DEFAULT_FONT
    synthetic.system_fonts.cache_clear()
    monkeypatch.setattr(synthetic, "FONT_GLOB", "/nonexistent/**/*.ttf")
    try:
        with caplog.at_level("WARNING"):
            assert synthetic.system_fonts() == (synthetic.DEFAULT_FONT,)
        assert "Pillow's default font only" in caplog.text
        im = synthetic.render_styled_text("BALO TIMS", 64, 64, 3, synthetic.system_fonts(), ("plain",), 1.0)
        assert im.shape == (64, 64, 3) and im.std() > 10
    finally:
        synthetic.system_fonts.cache_clear()


def test_default_spec_keeps_the_demo_corpus():
    items = synthetic.synthetic_specs(SyntheticSpec())
    assert [i["word"] for i in items if i["task"] == "t2i"] == list(synthetic.WORDS[:8])
    spec = dataclasses.asdict(SyntheticSpec())
    first = synthetic.render_item(spec, items[0]).media["target"][0]
    expected = synthetic.render_text_image(items[0]["word"], 64, 96, items[0]["seed"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first)).convert("RGB")), expected)


@pytest.mark.parametrize("override, field", [
    (["sources.0.synthetic.heldout=10"], "heldout"),
    (["sources.0.synthetic.split=heldout"], "split"),
])
def test_spec_cross_field_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"synthetic\.{field}"):
        SourceConfig(synthetic=load_config(SyntheticSpec, None, [o.split("synthetic.", 1)[1] for o in override],
                                           validate=False)).validate("sources.0")


def test_spec_types_are_checked():
    with pytest.raises(ConfigError, match="backgrounds"):
        load_config(SyntheticSpec, None, ["backgrounds=[plain, stripes]"])
    with pytest.raises(ConfigError, match="min_text_scale"):
        load_config(SyntheticSpec, None, ["min_text_scale=0"])


DEJAVU = "/usr/share/fonts/truetype/dejavu"


@pytest.mark.skipif(not synthetic._face_path("DejaVuSans-Bold"), reason="needs the DejaVu fonts")
def test_font_list_draws_only_the_named_faces():
    fonts = synthetic.resolve_fonts(["default", "DejaVuSans-Bold", "DejaVuSerif.ttf"])
    assert fonts[0] == synthetic.DEFAULT_FONT
    assert [f.rsplit("/", 1)[-1] for f in fonts[1:]] == ["DejaVuSans-Bold.ttf", "DejaVuSerif.ttf"]
    spec = dataclasses.replace(SPEC, fonts=("DejaVuSans-Bold",), backgrounds=("plain",), min_text_scale=1.0)
    SourceConfig(synthetic=spec).validate("sources.0")
    item = synthetic.synthetic_specs(spec)[0]
    got = np.asarray(Image.open(io.BytesIO(synthetic.render_item(dataclasses.asdict(spec), item).media["target"][0])))
    want = synthetic.render_styled_text(item["word"], 64, 64, item["seed"], (fonts[1],), ("plain",), 1.0)
    other = synthetic.render_styled_text(item["word"], 64, 64, item["seed"], (fonts[2],), ("plain",), 1.0)
    assert np.array_equal(got, want) and not np.array_equal(got, other)


def test_a_missing_font_is_a_config_error_naming_it():
    spec = dataclasses.replace(SPEC, fonts=("default", "NoSuchFace-Bold"))
    with pytest.raises(ConfigError, match=r"sources\.0\.synthetic\.fonts.*NoSuchFace-Bold"):
        SourceConfig(synthetic=spec).validate("sources.0")
    with pytest.raises(ConfigError, match="fonts"):
        load_config(SyntheticSpec, None, ["fonts=[]"])

"""Styled captions (`SyntheticSpec.captions: styled`): a t2i caption names the colours, face and
background its image is drawn in, and the image shows exactly those; plain captions are unchanged."""
from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pytest
from PIL import Image

from data_curation import synthetic
from data_curation.config import SourceConfig, SyntheticSpec
from lance_platform.config import ConfigError

SPEC = SyntheticSpec(images=24, videos=0, edits=0, qa=4, height=64, width=64, vocabulary=300, heldout=20,
                     fonts="system", backgrounds=("plain", "gradient", "noise"), min_text_scale=0.8,
                     captions="styled")
_STYLE = r'(\w+) (\S+) letters on an? (?:plain (\w+) background|(\w+) gradient background|noisy (\w+) background)'
CAPTIONS = {"styled": re.compile(rf'^a sign that says "(?P<word>[A-Z ]+)" in {_STYLE}$'),
            "styled_text_last": re.compile(rf'^a sign in {_STYLE} that says "(?P<word>[A-Z ]+)"$')}


def decode(fetched) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(fetched.media["target"][0])).convert("RGB"))


@pytest.mark.parametrize("captions", ["styled", "styled_text_last"])
def test_styled_caption_names_what_the_image_shows(captions):
    spec = dataclasses.asdict(dataclasses.replace(SPEC, captions=captions))
    faces = {synthetic.face_name(f) for f in synthetic.resolve_fonts(SPEC.fonts)}
    seen_fg, seen_bg, kinds = set(), set(), set()
    for item in [i for i in synthetic.synthetic_specs(SPEC) if i["task"] == "t2i"]:
        fetched = synthetic.render_item(spec, item)
        caption = fetched.text["caption"].decode()
        m = CAPTIONS[captions].match(caption)
        assert m, caption
        fg, face, plain_bg, gradient_bg, noisy_bg = m.groups()[:5] if captions == "styled_text_last" else m.groups()[1:]
        assert m.group("word") == item["word"] and face in faces
        bg = plain_bg or gradient_bg or noisy_bg
        kinds.add("plain" if plain_bg else "gradient" if gradient_bg else "noise")
        im = decode(fetched).reshape(-1, 3).astype(int)
        fg_rgb, bg_rgb = np.asarray(synthetic.NAMED_COLOURS[fg]), np.asarray(synthetic.NAMED_COLOURS[bg])
        # the glyphs are drawn in the named text colour (thin faces at 64 px are mostly anti-aliased edges)
        off = np.abs(im - fg_rgb).max(axis=1)
        assert (off == 0).sum() >= 1 and (off < 30).sum() >= 20, caption
        if plain_bg:  # every pixel away from the text is the named background colour
            assert np.abs(im - bg_rgb).max(axis=1).tolist().count(0) > im.shape[0] // 3, caption
        else:  # gradient (+-40) / noise (sigma 12) around the named colour
            assert np.abs(np.median(im, axis=0) - bg_rgb).max() <= 45, caption
        seen_fg.add(fg)
        seen_bg.add(bg)
    assert len(seen_fg) >= 5 and len(seen_bg) >= 5 and kinds == {"plain", "gradient", "noise"}


def test_t2i_prompts_are_the_curated_captions_and_plain_captions_are_unchanged():
    spec = dataclasses.asdict(SPEC)
    items = [i for i in synthetic.synthetic_specs(SPEC) if i["task"] == "t2i"]
    prompts = synthetic.t2i_prompts(SPEC)
    assert prompts == [(i["word"], synthetic.render_item(spec, i).text["caption"].decode()) for i in items]
    assert len({c for _, c in prompts}) == len(prompts)

    # the text last: the same style, the same image, the text moved to the caption's end
    last = dataclasses.replace(SPEC, captions="styled_text_last")
    for (word, first), (_, at_end) in zip(prompts, synthetic.t2i_prompts(last)):
        assert at_end == f'a sign in {first.split(" in ", 1)[1]} that says "{word}"'
    assert np.array_equal(decode(synthetic.render_item(dataclasses.asdict(last), items[0])),
                          decode(synthetic.render_item(spec, items[0])))

    plain = dataclasses.replace(SPEC, captions="plain")
    plain_dict = dataclasses.asdict(plain)
    assert synthetic.t2i_prompts(plain) == [(i["word"], synthetic.image_caption(i["word"])) for i in items]
    # plain captions keep the random-RGB renders they always had
    item = items[0]
    want = synthetic.render_styled_text(item["word"], 64, 64, item["seed"], synthetic.resolve_fonts("system"),
                                        plain.backgrounds, plain.min_text_scale)
    assert np.array_equal(decode(synthetic.render_item(plain_dict, item)), want)


@pytest.mark.parametrize("captions", ["styled", "styled_text_last"])
def test_styled_captions_need_a_generated_vocabulary(captions):
    with pytest.raises(ConfigError, match=r"sources\.0\.synthetic\.captions"):
        SourceConfig(synthetic=SyntheticSpec(captions=captions)).validate("sources.0")
    with pytest.raises(ValueError, match="named colours"):
        synthetic.text_style(__import__("random").Random(0), ("default",), ("plain",), 1.0).describe()


def test_letters_fraction_adds_short_letter_strings_to_the_train_split_only():
    spec = SyntheticSpec(images=400, videos=0, edits=0, qa=100, vocabulary=300, heldout=20, letters_fraction=0.3)
    words = [i["word"] for i in synthetic.synthetic_specs(spec)]
    short = [w for w in words if len(w) <= 3]
    assert 100 < len(short) < 200  # 0.3 of 500 items
    assert all(set(w) <= set(synthetic.ALPHABET) for w in short) and {len(w) for w in short} == {1, 2, 3}
    _, held = synthetic.vocabulary_split(300, 20, 0)
    assert not set(words) & set(held)
    heldout = dataclasses.replace(spec, split="heldout", images=20, qa=20)
    assert [i["word"] for i in synthetic.synthetic_specs(heldout) if i["task"] == "t2i"] == list(held)
    # 0 (the default): words only
    assert all(len(i["word"]) >= 4 for i in synthetic.synthetic_specs(dataclasses.replace(spec, letters_fraction=0.0)))


def test_prefix_fraction_draws_training_words_first_letters_in_the_train_split_only():
    spec = SyntheticSpec(images=400, videos=0, edits=0, qa=100, vocabulary=300, heldout=20, prefix_fraction=0.5, seed=3)
    train, held = synthetic.vocabulary_split(300, 20, 3)
    words = [i["word"] for i in synthetic.synthetic_specs(spec)]
    prefixes = [w for w in words if w not in train]
    assert 200 < len(prefixes) < 300  # 0.5 of 500 items
    # each a proper prefix of a training word, of every length from 1 letter up
    assert all(any(t.startswith(w) and len(w) < len(t) for t in train) for w in prefixes)
    assert {len(w) for w in prefixes} == set(range(1, max(len(t) for t in train)))
    heldout = dataclasses.replace(spec, split="heldout", images=20, qa=20)
    assert [i["word"] for i in synthetic.synthetic_specs(heldout) if i["task"] == "t2i"] == list(held)


def test_prefix_letters_fixes_the_prefix_length_and_vocabulary_seed_shares_a_vocabulary():
    words = SyntheticSpec(images=200, videos=0, edits=0, qa=0, vocabulary=300, heldout=20, seed=0)
    prefixes = dataclasses.replace(words, seed=7, vocabulary_seed=0, prefix_fraction=1.0, prefix_letters=4)
    train = synthetic.split_words(words)
    assert synthetic.split_words(prefixes) == train  # one vocabulary, one hold-out
    assert synthetic.split_words(dataclasses.replace(prefixes, vocabulary_seed=None)) != train
    drawn = [i["word"] for i in synthetic.synthetic_specs(prefixes)]
    assert {len(w) for w in drawn} == {4}
    assert all(any(t.startswith(w) and len(t) > 4 for t in train) for w in drawn)
    assert len(set(drawn)) > 50
    # their own renders: another seed, other styles
    assert [i["seed"] for i in synthetic.synthetic_specs(prefixes)] != [i["seed"] for i in synthetic.synthetic_specs(words)]


@pytest.mark.parametrize("changes, message", [
    ({"prefix_letters": 3}, r"prefix_letters=3: expected null unless prefix_fraction > 0"),
    ({"prefix_fraction": 1.0, "prefix_letters": 6}, r"prefix_letters=6: expected fewer letters than the longest training word \(6\)"),
])
def test_bad_prefix_letters_are_refused(changes, message):
    spec = SyntheticSpec(vocabulary=300, heldout=20, **changes)
    with pytest.raises(ConfigError, match=r"sources\.0\.synthetic\." + message):
        SourceConfig(synthetic=spec).validate("sources.0")


def test_a_palette_limits_the_named_colours_and_bad_palettes_are_named():
    fonts = synthetic.resolve_fonts(("DejaVuSans-Bold",))
    seen = set()
    for seed in range(40):
        caption = synthetic.styled_caption("K", seed, fonts, ("plain",), 0.8, palette=("black", "white", "yellow"))
        fg, bg = re.match(r'^a sign that says "K" in (\w+) \S+ letters on a plain (\w+) background$', caption).groups()
        im = synthetic.render_styled_text("K", 64, 64, seed, fonts, ("plain",), 0.8, named_colours=True,
                                          palette=("black", "white", "yellow")).reshape(-1, 3).astype(int)
        # the image's corner is the named background, and some pixels are the named text colour exactly
        assert im[0].tolist() == list(synthetic.NAMED_COLOURS[bg]), caption
        assert (np.abs(im - np.asarray(synthetic.NAMED_COLOURS[fg])).max(axis=1) == 0).sum() > 50, caption
        seen |= {fg, bg}
    assert seen == {"black", "white", "yellow"}
    with pytest.raises(ValueError, match="unknown colour.*'gray'"):
        synthetic.styled_caption("K", 0, fonts, ("plain",), 0.8, palette=("black", "gray"))
    with pytest.raises(ValueError, match=r"palette \['black', 'navy'\]: no two colours differ in luma"):
        synthetic.render_styled_text("K", 64, 64, 0, fonts, ("plain",), 0.8, named_colours=True,
                                     palette=("navy", "black"))


def test_jitter_zero_centres_the_text_and_the_default_keeps_the_middle_half():
    fonts = synthetic.resolve_fonts(("DejaVuSans-Bold",))

    def centre(seed: int, jitter: float) -> tuple[float, float]:
        im = synthetic.render_styled_text("K", 64, 64, seed, fonts, ("plain",), 1.0, named_colours=True, jitter=jitter)
        return tuple(np.argwhere((im != im[0, 0]).any(-1)).mean(0).round(1))

    assert len({centre(seed, 0.0) for seed in range(8)}) == 1  # scale 1, one face: the same place every time
    assert len({centre(seed, 1.0) for seed in range(8)}) > 4
    # the default (0.5): offsets within the middle half of the free space, as the corpus was always drawn
    for seed in range(8):
        im = synthetic.render_styled_text("K", 64, 64, seed, fonts, ("plain",), 1.0, named_colours=True)
        cols = np.flatnonzero((im != im[0, 0]).any(-1).any(0))
        free = 64 - (cols[-1] - cols[0] + 1)
        assert 0.25 * free - 2 <= cols[0] <= 0.75 * free + 2, (seed, cols[0], free)
    with pytest.raises(ValueError, match=r"jitter=1.5: expected a share of the free space in \[0, 1\]"):
        synthetic.render_styled_text("K", 64, 64, 0, fonts, ("plain",), 1.0, jitter=1.5)

"""Caption-language and OCR text-density filters (no Ray): the script detector, the filter order and
counts, config checks, and the filters inside the inspect stage."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from data_curation import config as curation_config
from data_curation import filters
from data_curation.config import FilterConfig
from data_curation.filters import (
    _SCRIPT_RANGES,
    ItemStats,
    filter_reason,
    script_counts,
    script_fraction,
    text_density,
)
from data_curation.media import encode_image
from data_curation.report import count_outcomes
from data_curation.sources import list_source
from data_curation.stages import InspectStage
from data_curation.synthetic import render_text_image
from lance_platform.config import ConfigError

CAPTIONS = {
    "en": 'a sign that says "OPEN"',
    "fr": "un panneau qui dit « OUVERT », très lisible",
    "zh": "一个写着“开放”的标志",
    "ja": "「オープン」と書かれた看板です",
    "ko": "열림이라고 쓰인 간판",
    "ru": "вывеска с надписью «ОТКРЫТО»",
    "ar": "لافتة مكتوب عليها مفتوح",
    "el": "μια πινακίδα που λέει ΑΝΟΙΧΤΟ",
    "hi": "एक बोर्ड जिस पर खुला लिखा है",
    "mixed": 'a shop sign that says "出口" in red',
    "digits": "2024 — 12:30 !!",
}


def stats(caption: str) -> ItemStats:
    return ItemStats(64, 96, False, 0.0, len(caption), 100.0, 0.0, caption_letters=script_counts(caption))


def test_script_ranges_are_sorted_and_disjoint():
    for (lo, hi, _), (nlo, _, _) in itertools.pairwise(_SCRIPT_RANGES):
        assert lo <= hi < nlo


def test_script_counts_per_language():
    dominant = {k: max(c, key=c.get) if (c := script_counts(v)) else None for k, v in CAPTIONS.items()}
    assert dominant == {"en": "latin", "fr": "latin", "zh": "han", "ja": "kana", "ko": "hangul", "ru": "cyrillic",
                        "ar": "arabic", "el": "greek", "hi": "devanagari", "mixed": "latin", "digits": None}
    assert script_counts("OPEN 出口") == {"latin": 4, "han": 2}
    assert set(script_counts(CAPTIONS["ja"])) == {"kana", "han"}
    assert script_fraction(script_counts(CAPTIONS["mixed"]), ("latin",)) == pytest.approx(22 / 24)
    assert script_fraction({}, ("latin",)) == 1.0  # no letters: nothing to judge


@pytest.mark.parametrize(("allowed", "kept"), [
    (("latin",), {"en", "fr", "mixed", "digits"}),
    (("en",), {"en", "fr", "mixed", "digits"}),             # a language code stands for its script
    (("cjk",), {"zh", "ja", "ko", "digits"}),
    (("ja",), {"zh", "ja", "digits"}),                      # han + kana: Chinese is not told apart
    (("ru", "el", "latin"), {"en", "fr", "ru", "el", "mixed", "digits"}),
    ((), set(CAPTIONS)),                                    # off
])
def test_caption_language_filter(allowed, kept):
    cfg = FilterConfig(caption_scripts=allowed)
    cfg.validate()
    got = {k for k, v in CAPTIONS.items() if filter_reason(stats(v), cfg) is None}
    assert got == kept
    assert all(filter_reason(stats(CAPTIONS[k]), cfg) == "caption_language" for k in set(CAPTIONS) - kept)


def test_caption_language_fraction_and_order():
    strict = FilterConfig(caption_scripts=("latin",), min_script_fraction=0.95)
    assert filter_reason(stats(CAPTIONS["mixed"]), strict) == "caption_language"     # 22/24 < 0.95
    both = FilterConfig(caption_scripts=("latin",), min_caption_chars=40)
    assert filter_reason(stats(CAPTIONS["zh"]), both) == "caption_length"           # the earlier filter names it
    detail = filters.filter_detail(stats(CAPTIONS["ru"]), strict, "caption_language")
    assert "'cyrillic': 23" in detail and "0.00 in ['latin']" in detail


def test_filter_config_checks():
    with pytest.raises(ConfigError, match="unknown script or language 'klingon'"):
        FilterConfig(caption_scripts=("latin", "klingon")).validate()
    with pytest.raises(ConfigError, match=r"filters.min_script_fraction=1.5: expected a fraction"):
        FilterConfig(caption_scripts=("latin",), min_script_fraction=1.5).validate()
    with pytest.raises(ConfigError, match="max_text_density"):
        FilterConfig(max_text_density=-0.1).validate()


def test_filter_config_refuses_ocr_without_rapidocr(monkeypatch):
    monkeypatch.setattr(curation_config, "ocr_available", lambda: False)
    FilterConfig().validate()  # off: fine without rapidocr
    with pytest.raises(ConfigError, match="needs rapidocr"):
        FilterConfig(min_text_density=0.05).validate()


def write_folder(root, items: dict[str, tuple[np.ndarray, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, (image, _) in items.items():
        (root / name).write_bytes(encode_image(image))
    (root / "captions.jsonl").write_text("\n".join(json.dumps({"path": n, "caption": c}, ensure_ascii=False)
                                                   for n, (_, c) in items.items()) + "\n")


def inspect_folder(cfg) -> dict[str, dict]:
    stage = InspectStage(cfg)
    return {i.source_uri.rsplit("/", 1)[1]: stage.inspect(i.__dict__) for i in list_source(cfg.sources[0])}


def test_inspect_counts_caption_language_like_other_filters(tmp_path, folder_config):
    words = ("OPEN", "STOP", "EXIT", "SALE", "CAFE", "TAXI", "PARK", "GO")
    items = {f"img_{k}.png": (render_text_image(w, 64, 96, seed=i), CAPTIONS[k])
             for i, (k, w) in enumerate(zip(("en", "fr", "zh", "ja", "ko", "ru", "mixed", "ar"), words))}
    write_folder(tmp_path / "corpus", items)
    cfg = folder_config(tmp_path / "corpus", tmp_path / "out", "filters.caption_scripts=[en]")
    rows = inspect_folder(cfg)
    assert {n for n, r in rows.items() if r["status"] == "ok"} == {"img_en.png", "img_fr.png", "img_mixed.png"}
    assert count_outcomes(list(rows.values())) == {"filtered": {"caption_language": 5}}
    assert "'hangul'" in rows["img_ko.png"]["detail"]
    off = inspect_folder(folder_config(tmp_path / "corpus", tmp_path / "out"))
    assert all(r["status"] == "ok" for r in off.values())


# ---------------------------------------------------------------------------------------- OCR text density
ocr = pytest.mark.skipif(not curation_config.ocr_available(), reason="rapidocr is not installed")


@ocr
def test_text_density_rendered_text_vs_blank():
    text = render_text_image("OPEN", 64, 96, seed=1)[None]
    words = render_text_image("HELLO", 256, 384, seed=2)[None]
    assert 0.15 < text_density(text) < 0.8
    assert 0.1 < text_density(words) < 0.8
    for blank in (np.full((1, 64, 96, 3), 255, np.uint8), np.full((1, 128, 256, 3), 90, np.uint8),
                  render_text_image("", 64, 96, seed=1)[None]):   # a flat purple the detector fires on
        assert text_density(blank) == 0.0
    cfg = FilterConfig(min_text_density=0.05)
    with_text = ItemStats(64, 96, False, 0.0, 10, 100.0, 0.0, text_density=text_density(text))
    assert filter_reason(with_text, cfg) is None
    assert filter_reason(ItemStats(64, 96, False, 0.0, 10, 100.0, 0.0, text_density=0.0), cfg) == "text_density"
    assert filter_reason(with_text, FilterConfig(max_text_density=0.1)) == "text_density"


@ocr
def test_inspect_text_density_filter_only_when_asked(tmp_path, folder_config, monkeypatch):
    blank = np.full((64, 96, 3), 255, np.uint8)
    blank[::2, ::2] = 0  # sharp (passes the blur filter) but holds no text
    items = {"text.png": (render_text_image("SALE", 64, 96, seed=3), "a sign that says SALE"),
             "blank.png": (blank, "a fine checkerboard")}
    write_folder(tmp_path / "corpus", items)
    rows = inspect_folder(folder_config(tmp_path / "corpus", tmp_path / "out", "filters.min_text_density=0.05"))
    assert (rows["text.png"]["status"], rows["blank.png"]["status"]) == ("ok", "filtered")
    assert rows["blank.png"]["reason"] == "text_density" and "density 0.000" in rows["blank.png"]["detail"]

    def no_ocr(frames):
        raise AssertionError("OCR ran although its filter is off")

    monkeypatch.setattr("data_curation.stages.text_density", no_ocr)
    rows = inspect_folder(folder_config(tmp_path / "corpus", tmp_path / "out"))
    assert all(r["status"] == "ok" for r in rows.values())


@pytest.mark.parametrize(("reason", "cfg", "changes", "expected"), [
    ("resolution", FilterConfig(min_side=128), {}, "96x64 (min side 128, max side 0)"),
    ("aspect", FilterConfig(max_aspect=1.2), {}, "aspect 1.50 (max 1.2)"),
    ("duration", FilterConfig(min_seconds=2.0), {"is_video": True, "duration": 1.25}, "1.25 s (min 2.0, max 0.0)"),
    ("caption_length", FilterConfig(min_caption_chars=100), {}, "characters (min 100, max 0)"),
    ("blur", FilterConfig(min_blur=50.0), {"blur": 12.345}, "blur score 12.35 (min 50.0)"),
    ("static", FilterConfig(min_motion=1.0), {"is_video": True, "motion": 0.0421}, "motion score 0.042 (min 1.0)"),
])
def test_every_filter_puts_its_measured_value_in_the_quarantine_detail(reason, cfg, changes, expected):
    import dataclasses

    s = dataclasses.replace(stats(CAPTIONS["en"]), height=64, width=96, **changes)
    assert filter_reason(s, cfg) == reason
    assert expected in filters.filter_detail(s, cfg, reason)

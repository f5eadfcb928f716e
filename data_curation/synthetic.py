"""Synthetic corpora for demos, tests and the text-rendering recipe: rendered text, so success is
checkable (OCR can read the text back), nothing is downloaded, and everything is deterministic for
a seed.

- images of a word with the word as caption (t2i), short MP4s of a sliding word and a falling square
  (t2v), edit pairs "change the text to X" (i2i) and question/answer pairs about a sign (i2t):
  `synthetic_specs` + `render_item` feed the `synthetic` curation source with real PNG/MP4 bytes.
- By default (`SyntheticSpec.vocabulary: 0`) the words cycle through the small built-in `WORDS`
  and every image is the default font, centred, on a plain background (the demo and the tests).
- With `vocabulary: N` the words come from `generated_vocabulary`: N distinct pronounceable words
  built from the syllable tables below (no word list is downloaded). The last `heldout` of them
  form the held-out split that the `train` split never contains (`vocabulary_split`), so a
  held-out evaluation measures rendering and reading of unseen words. `phrase_fraction` of the
  train items are two-word phrases (rendered on two lines). `fonts: system` draws each item's font
  from the DejaVu TTFs on the machine plus Pillow's default (a machine without them falls back to
  the default font and logs so); a list of faces (`[default, DejaVuSans-Bold, /path/to/face.ttf]`)
  draws from exactly those (`resolve_fonts`; a face that is not found is an error), `backgrounds` picks plain / gradient / noise, `min_text_scale`
  shrinks the glyphs by a random factor, and colours are random with a minimum contrast.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_curation.media import Fetched, encode_image, encode_video

log = logging.getLogger(__name__)

WORDS = ("OPEN", "STOP", "EXIT", "SALE", "CAFE", "GO", "HELLO", "LANCE", "RAY", "DATA", "PARK", "TAXI")

# Syllable tables of the generated vocabulary: onset + vowel + optional coda, two syllables a word
# (4 to 6 capital letters; 16 * 5 * 8 = 640 syllables, so ~400,000 possible words).
ONSETS = ("B", "D", "F", "G", "H", "K", "L", "M", "N", "P", "R", "S", "T", "V", "W", "Z")
VOWELS = ("A", "E", "I", "O", "U")
CODAS = ("", "K", "L", "M", "N", "R", "S", "T")
FONT_GLOB = "/usr/share/fonts/**/DejaVu*.ttf"
# Faces too thin or symbol-only to be read reliably at small sizes.
_SKIPPED_FONTS = ("ExtraLight", "MathTeX")
DEFAULT_FONT = "default"  # Pillow's built-in scalable font
MIN_CONTRAST = 110  # minimum |luma(text) - luma(background)|, 0-255


# ---------------------------------------------------------------------------------------- vocabulary
@functools.lru_cache(maxsize=8)
def generated_vocabulary(size: int, seed: int = 0) -> tuple[str, ...]:
    """`size` distinct two-syllable words, in a deterministic order for `seed`."""
    syllables = [o + v + c for o in ONSETS for v in VOWELS for c in CODAS]
    if size > len(syllables) ** 2:
        raise ValueError(f"vocabulary={size}: at most {len(syllables) ** 2} words can be generated")
    rng = random.Random(f"vocabulary-{seed}")
    words: dict[str, None] = {}
    while len(words) < size:
        words.setdefault(rng.choice(syllables) + rng.choice(syllables))
    return tuple(words)


def vocabulary_split(size: int, heldout: int, seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train words, held-out words): the last `heldout` words of the vocabulary are held out."""
    if not 0 <= heldout < size:
        raise ValueError(f"heldout={heldout}: expected 0 <= heldout < vocabulary={size} (training needs words)")
    words = generated_vocabulary(size, seed)
    return words[:size - heldout], words[size - heldout:]


def split_words(spec) -> tuple[str, ...]:
    """The words the spec's `split` draws from (the built-in WORDS when no vocabulary is generated)."""
    if not spec.vocabulary:
        return WORDS
    seed = spec.seed if getattr(spec, "vocabulary_seed", None) is None else spec.vocabulary_seed
    train, held = vocabulary_split(spec.vocabulary, spec.heldout, seed)
    return held if spec.split == "heldout" else train


# ---------------------------------------------------------------------------------------- rendering
def render_text_image(text: str, height: int, width: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 [H, W, 3] image: `text` in a contrasting colour, centred on a plain background."""
    rng = random.Random(seed)
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    fg = tuple(255 - c for c in bg)
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    size = max(8, int(min(height, width / max(len(text), 1) * 1.6) * 0.6))
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (width - (right - left)) // 2 - left
    y = (height - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=fg, font=font)
    return np.asarray(img)


@functools.lru_cache(maxsize=1)
def system_fonts() -> tuple[str, ...]:
    """Pillow's default font plus the DejaVu TTFs found on this machine (sorted, so every process
    of a run draws the same font for an item)."""
    found = sorted(p for p in glob.glob(FONT_GLOB, recursive=True) if not any(s in p for s in _SKIPPED_FONTS))
    if not found:
        log.warning("no DejaVu TTF fonts under /usr/share/fonts: synthetic text uses Pillow's default font only")
    return (DEFAULT_FONT, *found)


def resolve_fonts(fonts) -> tuple[str, ...]:
    """The font files a spec's `fonts` names: `default` (Pillow's font only), `system` (see
    `system_fonts`), or a sequence of faces, each `default`, a face name found under
    /usr/share/fonts (`DejaVuSans-Bold`, with or without `.ttf`) or a path to a TTF/OTF file.
    Raises ValueError naming the faces that are not found."""
    if fonts == "system":
        return system_fonts()
    if fonts in (None, DEFAULT_FONT):
        return (DEFAULT_FONT,)
    if isinstance(fonts, str):
        fonts = (fonts,)
    found, missing = [], []
    for face in fonts:
        if face == DEFAULT_FONT:
            found.append(DEFAULT_FONT)
            continue
        path = _face_path(face)
        (found if path else missing).append(path or face)
    if missing:
        raise ValueError(f"font(s) {missing} not found (a face name under {FONT_DIR}, e.g. DejaVuSans-Bold, "
                         f"a .ttf/.otf path, or 'default')")
    return tuple(found)


FONT_DIR = "/usr/share/fonts"


@functools.lru_cache(maxsize=64)
def _face_path(face: str) -> str | None:
    if "/" in face:
        return face if os.path.isfile(face) else None
    stems = (face,) if face.lower().endswith((".ttf", ".otf")) else (f"{face}.ttf", f"{face}.otf")
    for stem in stems:
        hits = sorted(glob.glob(f"{FONT_DIR}/**/{stem}", recursive=True))
        if hits:
            return hits[0]
    return None


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size) if name == DEFAULT_FONT else ImageFont.truetype(name, size)


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def contrasting_colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, text) colours whose luma differs by at least MIN_CONTRAST."""
    while True:
        bg = tuple(rng.randint(0, 255) for _ in range(3))
        fg = tuple(rng.randint(0, 255) for _ in range(3))
        if abs(_luma(bg) - _luma(fg)) >= MIN_CONTRAST:
            return bg, fg


# The named colours of styled captions (`captions: styled`): each colour a caption names is one RGB
# value, so the caption pins the image's colours down.
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "white": (255, 255, 255), "red": (215, 25, 30), "green": (30, 150, 60),
    "blue": (35, 70, 215), "yellow": (250, 215, 35), "orange": (245, 135, 20), "purple": (125, 40, 165),
    "pink": (245, 130, 185), "brown": (115, 65, 25), "grey": (128, 128, 128), "cyan": (40, 200, 215),
    "navy": (20, 30, 95), "maroon": (105, 10, 30),
}
BACKGROUND_PHRASES = {"plain": "a plain {} background", "gradient": "a {} gradient background",
                      "noise": "a noisy {} background"}


def contrasting_named_colours(rng: random.Random, palette: tuple[str, ...] | None = None) -> tuple[str, str]:
    """(background, text) colour names of NAMED_COLOURS (or of `palette`, some of its names) whose
    luma differs by at least MIN_CONTRAST."""
    names = sorted(NAMED_COLOURS) if palette is None else check_palette(palette)
    while True:
        bg, fg = rng.choice(names), rng.choice(names)
        if abs(_luma(NAMED_COLOURS[bg]) - _luma(NAMED_COLOURS[fg])) >= MIN_CONTRAST:
            return bg, fg


def check_palette(palette: tuple[str, ...]) -> list[str]:
    """`palette`'s names, sorted, after checking that each is a NAMED_COLOURS name and that two of
    them contrast (else a ValueError naming what is wrong)."""
    unknown = [name for name in palette if name not in NAMED_COLOURS]
    if unknown:
        raise ValueError(f"palette: unknown colour(s) {', '.join(map(repr, unknown))}; expected some of "
                         f"{', '.join(sorted(NAMED_COLOURS))}")
    names = sorted(set(palette))
    if not any(abs(_luma(NAMED_COLOURS[a]) - _luma(NAMED_COLOURS[b])) >= MIN_CONTRAST for a in names for b in names):
        raise ValueError(f"palette {names}: no two colours differ in luma by {MIN_CONTRAST} or more "
                         "(text would not stand out from its background)")
    return names


def face_name(font: str) -> str:
    """How a styled caption names a font file: its file name without the extension
    (`DejaVuSerif-Bold`), `default` for Pillow's font."""
    return font if font == DEFAULT_FONT else os.path.splitext(os.path.basename(font))[0]


@dataclasses.dataclass(frozen=True)
class TextStyle:
    """The random choices behind one styled render (`text_style`)."""

    font: str                        # a font file or DEFAULT_FONT
    background: str                  # plain | gradient | noise
    bg: tuple[int, int, int]
    fg: tuple[int, int, int]
    scale: float                     # glyphs shrunk by this factor of the fitted size
    bg_name: str | None = None       # the colours' names when drawn from NAMED_COLOURS
    fg_name: str | None = None

    def describe(self) -> str:
        """The caption phrase of this style (named colours only)."""
        if self.bg_name is None or self.fg_name is None:
            raise ValueError("only a style with named colours can be described")
        ground = BACKGROUND_PHRASES[self.background].format(self.bg_name)
        if ground[2] in "aeiou":
            ground = "an" + ground[1:]
        return f"{self.fg_name} {face_name(self.font)} letters on {ground}"


def text_style(rng: random.Random, fonts: tuple[str, ...], backgrounds: tuple[str, ...], min_scale: float,
               named: bool = False, palette: tuple[str, ...] | None = None) -> TextStyle:
    """Draw one item's style from `rng` (font, background kind, colours, glyph scale, in that order);
    `named`: colours from NAMED_COLOURS (so a caption can name them; `palette`: from those of its
    names), else random RGB."""
    font = rng.choice(fonts)
    kind = rng.choice(backgrounds)
    if named:
        bg_name, fg_name = contrasting_named_colours(rng, palette)
        bg, fg = NAMED_COLOURS[bg_name], NAMED_COLOURS[fg_name]
    else:
        bg_name = fg_name = None
        bg, fg = contrasting_colours(rng)
    return TextStyle(font, kind, bg, fg, rng.uniform(min_scale, 1.0), bg_name, fg_name)


def background(kind: str, bg: tuple[int, int, int], height: int, width: int, rng: random.Random) -> np.ndarray:
    """A float [H, W, 3] background around colour `bg`: plain, a linear gradient (up to +-40 per
    channel along a random direction) or Gaussian noise (sigma 12), clipped to [0, 255]."""
    base = np.broadcast_to(np.asarray(bg, dtype=np.float32), (height, width, 3)).copy()
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (np.cos(angle) * (xx / max(width - 1, 1) - 0.5) + np.sin(angle) * (yy / max(height - 1, 1) - 0.5))
        delta = np.asarray([rng.uniform(-80, 80) for _ in range(3)], dtype=np.float32)
        base += ramp[..., None] * delta
    elif kind == "noise":
        base += np.random.default_rng(rng.getrandbits(32)).normal(0.0, 12.0, base.shape).astype(np.float32)
    elif kind != "plain":
        raise ValueError(f"background={kind!r}: expected plain, gradient or noise")
    return np.clip(base, 0, 255)


def render_styled_text(text: str, height: int, width: int, seed: int, fonts: tuple[str, ...],
                       backgrounds: tuple[str, ...], min_scale: float, named_colours: bool = False,
                       layout: str = "fitted", cells: int = 6, palette: tuple[str, ...] | None = None,
                       jitter: float = 0.5) -> np.ndarray:
    """RGB uint8 [H, W, 3]: `text` (a space starts a new line) in a font of `fonts`, in a colour
    contrasting with a background of `backgrounds` (`text_style` draws these from `seed`;
    `styled_caption` names them; `palette`: the named colours drawn from), laid out by `layout`:

    - `fitted`: the lines fitted to ~90% of the width and ~80% of the height, shrunk by a random
      factor in [min_scale, 1], placed at a random offset (a share of the free space within
      `jitter` / 2 of the middle; 0: centred);
    - `cells`: a sign board of `cells` letter cells across the width, the i-th letter of a line
      centred in the i-th cell from the left (glyphs as wide as a cell, shrunk by the same random
      factor), the lines at a random height. Letter i then always sits in the same columns of the
      image, whatever the word's length and font."""
    rng = random.Random(seed)
    style = text_style(rng, fonts, backgrounds, min_scale, named_colours, palette)
    lines = text.split()
    canvas = Image.fromarray(background(style.background, style.bg, height, width, rng).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if layout == "cells":
        _draw_cells(draw, lines, height, width, cells, style, rng)
        return np.asarray(canvas)
    if layout != "fitted":
        raise ValueError(f"layout={layout!r}: expected 'fitted' or 'cells'")
    block = "\n".join(lines)
    probe_size = 64
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.multiline_textbbox((0, 0), block, font=_font(style.font, probe_size),
                                                        align="center")
    fit = min(0.9 * width / max(right - left, 1), 0.8 * height / max(bottom - top, 1))
    font = _font(style.font, max(6, int(probe_size * fit * style.scale)))
    left, top, right, bottom = draw.multiline_textbbox((0, 0), block, font=font, align="center")
    slack_x, slack_y = max(width - (right - left), 0), max(height - (bottom - top), 0)
    if not 0 <= jitter <= 1:
        raise ValueError(f"jitter={jitter}: expected a share of the free space in [0, 1]")
    x = int(rng.uniform(0.5 - jitter / 2, 0.5 + jitter / 2) * slack_x) - left
    y = int(rng.uniform(0.5 - jitter / 2, 0.5 + jitter / 2) * slack_y) - top
    draw.multiline_text((x, y), block, fill=style.fg, font=font, align="center")
    return np.asarray(canvas)


def _draw_cells(draw: ImageDraw.ImageDraw, lines: list[str], height: int, width: int, cells: int,
                style: TextStyle, rng: random.Random) -> None:
    """The `cells` layout of `render_styled_text`: letter i of a line centred in cell i."""
    longest = max((len(line) for line in lines), default=0)
    if longest > cells:
        raise ValueError(f"layout=cells: the line {max(lines, key=len)!r} has {longest} letters, more than "
                         f"cells={cells}")
    cell = width / cells
    row = 0.8 * height / max(len(lines), 1)
    # a glyph's width is about 0.6-0.8 of its font size in these faces: size 1.25 cells fills a cell
    font = _font(style.font, max(6, int(min(1.25 * cell, 0.75 * row) * style.scale)))
    top = rng.uniform(0.1, 0.2) * height  # the block's 80% of the height starts 10-20% down
    for r, line in enumerate(lines):
        y = top + (r + 0.5) * row
        for i, ch in enumerate(line):
            draw.text(((i + 0.5) * cell, y), ch, fill=style.fg, font=font, anchor="mm")


def styled_caption(text: str, seed: int, fonts: tuple[str, ...], backgrounds: tuple[str, ...],
                   min_scale: float, text_last: bool = False, palette: tuple[str, ...] | None = None) -> str:
    """The caption of `render_styled_text(text, ..., seed, ..., named_colours=True)`: the text and the
    style it is drawn in, e.g. `a sign that says "BALO" in white DejaVuSerif-Bold letters on a noisy
    navy background`; `text_last`: the style first and the text at the caption's end, `a sign in white
    DejaVuSerif-Bold letters on a noisy navy background that says "BALO"`, so that the letters'
    distances from the image's tokens depend on the text alone, not on the style's words."""
    style = text_style(random.Random(seed), fonts, backgrounds, min_scale, named=True, palette=palette)
    if text_last:
        return f'a sign in {style.describe()} that says "{text}"'
    return f"{image_caption(text)} in {style.describe()}"


def text_image_records(n: int, height: int, width: int, seed: int = 0) -> list[dict]:
    """`n` records {text, caption, image} with a word drawn from WORDS per record."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = rng.choice(WORDS)
        out.append({"text": word, "caption": f'a sign that says "{word}"',
                    "image": render_text_image(word, height, width, seed=seed * 100003 + i)})
    return out


# ---------------------------------------------------------------------------------------- videos
def render_moving_video(text: str, height: int, width: int, num_frames: int, seed: int = 0) -> np.ndarray:
    """[F, H, W, 3] uint8: `text` sliding left to right while a square falls, on a plain background."""
    rng = random.Random(seed)
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    fg = tuple(255 - c for c in bg)
    font = ImageFont.load_default(size=max(8, height // 3))
    side = max(4, height // 6)
    frames = []
    for i in range(num_frames):
        t = i / max(num_frames - 1, 1)
        img = Image.new("RGB", (width, height), bg)
        draw = ImageDraw.Draw(img)
        draw.text((int(t * width * 0.5), height // 3), text, fill=fg, font=font)
        x0, y0 = width - 2 * side, int(t * (height - side))
        draw.rectangle((x0, y0, x0 + side, y0 + side), fill=fg)
        frames.append(np.asarray(img))
    return np.stack(frames)


# ---------------------------------------------------------------------------------------- corpus items
QUESTION = "What does the sign say?"


def image_caption(word: str) -> str:
    return f'a sign that says "{word}"'


def video_caption(word: str) -> str:
    return f'the word "{word}" slides to the right while a square falls'


def edit_caption(word: str) -> str:
    return f'change the text to "{word}"'


ALPHABET = "".join(sorted(set("".join(ONSETS + VOWELS + CODAS))))  # the letters generated words use


def _vocabulary_text(words: tuple[str, ...], rng: random.Random, spec, position: int) -> str:
    """One item's text from a generated vocabulary: the held-out split cycles through its words in
    order (each once per cycle); the train split draws, with probability `letters_fraction`, a
    string of 1 to 3 letters of the vocabulary's alphabet (never a word: words have 4 to 6), else
    with probability `prefix_fraction` a word's first 1 to len-1 letters (`prefix_letters`: exactly
    that many, of a word longer than that), else two-word phrases with probability `phrase_fraction`,
    else words."""
    if spec.split == "heldout":
        return words[position % len(words)]
    if getattr(spec, "letters_fraction", 0.0) and rng.random() < spec.letters_fraction:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 3)))
    if getattr(spec, "prefix_fraction", 0.0) and rng.random() < spec.prefix_fraction:
        k = getattr(spec, "prefix_letters", None)
        if k is None:
            word = rng.choice(words)
            return word[: rng.randint(1, len(word) - 1)]
        return rng.choice(_longer_than(words, k))[:k]
    if rng.random() < spec.phrase_fraction:
        return f"{rng.choice(words)} {rng.choice(words)}"
    return rng.choice(words)


@functools.cache
def _longer_than(words: tuple[str, ...], letters: int) -> tuple[str, ...]:
    return tuple(w for w in words if len(w) > letters)


def longest_line(spec) -> int:
    """The most letters on one line of any text the spec's split can draw (a phrase's two words are
    two lines; `letters_fraction` strings have at most 3)."""
    return max(max(len(w) for w in split_words(spec)), 3 if getattr(spec, "letters_fraction", 0.0) else 0)


def synthetic_specs(spec) -> list[dict]:
    """The items a `SyntheticSpec` describes: distinct words per kind (cycling through WORDS), or
    words and phrases of the spec's split of a generated vocabulary."""
    words = split_words(spec)
    items = []
    counts = (("image", "t2i", spec.images), ("video", "t2v", spec.videos), ("edit", "i2i", spec.edits),
              ("qa", "i2t", spec.qa))
    for k, (kind, task, n) in enumerate(counts):
        rng = random.Random(f"{spec.seed}-{spec.split}-{kind}")
        for i in range(n):
            seed = spec.seed * 100003 + k * 1009 + i
            if spec.vocabulary:
                word, other = _vocabulary_text(words, rng, spec, i), _vocabulary_text(words, rng, spec, i + 1)
                seed = (seed * 7 + 3) if spec.split == "heldout" else seed
            else:
                word = WORDS[(spec.seed + 3 * k + i) % len(WORDS)]
                other = WORDS[(spec.seed + 3 * k + i + 5) % len(WORDS)]
            items.append({"kind": kind, "task": task, "index": i, "word": word, "other": other, "seed": seed})
    return items


STYLED_CAPTIONS = ("styled", "styled_text_last")  # the `captions` values that name the style


def _styled(spec: dict) -> bool:
    return bool(spec.get("vocabulary")) and spec.get("captions", "plain") in STYLED_CAPTIONS


def _render_image(spec: dict, text: str, seed: int) -> np.ndarray:
    h, w = spec["height"], spec["width"]
    if not spec.get("vocabulary"):
        return render_text_image(text, h, w, seed)
    fonts = resolve_fonts(spec.get("fonts", DEFAULT_FONT))
    return render_styled_text(text, h, w, seed, fonts, tuple(spec["backgrounds"]), spec["min_text_scale"],
                              named_colours=_styled(spec), layout=spec.get("layout", "fitted"),
                              cells=spec.get("cells", 6))


def t2i_caption(spec: dict, text: str, seed: int) -> str:
    """The caption of the t2i image of `text` rendered with `seed` under `spec` (a SyntheticSpec as a
    dict): `styled_caption` with `captions: styled` (the text first) or `styled_text_last`, else
    `image_caption`. Prompts written with it (an evaluation's, GRPO's) ask for what the corpus shows."""
    if not _styled(spec):
        return image_caption(text)
    return styled_caption(text, seed, resolve_fonts(spec.get("fonts", DEFAULT_FONT)), tuple(spec["backgrounds"]),
                          spec["min_text_scale"], text_last=spec["captions"] == "styled_text_last")


def t2i_prompts(spec) -> list[tuple[str, str]]:
    """(text, caption) of every t2i item a `SyntheticSpec` describes, in item order."""
    as_dict = dataclasses.asdict(spec)
    return [(item["word"], t2i_caption(as_dict, item["word"], item["seed"]))
            for item in synthetic_specs(spec) if item["kind"] == "image"]


def render_item(spec: dict, item: dict):
    """One synthetic item -> `Fetched` (real PNG / MP4 bytes, so the pipeline decodes as for files)."""
    h, w, word, seed = spec["height"], spec["width"], item["word"], item["seed"]
    kind = item["kind"]
    question = spec.get("question", QUESTION)
    text: dict[str, bytes | None] = {"caption": None, "question": None, "answer": None}
    if kind == "video":
        frames = render_moving_video(word, h, w, max(1, round(spec["video_seconds"] * spec["video_fps"])), seed)
        media = {"target": (encode_video(frames, spec["video_fps"]), "video")}
        text["caption"] = video_caption(word).encode()
    elif kind == "edit":
        media = {"source": (encode_image(_render_image(spec, word, seed)), "image"),
                 "target": (encode_image(_render_image(spec, item["other"], seed)), "image")}
        text["caption"] = edit_caption(item["other"]).encode()
    elif kind == "qa":
        media = {"source": (encode_image(_render_image(spec, word, seed)), "image")}
        # no caption: an x2t row's caption is its instruction (the system prompt), and one naming the word
        # would hand the model the answer
        text.update(question=question.encode(), answer=word.encode())
    else:
        media = {"target": (encode_image(_render_image(spec, word, seed)), "image")}
        text["caption"] = t2i_caption(spec, word, seed).encode()
    return Fetched(media, text)

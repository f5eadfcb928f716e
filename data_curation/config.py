"""The curation config: typed dataclasses loaded from `configs/curation/*.yaml` plus CLI overrides.

One `CurationConfig` drives a whole run (`curate` or `refresh`). It is loaded with the shared
`lance_platform.config.load_config` (unknown keys and bad values fail before any work starts, naming
the field) and logged, resolved, as the MLflow run's params. The encoders are NOT described here:
they come from a model preset or checkpoint (`model`), so curated latents always match the model
that trains on them; only how they are run (batch sizes, pool sizes, GPUs) is configured.
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field, Strict

from lance_model.config import PresetName
from lance_model.configio import (
    Fraction,
    Int,
    NonEmptyStr,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check_types,
    configclass,
    require,
)
from lance_platform.config import ConfigError

SourceKind = Literal["folder", "webdataset", "parquet", "synthetic"]
ParquetLayout = Literal["t2i", "t2v", "i2i", "v2v", "i2t", "v2t"]
SOURCE_KINDS: tuple[str, ...] = SourceKind.__args__
PARQUET_LAYOUTS: tuple[str, ...] = ParquetLayout.__args__
BUCKET_RATIOS = {"21:9": 21 / 9, "16:9": 16 / 9, "4:3": 4 / 3, "1:1": 1.0, "3:4": 3 / 4, "9:16": 9 / 16}
BucketName = Literal[tuple(BUCKET_RATIOS)]
Channel = Annotated[int, Strict(), Field(ge=0, le=255)]
RGB = Annotated[tuple[Channel, Channel, Channel], Field(description="an RGB triple of integers in [0, 255]")]
# Scripts the caption-language filter tells apart (filters.py has their Unicode ranges), groups of
# them, and language codes that stand for their script(s).
SCRIPTS = ("latin", "greek", "cyrillic", "armenian", "hebrew", "arabic", "devanagari", "bengali", "gurmukhi",
           "gujarati", "oriya", "tamil", "telugu", "kannada", "malayalam", "sinhala", "thai", "lao", "tibetan",
           "myanmar", "georgian", "ethiopic", "khmer", "hangul", "kana", "bopomofo", "han", "other")
SCRIPT_GROUPS = {"cjk": ("han", "kana", "hangul", "bopomofo")}
LANGUAGE_SCRIPTS = {
    **{code: ("latin",) for code in ("en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi", "pl", "cs",
                                     "ro", "hu", "tr", "id", "vi", "ms", "sw")},
    **{code: ("cyrillic",) for code in ("ru", "uk", "bg", "be", "kk", "mk")},
    "el": ("greek",), "he": ("hebrew",), "ar": ("arabic",), "fa": ("arabic",), "ur": ("arabic",),
    "hi": ("devanagari",), "mr": ("devanagari",), "ne": ("devanagari",), "bn": ("bengali",), "ta": ("tamil",),
    "th": ("thai",), "ka": ("georgian",), "zh": ("han", "bopomofo"), "ja": ("han", "kana"), "ko": ("hangul", "han"),
}


def language_scripts(name: str) -> tuple[str, ...]:
    """The scripts a `filters.caption_scripts` entry (script, group or language code) allows."""
    if name in SCRIPTS:
        return (name,)
    if name in SCRIPT_GROUPS:
        return SCRIPT_GROUPS[name]
    if name in LANGUAGE_SCRIPTS:
        return LANGUAGE_SCRIPTS[name]
    raise ConfigError(f"filters.caption_scripts: unknown script or language {name!r}; expected a script "
                      f"{SCRIPTS}, a group {tuple(SCRIPT_GROUPS)} or a language code {tuple(LANGUAGE_SCRIPTS)}")


def ocr_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("rapidocr") is not None and importlib.util.find_spec("onnxruntime") is not None


@configclass
class SyntheticSpec:
    """How many rendered items of each kind a `synthetic` source generates (deterministic per seed),
    and from which words (`data_curation.synthetic`). The defaults are the small demo corpus: the
    built-in word list, the default font, plain backgrounds."""

    images: NonNegativeInt = 8          # t2i: rendered-text image, caption names the text
    videos: NonNegativeInt = 2          # t2v: moving text + shape
    edits: NonNegativeInt = 2           # i2i: "change the text to X"
    qa: NonNegativeInt = 2              # i2t: `question` about the image, answer = its text
    height: PositiveInt = 64
    width: PositiveInt = 96
    video_seconds: PositiveFloat = 1.0
    video_fps: PositiveInt = 12
    seed: Int = 0
    # 0: the built-in word list; N: N generated pronounceable words, the last `heldout` of them
    # never in the `train` split (the `heldout` split is exactly those words, each once per cycle)
    vocabulary: Annotated[int, Strict(), Field(ge=0, le=100_000)] = 0
    heldout: NonNegativeInt = 0
    split: Literal["train", "heldout"] = "train"
    phrase_fraction: Fraction = 0.0     # train items that are two-word phrases (two lines)
    # train items that are 1-3 letters of the vocabulary's alphabet, drawn large: single glyphs teach
    # a model from scratch which shape is which letter before whole words can be read or written
    letters_fraction: Fraction = 0.0
    # train items (of those not drawn as letters) that are a training word's first k letters, k from 1
    # to the word's length less one: a word read or written a few letters at a time, its glyphs larger
    # the shorter the prefix (a growing-word curriculum's easy part)
    prefix_fraction: Fraction = 0.0
    # with prefix_fraction: exactly this many first letters, of the training words longer than that
    # (None: 1 to the word's length less one); sources of 1, 2, 3... letters make a curriculum's stages
    prefix_letters: Annotated[int, Strict(), Field(ge=1, le=31)] | None = None
    # the generated vocabulary's seed (None: `seed`): sources that draw from one vocabulary, with
    # renders of their own, share it and differ in `seed`
    vocabulary_seed: Int | None = None
    # generated vocabulary only: `default` = Pillow's font; `system` = the DejaVu TTFs on the machine
    # plus Pillow's default; or a list of faces: `default`, a face name under /usr/share/fonts
    # (`DejaVuSans-Bold`) or a .ttf/.otf path (each must exist)
    fonts: Literal["default", "system"] | Annotated[tuple[NonEmptyStr, ...], Field(min_length=1)] = "default"
    backgrounds: Annotated[tuple[Literal["plain", "gradient", "noise"], ...], Field(min_length=1)] = ("plain",)
    min_text_scale: Annotated[float, Field(gt=0, le=1)] = 1.0   # glyphs shrunk by a factor in [this, 1]
    question: NonEmptyStr = "What does the sign say?"
    # t2i captions: `plain` names the text (a sign that says "BALO"); `styled` (generated vocabulary
    # only) also names the style it is drawn in, with colours from a named palette (a sign that says
    # "BALO" in white DejaVuSerif-Bold letters on a noisy navy background), so that a caption pins
    # the image down up to the glyphs' scale and placement; `styled_text_last` names the style first and
    # the text at the caption's end (a sign in white DejaVuSerif-Bold letters on a noisy navy background
    # that says "BALO"), so the letters' distances from the image's tokens depend on the text alone,
    # not on the style's words
    captions: Literal["plain", "styled", "styled_text_last"] = "plain"
    # how the text is laid out (`render_styled_text`, generated vocabulary only): `fitted` to the
    # image; `cells`, a sign board of `cells` letter cells, the i-th letter of a line in the i-th cell
    layout: Literal["fitted", "cells"] = "fitted"
    cells: Annotated[int, Strict(), Field(ge=1, le=64)] = 6

    def validate(self, prefix: str) -> None:
        require(self.heldout == 0 or self.heldout < self.vocabulary, f"{prefix}.heldout", self.heldout,
                f"fewer held-out words than vocabulary={self.vocabulary} (0 when no vocabulary is generated)")
        require(self.captions == "plain" or self.vocabulary > 0, f"{prefix}.captions", self.captions,
                "'plain' unless a vocabulary is generated (styled captions describe the styled renders)")
        require(self.split == "train" or self.heldout > 0, f"{prefix}.split", self.split,
                "'train' unless heldout > 0 (the held-out split is the held-out words)")
        if self.prefix_letters is not None:
            from data_curation.synthetic import split_words

            require(self.prefix_fraction > 0 and self.vocabulary > 0, f"{prefix}.prefix_letters", self.prefix_letters,
                    "null unless prefix_fraction > 0 with a generated vocabulary (it sets the prefixes' length)")
            longest = max(len(w) for w in split_words(self))
            require(self.prefix_letters < longest, f"{prefix}.prefix_letters", self.prefix_letters,
                    f"fewer letters than the longest training word ({longest}): a prefix is part of a word")
        if self.layout == "cells":
            from data_curation.synthetic import longest_line

            require(self.vocabulary > 0, f"{prefix}.layout", self.layout,
                    "'fitted' unless a vocabulary is generated (the cells layout draws generated words)")
            longest = longest_line(self)
            require(self.cells >= longest, f"{prefix}.cells", self.cells,
                    f"at least {longest}, the letters of the longest line this source draws")
        if not isinstance(self.fonts, str):
            from data_curation.synthetic import resolve_fonts

            try:
                resolve_fonts(self.fonts)
            except ValueError as exc:
                raise ConfigError(f"{prefix}.fonts: {exc}", f"{prefix}.fonts") from None


@configclass
class SourceConfig:
    """One input corpus (DATA.md §1). `uri` is a local path or any pyarrow/fsspec filesystem URI.
    `follow_external_symlinks` (default false): whether a symlink under a local `uri` that resolves
    outside it is curated; when false such an item is quarantined as `symlink_outside_source`."""

    kind: SourceKind = "synthetic"
    name: NonEmptyStr = "synthetic"
    uri: str | None = None
    # folder: a JSONL/CSV of {path, caption[, task, source_path, question, answer]} relative to `uri`;
    # media files it does not list fall back to a sidecar `<stem>.txt`.
    captions: str | None = None
    # parquet: which official layout the files follow.
    layout: ParquetLayout | None = None
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    # local sources: a symlink under `uri` that resolves outside it is quarantined as
    # `symlink_outside_source` unless this is true (then it is read like any other file).
    follow_external_symlinks: bool = False

    def validate(self, prefix: str) -> None:
        """Cross-field rules (types and ranges are checked when the config is loaded)."""
        self.synthetic.validate(f"{prefix}.synthetic")
        if self.kind != "synthetic":
            require(bool(self.uri), f"{prefix}.uri", self.uri, f"a path or URI for a {self.kind} source")
        if self.kind == "parquet":
            require(self.layout is not None, f"{prefix}.layout", self.layout, f"one of {PARQUET_LAYOUTS}")


@configclass
class ModelRef:
    """Where the encoders come from: a Lance checkpoint directory, else a named preset (random ViT
    initialised from `seed`, identical in every actor)."""

    preset: PresetName = "tiny"
    checkpoint: str | None = None
    seed: Int = 0


@configclass
class DecodeConfig:
    target_fps: PositiveFloat = 12.0
    max_seconds: PositiveFloat = 6.0                 # generation videos
    understanding_max_seconds: PositiveFloat = 2.0   # i2t / v2t videos
    # RGB colour that transparent pixels are composited on (RGBA, LA, palette transparency)
    alpha_background: RGB = (255, 255, 255)
    # an animated image (GIF / WebP / APNG) where the task wants a still (t2i, i2i, i2t, an i2v
    # source): `quarantine` it as `animated_image`, or keep its `first_frame` (logged, and counted
    # as `animated.first_frame` / `animated.dropped_frames` in the report). Where the task wants a
    # video (t2v, i2v and v2v targets, v2t and v2v sources) it is always decoded as one.
    animated_images: Literal["quarantine", "first_frame"] = "quarantine"


@configclass
class ValidateConfig:
    """Hard limits: outside them an item is unusable and goes to quarantine (not a policy filter)."""

    min_side: PositiveInt = 16
    max_side: PositiveInt = 16384
    max_caption_chars: PositiveInt = 20000
    # decoded pixels per image or video frame (checked from the header, before decoding): above it an
    # item is quarantined as `too_many_pixels` (decompression bombs); 0 turns the check off
    max_pixels: NonNegativeInt = 40_000_000


@configclass
class FilterConfig:
    """Policy filters; each counts what it removes. 0 turns a check off."""

    min_side: NonNegativeInt = 0
    max_side: NonNegativeInt = 0
    max_aspect: NonNegativeFloat = 0.0        # long side / short side
    min_seconds: NonNegativeFloat = 0.0
    max_seconds: NonNegativeFloat = 0.0
    min_caption_chars: NonNegativeInt = 0
    max_caption_chars: NonNegativeInt = 0
    min_blur: NonNegativeFloat = 0.0          # Laplacian variance of the grey frame (0-255 scale)
    min_motion: NonNegativeFloat = 0.0        # mean absolute grey difference between sampled frames
    # caption language: allowed scripts / script groups / language codes (empty = off), and the share
    # of the caption's letters that must be in them (the rest may be quoted foreign text)
    caption_scripts: tuple[str, ...] = ()
    min_script_fraction: Fraction = 0.5
    # OCR text density (share of the frame inside detected text boxes; needs rapidocr; 0 = off)
    min_text_density: Fraction = 0.0
    max_text_density: Fraction = 0.0

    @property
    def text_density_on(self) -> bool:
        return bool(self.min_text_density or self.max_text_density)

    def validate(self) -> None:
        """Types and ranges (also of a FilterConfig built in code), known scripts, the OCR dependency."""
        check_types(self, "filters.")
        for name in self.caption_scripts:
            language_scripts(name)
        if self.text_density_on:
            require(ocr_available(), "filters.min_text_density/max_text_density",
                    (self.min_text_density, self.max_text_density),
                    "0 here: the OCR text-density filter needs rapidocr + onnxruntime, which are not installed")


@configclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    hamming_threshold: Annotated[int, Strict(), Field(ge=0, le=64)] = 6     # of 64 perceptual-hash bits


@configclass
class BucketConfig:
    """Aspect buckets and target areas (pixels) of the VAE copy and the ViT copy."""

    names: Annotated[tuple[BucketName, ...], Field(min_length=1)] = tuple(BUCKET_RATIOS)
    vae_image_area: PositiveInt = 768 * 768
    vae_video_area: PositiveInt = 640 * 640
    vit_image_area: PositiveInt = 448 * 448
    vit_video_area: PositiveInt = 336 * 336


@configclass
class EncodeConfig:
    """How the encoder actor pools run. `num_gpus`: per actor; "auto" = 1 when the cluster has GPUs."""

    vae: bool = True
    vit: bool = True
    store_logvar: bool = False
    vae_batch_size: PositiveInt = 8
    vit_batch_size: PositiveInt = 8
    vae_actors: PositiveInt = 1
    vit_actors: PositiveInt = 1
    actor_num_cpus: PositiveFloat = 1.0  # fractions allowed
    num_gpus: Literal["auto"] | NonNegativeFloat = "auto"
    torch_threads: PositiveInt = 1
    read_batch_size: PositiveInt = 16


@configclass
class OutputConfig:
    dir: NonEmptyStr = "runs/curation/out"
    target_shard_bytes: PositiveInt = 256 * 1024 * 1024
    # also store `<slot>_pixels`: the bucketed media (the VAE copy, else the ViT copy) as PNG (images)
    # or MP4 (videos) bytes, for evaluation; off by default (it makes shards much larger)
    store_pixels: bool = False


SCENE_TASKS = ("t2v", "i2v")
CAPTION_TASKS = ("t2i", "t2v", "i2v")
CaptionModelKind = Literal["lance", "qwen25vl"]


@configclass
class SceneConfig:
    """Scene splitting of long videos (PySceneDetect, no weights). When on, every t2v video (and an
    i2v video without a separate source image) is cut into scenes and each scene is its own sample:
    its span (`start_s`, `end_s`) is in the row, its frames are sampled inside it, and the duration
    filters (`filters.min_seconds` / `max_seconds`) judge each scene. `threshold`: the detector's cut
    threshold (content: change in HSV + edges, default 27; adaptive: ratio to the rolling average,
    default 3); `min_scene_seconds`: no cut closer than this to the previous one. `chunk_long`: a
    scene longer than the clip-length limit (`decode.max_seconds`, or `filters.max_seconds` when
    that is set and smaller) becomes consecutive clips within it, each a sample with its own span
    (`scenes.chunk_scene`); false: such a scene is one sample of its first `decode.max_seconds`."""

    enabled: bool = False
    detector: Literal["content", "adaptive"] = "content"
    threshold: PositiveFloat | None = None
    min_scene_seconds: NonNegativeFloat = 0.5
    chunk_long: bool = True

    def validate(self) -> None:
        if not self.enabled:
            return
        import importlib.util

        require(importlib.util.find_spec("scenedetect") is not None, "scenes.enabled", self.enabled,
                "false, or PySceneDetect installed: pip install 'lance-pipelines[scenes]'")


@configclass
class CaptionConfig:
    """Re-captioning with an understanding model read from `path` (a Lance checkpoint directory:
    its x2t path, greedy; or a Qwen2.5-VL checkpoint directory through transformers). The new caption
    replaces `caption` (so it is what gets tokenized and trained on); the original stays in
    `caption_original` and `caption_model` says `<model>:<path>`. Runs as a Ray Data actor pool of
    `actors` actors, `batch_size` items per model call, `num_gpus` per actor ("auto" = 1 when the
    cluster has GPUs). The model sees the item's VAE copy, scaled down to at most `max_area` pixels,
    and at most `max_frames` frames of a video spread over the clip."""

    enabled: bool = False
    model: CaptionModelKind = "lance"
    path: str | None = None
    batch_size: PositiveInt = 4
    actors: PositiveInt = 1
    num_gpus: Literal["auto"] | NonNegativeFloat = "auto"
    max_new_tokens: PositiveInt = 128
    prompt: NonEmptyStr = "Describe this image in detail."
    video_prompt: NonEmptyStr = "Describe this video in detail."
    max_area: PositiveInt = 448 * 448
    max_frames: PositiveInt = 16
    tasks: Annotated[tuple[Literal[CAPTION_TASKS], ...], Field(min_length=1)] = CAPTION_TASKS

    def validate(self, encode_vae: bool) -> None:
        if not self.enabled:
            return
        require(bool(self.path), "captioning.path", self.path,
                f"a local {self.model} checkpoint directory when captioning.enabled is true")
        from pathlib import Path

        require(Path(self.path).is_dir(), "captioning.path", self.path, "an existing checkpoint directory")
        require(encode_vae, "captioning.enabled", self.enabled,
                "false, or encode.vae: true (the captioner reads the item's VAE copy)")


@configclass
class TrackingConfig:
    enabled: bool = True
    workdir: str = "runs/curation"   # MLflow's embedded store lives here unless MLFLOW_TRACKING_URI is set
    experiment: str = "lance"


@configclass
class CurationConfig:
    sources: Annotated[tuple[SourceConfig, ...], Field(min_length=1)] = (SourceConfig(),)
    model: ModelRef = field(default_factory=ModelRef)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    checks: ValidateConfig = field(default_factory=ValidateConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    scenes: SceneConfig = field(default_factory=SceneConfig)
    captioning: CaptionConfig = field(default_factory=CaptionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray_address: str | None = None
    num_cpus: PositiveInt | None = None

    def validate(self) -> CurationConfig:
        """Types and ranges (also of values set in code), then the cross-field rules."""
        check_types(self)
        names = [s.name for s in self.sources]
        require(len(set(names)) == len(names), "sources[].name", names, "distinct source names")
        for i, source in enumerate(self.sources):
            source.validate(f"sources.{i}")
        self.filters.validate()
        require(self.encode.vae or self.encode.vit, "encode.vae/encode.vit", (self.encode.vae, self.encode.vit),
                "at least one encoder on")
        self.captioning.validate(self.encode.vae)
        self.scenes.validate()
        return self

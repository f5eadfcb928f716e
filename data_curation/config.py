"""The curation config: typed dataclasses loaded from `configs/curation/*.yaml` plus CLI overrides.

One `CurationConfig` drives a whole run (`curate` or `refresh`). It is loaded with the shared
`lance_platform.config.load_config` (unknown keys and bad values fail before any work starts, naming
the field) and logged, resolved, as the MLflow run's params. The encoders are NOT described here:
they come from a model preset or checkpoint (`model`), so curated latents always match the model
that trains on them; only how they are run (batch sizes, pool sizes, GPUs) is configured.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lance_platform.config import ConfigError

SOURCE_KINDS = ("folder", "webdataset", "parquet", "synthetic")
PARQUET_LAYOUTS = ("t2i", "t2v", "i2i", "v2v", "i2t", "v2t")
BUCKET_RATIOS = {"21:9": 21 / 9, "16:9": 16 / 9, "4:3": 4 / 3, "1:1": 1.0, "3:4": 3 / 4, "9:16": 9 / 16}
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


def _require(cond: bool, name: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r}: expected {expected}")


def _non_negative(name: str, value: Any) -> None:
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, name, value,
             "a non-negative number (0 turns the check off)")


def _positive_int(name: str, value: Any) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
             "a positive integer")


def ocr_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("rapidocr") is not None and importlib.util.find_spec("onnxruntime") is not None


@dataclass
class SyntheticSpec:
    """How many rendered items of each kind a `synthetic` source generates (deterministic per seed)."""

    images: int = 8          # t2i: rendered-text image, caption names the text
    videos: int = 2          # t2v: moving text + shape
    edits: int = 2           # i2i: "change the text to X"
    qa: int = 2              # i2t: "what does the sign say?"
    height: int = 64
    width: int = 96
    video_seconds: float = 1.0
    video_fps: int = 12
    seed: int = 0

    def validate(self, prefix: str) -> None:
        for name in ("images", "videos", "edits", "qa"):
            _non_negative(f"{prefix}.{name}", getattr(self, name))
        for name in ("height", "width", "video_fps"):
            _positive_int(f"{prefix}.{name}", getattr(self, name))
        _require(self.video_seconds > 0, f"{prefix}.video_seconds", self.video_seconds, "a positive duration")


@dataclass
class SourceConfig:
    """One input corpus (DATA.md §1). `uri` is a local path or any pyarrow/fsspec filesystem URI."""

    kind: str = "synthetic"
    name: str = "synthetic"
    uri: str | None = None
    # folder: a JSONL/CSV of {path, caption[, task, source_path, question, answer]} relative to `uri`;
    # media files it does not list fall back to a sidecar `<stem>.txt`.
    captions: str | None = None
    # parquet: which official layout the files follow.
    layout: str | None = None
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    # local sources: a symlink under `uri` that resolves outside it is quarantined as
    # `symlink_outside_source` unless this is true (then it is read like any other file).
    follow_external_symlinks: bool = False

    def validate(self, prefix: str) -> None:
        _require(self.kind in SOURCE_KINDS, f"{prefix}.kind", self.kind, f"one of {SOURCE_KINDS}")
        _require(isinstance(self.name, str) and bool(self.name), f"{prefix}.name", self.name, "a non-empty name")
        if self.kind != "synthetic":
            _require(isinstance(self.uri, str) and bool(self.uri), f"{prefix}.uri", self.uri,
                     f"a path or URI for a {self.kind} source")
        if self.kind == "parquet":
            _require(self.layout in PARQUET_LAYOUTS, f"{prefix}.layout", self.layout, f"one of {PARQUET_LAYOUTS}")
        self.synthetic.validate(f"{prefix}.synthetic")
        _require(isinstance(self.follow_external_symlinks, bool), f"{prefix}.follow_external_symlinks",
                 self.follow_external_symlinks, "true or false")


@dataclass
class ModelRef:
    """Where the encoders come from: a Lance checkpoint directory, else a named preset (random ViT
    initialised from `seed`, identical in every actor)."""

    preset: str = "tiny"
    checkpoint: str | None = None
    seed: int = 0


@dataclass
class DecodeConfig:
    target_fps: float = 12.0
    max_seconds: float = 6.0                 # generation videos
    understanding_max_seconds: float = 2.0   # i2t / v2t videos
    # RGB colour that transparent pixels are composited on (RGBA, LA, palette transparency)
    alpha_background: tuple[int, int, int] = (255, 255, 255)

    def validate(self) -> None:
        for name in ("target_fps", "max_seconds", "understanding_max_seconds"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and v > 0, f"decode.{name}", v, "a positive number")
        bg = self.alpha_background
        _require(isinstance(bg, (tuple, list)) and len(bg) == 3
                 and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in bg),
                 "decode.alpha_background", bg, "an RGB triple of integers in [0, 255]")


@dataclass
class ValidateConfig:
    """Hard limits: outside them an item is unusable and goes to quarantine (not a policy filter)."""

    min_side: int = 16
    max_side: int = 16384
    max_caption_chars: int = 20000
    # decoded pixels per image or video frame (checked from the header, before decoding): above it an
    # item is quarantined as `too_many_pixels` (decompression bombs); 0 turns the check off
    max_pixels: int = 40_000_000

    def validate(self) -> None:
        for name in ("min_side", "max_side", "max_caption_chars"):
            _positive_int(f"checks.{name}", getattr(self, name))
        _require(isinstance(self.max_pixels, int) and not isinstance(self.max_pixels, bool) and self.max_pixels >= 0,
                 "checks.max_pixels", self.max_pixels, "a non-negative integer (0 turns the check off)")


@dataclass
class FilterConfig:
    """Policy filters; each counts what it removes. 0 turns a check off."""

    min_side: int = 0
    max_side: int = 0
    max_aspect: float = 0.0        # long side / short side
    min_seconds: float = 0.0
    max_seconds: float = 0.0
    min_caption_chars: int = 0
    max_caption_chars: int = 0
    min_blur: float = 0.0          # Laplacian variance of the grey frame (0-255 scale)
    min_motion: float = 0.0        # mean absolute grey difference between sampled frames
    # caption language: allowed scripts / script groups / language codes (empty = off), and the share
    # of the caption's letters that must be in them (the rest may be quoted foreign text)
    caption_scripts: tuple[str, ...] = ()
    min_script_fraction: float = 0.5
    # OCR text density (share of the frame inside detected text boxes; needs rapidocr; 0 = off)
    min_text_density: float = 0.0
    max_text_density: float = 0.0

    @property
    def text_density_on(self) -> bool:
        return bool(self.min_text_density or self.max_text_density)

    def validate(self) -> None:
        for name in ("min_side", "max_side", "max_aspect", "min_seconds", "max_seconds", "min_caption_chars",
                     "max_caption_chars", "min_blur", "min_motion"):
            _non_negative(f"filters.{name}", getattr(self, name))
        _require(isinstance(self.caption_scripts, (tuple, list)), "filters.caption_scripts", self.caption_scripts,
                 "a list of scripts or language codes")
        for name in self.caption_scripts:
            language_scripts(name)
        for name in ("min_script_fraction", "min_text_density", "max_text_density"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1,
                     f"filters.{name}", value, "a fraction in [0, 1]")
        if self.text_density_on:
            _require(ocr_available(), "filters.min_text_density/max_text_density",
                     (self.min_text_density, self.max_text_density),
                     "0 here: the OCR text-density filter needs rapidocr + onnxruntime, which are not installed")


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    hamming_threshold: int = 6     # of 64 perceptual-hash bits

    def validate(self) -> None:
        _require(isinstance(self.hamming_threshold, int) and 0 <= self.hamming_threshold <= 64,
                 "dedup.hamming_threshold", self.hamming_threshold, "an integer in [0, 64]")


@dataclass
class BucketConfig:
    """Aspect buckets and target areas (pixels) of the VAE copy and the ViT copy."""

    names: tuple[str, ...] = tuple(BUCKET_RATIOS)
    vae_image_area: int = 768 * 768
    vae_video_area: int = 640 * 640
    vit_image_area: int = 448 * 448
    vit_video_area: int = 336 * 336

    def validate(self) -> None:
        unknown = [n for n in self.names if n not in BUCKET_RATIOS]
        _require(bool(self.names) and not unknown, "buckets.names", list(self.names),
                 f"a non-empty subset of {list(BUCKET_RATIOS)}")
        for name in ("vae_image_area", "vae_video_area", "vit_image_area", "vit_video_area"):
            _positive_int(f"buckets.{name}", getattr(self, name))


@dataclass
class EncodeConfig:
    """How the encoder actor pools run. `num_gpus`: per actor; "auto" = 1 when the cluster has GPUs."""

    vae: bool = True
    vit: bool = True
    store_logvar: bool = False
    vae_batch_size: int = 8
    vit_batch_size: int = 8
    vae_actors: int = 1
    vit_actors: int = 1
    actor_num_cpus: float = 1.0
    num_gpus: Any = "auto"
    torch_threads: int = 1
    read_batch_size: int = 16

    def validate(self) -> None:
        for name in ("vae_batch_size", "vit_batch_size", "vae_actors", "vit_actors", "torch_threads",
                     "read_batch_size"):
            _positive_int(f"encode.{name}", getattr(self, name))
        _require(isinstance(self.actor_num_cpus, (int, float)) and self.actor_num_cpus > 0,
                 "encode.actor_num_cpus", self.actor_num_cpus, "a positive number (fractions allowed)")
        _require(self.num_gpus == "auto" or (isinstance(self.num_gpus, (int, float)) and self.num_gpus >= 0),
                 "encode.num_gpus", self.num_gpus, '"auto" or a non-negative number')


@dataclass
class OutputConfig:
    dir: str = "runs/curation/out"
    target_shard_bytes: int = 256 * 1024 * 1024
    # also store `<slot>_pixels`: the bucketed media (the VAE copy, else the ViT copy) as PNG (images)
    # or MP4 (videos) bytes, for evaluation; off by default (it makes shards much larger)
    store_pixels: bool = False

    def validate(self) -> None:
        _require(isinstance(self.dir, str) and bool(self.dir), "output.dir", self.dir, "a directory path")
        _positive_int("output.target_shard_bytes", self.target_shard_bytes)
        _require(isinstance(self.store_pixels, bool), "output.store_pixels", self.store_pixels, "true or false")


@dataclass
class TrackingConfig:
    enabled: bool = True
    workdir: str = "runs/curation"   # MLflow's embedded store lives here unless MLFLOW_TRACKING_URI is set
    experiment: str = "lance"


@dataclass
class CurationConfig:
    sources: tuple[SourceConfig, ...] = (SourceConfig(),)
    model: ModelRef = field(default_factory=ModelRef)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    checks: ValidateConfig = field(default_factory=ValidateConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray_address: str | None = None
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        from lance_platform.config import from_dict

        self.sources = tuple(s if isinstance(s, SourceConfig) else from_dict(SourceConfig, s, f"sources.{i}.")
                             for i, s in enumerate(self.sources))

    def validate(self) -> CurationConfig:
        _require(bool(self.sources), "sources", list(self.sources), "at least one source")
        names = [s.name for s in self.sources]
        _require(len(set(names)) == len(names), "sources[].name", names, "distinct source names")
        for i, source in enumerate(self.sources):
            source.validate(f"sources.{i}")
        for part in (self.decode, self.checks, self.filters, self.dedup, self.buckets, self.encode, self.output):
            part.validate()
        _require(self.encode.vae or self.encode.vit, "encode.vae/encode.vit", (self.encode.vae, self.encode.vit),
                 "at least one encoder on")
        return self

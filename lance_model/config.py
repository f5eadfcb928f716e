"""Configuration of a Lance model: plain dataclasses that round-trip to JSON, plus named presets.

`LanceConfig` holds the text backbone (`TextConfig`), the vision tower (`VitConfig`), the latent
autoencoder (`VaeConfig`) and the training-objective knobs that live with the model (loss weights,
timestep shift, CFG dropout). Presets sit in one registry (`PRESETS`): `tiny` for unit tests,
`nano` for the demo and small-scale learning, `lance-3b` for the released shape.

`LanceConfig.from_pretrained(dir)` reads our own `lance_config.json`, or the official checkpoint
layout (`llm_config.json`: a Qwen2.5-VL-style text config whose `vision_config` dict gives the ViT
shape; an optional `vit_config.json` overrides the ViT).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configio import ConfigError, from_dict

CONFIG_FILE = "lance_config.json"
OFFICIAL_LLM_CONFIG_FILE = "llm_config.json"
OFFICIAL_VIT_CONFIG_FILE = "vit_config.json"

ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "flash")
VAE_KINDS = ("wan2.2", "pixel")


def _check(cond: bool, field_name: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}={value!r}: expected {expected}")


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class TextConfig:
    """The Qwen2-family decoder shared by both experts (each expert holds its own copy of these weights)."""

    hidden_size: int = 2048
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 128
    intermediate_size: int = 11008
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    qk_norm: bool = True
    tie_word_embeddings: bool = False

    def validate(self, prefix: str = "text") -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "vocab_size"):
            v = getattr(self, name)
            _check(_is_pos_int(v), f"{prefix}.{name}", v, "a positive integer")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, f"{prefix}.num_key_value_heads",
               self.num_key_value_heads, f"a divisor of num_attention_heads ({self.num_attention_heads})")
        _check(self.head_dim % 2 == 0, f"{prefix}.head_dim", self.head_dim, "an even number")
        section = self.mrope_section
        _check(isinstance(section, (tuple, list)) and len(section) == 3 and all(_is_pos_int(x) for x in section),
               f"{prefix}.mrope_section", section, "three positive ints (t, h, w sections)")
        _check(sum(section) * 2 == self.head_dim,
               f"{prefix}.mrope_section", list(section),
               f"three ints summing to head_dim/2 = {self.head_dim // 2}")


@dataclass
class VitConfig:
    """Qwen2.5-VL vision tower (windowed ViT + 2x2 patch merger whose output width is the LLM width)."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 2048
    in_channels: int = 3
    hidden_act: str = "silu"
    trainable: bool = False

    @property
    def stride(self) -> int:
        """Pixels per merged token side (28 for the released ViT)."""
        return self.patch_size * self.spatial_merge_size

    def validate(self, prefix: str = "vit") -> None:
        for name in ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size",
                     "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size", "in_channels"):
            v = getattr(self, name)
            _check(_is_pos_int(v), f"{prefix}.{name}", v, "a positive integer")
        _check(self.hidden_size % self.num_heads == 0, f"{prefix}.num_heads", self.num_heads,
               f"a divisor of hidden_size ({self.hidden_size})")
        _check(all(0 <= i < self.depth for i in self.fullatt_block_indexes), f"{prefix}.fullatt_block_indexes",
               list(self.fullatt_block_indexes), f"block indexes below depth ({self.depth})")


@dataclass
class VaeConfig:
    """The latent autoencoder. `wan2.2`: the Wan2.2 3D causal VAE (diffusers `AutoencoderKLWan`);
    `pixel`: a parameter-free space-to-depth "VAE" (no weights; lets tiny models generate)."""

    kind: str = "wan2.2"
    latent_channels: int = 48
    spatial_stride: int = 16
    temporal_stride: int = 4
    # Wan2.2 architecture (diffusers AutoencoderKLWan arguments); ignored by `pixel`.
    base_dim: int = 160
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Decoder width (Wan2.2 uses a wider decoder: 256 vs the encoder's 160); None = same as base_dim.
    decoder_base_dim: int | None = 256
    # Local weights: a diffusers VAE directory or the official `Wan2.2_VAE.pth`; None = random init.
    weights: str | None = None

    def validate(self, prefix: str = "vae") -> None:
        _check(self.kind in VAE_KINDS, f"{prefix}.kind", self.kind, f"one of {VAE_KINDS}")
        for name in ("latent_channels", "spatial_stride", "temporal_stride"):
            v = getattr(self, name)
            _check(_is_pos_int(v), f"{prefix}.{name}", v, "a positive integer")
        if self.kind == "pixel":
            _check(self.latent_channels == 3 * self.spatial_stride ** 2, f"{prefix}.latent_channels",
                   self.latent_channels, f"3*spatial_stride^2 = {3 * self.spatial_stride ** 2} for the pixel VAE")
            _check(self.temporal_stride == 1, f"{prefix}.temporal_stride", self.temporal_stride,
                   "1 for the pixel VAE (frames are kept as they are)")


@dataclass
class LanceConfig:
    """Everything needed to build a `Lance` model (and its training objective)."""

    text: TextConfig = field(default_factory=TextConfig)
    vit: VitConfig | None = field(default_factory=VitConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    # Latent position table: rows = max_latent_frames * max_latent_size^2.
    max_latent_size: int = 64
    max_latent_frames: int = 31
    timestep_embed_dim: int = 256
    # Tokenizer: "byte" (self-contained) or a local directory holding a Qwen2 tokenizer.
    tokenizer: str = "byte"
    attention_backend: str = "auto"
    # Frozen parts (the VAE is always frozen; the ViT follows vit.trainable).
    freeze_embeddings: bool = True
    freeze_lm_head: bool = True
    # Training objective (MODEL.md §6).
    ce_weight: float = 0.25
    mse_weight: float = 1.0
    timestep_shift: float = 4.0
    caption_dropout: float = 0.1
    condition_dropout: float = 0.1

    def __post_init__(self) -> None:
        # Accept plain dicts (from JSON/YAML) for the nested configs.
        if isinstance(self.text, dict):
            self.text = from_dict(TextConfig, self.text, "text.")
        if isinstance(self.vit, dict):
            self.vit = from_dict(VitConfig, self.vit, "vit.")
        if isinstance(self.vae, dict):
            self.vae = from_dict(VaeConfig, self.vae, "vae.")

    # ------------------------------------------------------------------ validation
    def validate(self) -> LanceConfig:
        _check(isinstance(self.text, TextConfig), "text", self.text, "a TextConfig (or dict)")
        _check(self.vit is None or isinstance(self.vit, VitConfig), "vit", self.vit, "a VitConfig (or dict), or null")
        _check(isinstance(self.vae, VaeConfig), "vae", self.vae, "a VaeConfig (or dict)")
        self.text.validate()
        if self.vit is not None:
            self.vit.validate()
            _check(self.vit.out_hidden_size == self.text.hidden_size, "vit.out_hidden_size",
                   self.vit.out_hidden_size, f"text.hidden_size ({self.text.hidden_size})")
        self.vae.validate()
        _check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend", self.attention_backend,
               f"one of {ATTENTION_BACKENDS}")
        for name in ("max_latent_size", "max_latent_frames", "timestep_embed_dim"):
            v = getattr(self, name)
            _check(_is_pos_int(v), name, v, "a positive integer")
        for name in ("caption_dropout", "condition_dropout"):
            v = getattr(self, name)
            _check(_is_number(v) and 0.0 <= v < 1.0, name, v, "a probability in [0, 1)")
        for name in ("ce_weight", "mse_weight"):
            v = getattr(self, name)
            _check(_is_number(v) and v >= 0.0, name, v, "a non-negative weight")
        _check(_is_number(self.timestep_shift) and self.timestep_shift > 0, "timestep_shift",
               self.timestep_shift, "a positive number")
        _check(isinstance(self.tokenizer, str) and bool(self.tokenizer), "tokenizer", self.tokenizer,
               '"byte" or a local tokenizer directory')
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LanceConfig:
        return from_dict(cls, data).validate()

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LanceConfig:
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r}: expected one of {sorted(PRESETS)}")
        cfg = PRESETS[name]()
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in overrides.items():
            if key not in known:
                raise ConfigError(f"{key}={value!r}: not a LanceConfig field; known: {sorted(known)}")
            setattr(cfg, key, value)
        cfg.__post_init__()
        return cfg.validate()

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LanceConfig:
        """Read `lance_config.json`, or the official layout (`llm_config.json` [+ `vit_config.json`]).
        A missing directory, or one with neither file, is a FileNotFoundError naming the path."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {directory}")
        ours = directory / CONFIG_FILE
        if ours.is_file():
            return cls.from_dict(_read_json(ours))
        official = directory / OFFICIAL_LLM_CONFIG_FILE
        if official.is_file():
            return from_official_config(directory)
        raise FileNotFoundError(
            f"no model config in {directory}: expected {CONFIG_FILE} or the official {OFFICIAL_LLM_CONFIG_FILE}")


# ---------------------------------------------------------------------- official config files
def _rope_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The rotary settings of a Qwen2 / Qwen2.5-VL text config, wherever the file keeps them:
    `rope_scaling` (transformers 4 and the official `llm_config.json`) or `rope_parameters`
    (transformers 5, which also moves `rope_theta` inside it)."""
    out: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = d.get(key)
        if isinstance(value, dict):
            out.update({k: v for k, v in value.items() if v is not None})
    return out


def text_config_from_qwen2(d: dict[str, Any]) -> TextConfig:
    """A Qwen2 / Qwen2.5-VL text config dict (the official `llm_config.json`, or the `text_config`
    of a Qwen2.5-VL `config.json` from transformers 4 or 5) -> TextConfig.

    `head_dim` defaults to hidden/heads when absent; `mrope_section` and `rope_theta` are read from
    `rope_scaling` or `rope_parameters` (top-level `rope_theta` wins when present)."""
    try:
        heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        layers = d["num_hidden_layers"]
        inter = d["intermediate_size"]
        vocab = d["vocab_size"]
    except KeyError as e:
        raise ConfigError(f"text.{e.args[0]}=None: required in a Qwen2 text config") from None
    rope = _rope_fields(d)
    section = rope.get("mrope_section", (16, 24, 24))
    theta = d.get("rope_theta")
    if theta is None:
        theta = rope.get("rope_theta", 1_000_000.0)
    head_dim = d.get("head_dim")
    if head_dim is None and _is_pos_int(hidden) and _is_pos_int(heads):
        head_dim = hidden // heads
    return TextConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        mrope_section=tuple(section) if isinstance(section, (list, tuple)) else section,
        qk_norm=d.get("qk_norm", True),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
    )


def vit_config_from_qwen25vl(d: dict[str, Any], base: VitConfig | None = None) -> VitConfig:
    """A Qwen2.5-VL `vision_config` dict -> VitConfig. Fields the dict lacks come from `base`
    (default: the released ViT), so a partial dict such as the official `llm_config.json`'s
    `{"spatial_merge_size": 2, "tokens_per_second": 2}` gives the released tower."""
    b = base if base is not None else VitConfig()
    return VitConfig(
        depth=d.get("depth", b.depth),
        hidden_size=d.get("hidden_size", d.get("embed_dim", b.hidden_size)),
        num_heads=d.get("num_heads", b.num_heads),
        intermediate_size=d.get("intermediate_size", b.intermediate_size),
        patch_size=d.get("patch_size", d.get("spatial_patch_size", b.patch_size)),
        temporal_patch_size=d.get("temporal_patch_size", b.temporal_patch_size),
        spatial_merge_size=d.get("spatial_merge_size", b.spatial_merge_size),
        window_size=d.get("window_size", b.window_size),
        fullatt_block_indexes=tuple(d.get("fullatt_block_indexes", b.fullatt_block_indexes)),
        out_hidden_size=d.get("out_hidden_size", b.out_hidden_size),
        in_channels=d.get("in_channels", d.get("in_chans", b.in_channels)),
        hidden_act=d.get("hidden_act", b.hidden_act),
        trainable=b.trainable,
    )


def vit_config_to_qwen25vl(vit: VitConfig, tokens_per_second: int = 2) -> dict[str, Any]:
    """VitConfig -> a Qwen2.5-VL `vision_config` dict (the inverse of `vit_config_from_qwen25vl`;
    carries `spatial_merge_size`/`tokens_per_second`, which the official code reads)."""
    return {
        "model_type": "qwen2_5_vl", "depth": vit.depth, "hidden_size": vit.hidden_size,
        "num_heads": vit.num_heads, "intermediate_size": vit.intermediate_size, "hidden_act": vit.hidden_act,
        "patch_size": vit.patch_size, "spatial_patch_size": vit.patch_size,
        "temporal_patch_size": vit.temporal_patch_size, "spatial_merge_size": vit.spatial_merge_size,
        "window_size": vit.window_size, "fullatt_block_indexes": list(vit.fullatt_block_indexes),
        "out_hidden_size": vit.out_hidden_size, "in_chans": vit.in_channels,
        "tokens_per_second": tokens_per_second,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def from_official_config(directory: str | Path) -> LanceConfig:
    """The released checkpoint layout: `llm_config.json` (a Qwen2.5-VL-style text config with a
    `vision_config` dict) and optionally a `vit_config.json` (a Qwen2.5-VL vision config, bare or
    under `vision_config`; it wins over the one in `llm_config.json`). Everything else takes the
    released defaults of `lance-3b`. As in the official loader, the LM head is always untied and
    q/k norms are on unless the file says otherwise."""
    directory = Path(directory)
    llm_file = directory / OFFICIAL_LLM_CONFIG_FILE
    if not llm_file.is_file():
        raise FileNotFoundError(f"official config not found: {llm_file}")
    llm = _read_json(llm_file)
    cfg = PRESETS["lance-3b"]()
    text = llm.get("text_config")
    cfg.text = text_config_from_qwen2({**llm, **text} if isinstance(text, dict) else llm)
    # The official code forces tie_word_embeddings=False: the release stores its own lm_head.
    cfg.text.tie_word_embeddings = False
    if isinstance(llm.get("vision_config"), dict):
        cfg.vit = vit_config_from_qwen25vl(llm["vision_config"], cfg.vit)
    vit_file = directory / OFFICIAL_VIT_CONFIG_FILE
    if vit_file.is_file():
        vit = _read_json(vit_file)
        cfg.vit = vit_config_from_qwen25vl(vit.get("vision_config", vit), cfg.vit or VitConfig())
    if cfg.vit is not None:
        cfg.vit.out_hidden_size = cfg.text.hidden_size
    if (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file():
        cfg.tokenizer = str(directory)
    return cfg.validate()


# ---------------------------------------------------------------------- presets
def _tiny() -> LanceConfig:
    return LanceConfig(
        text=TextConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, intermediate_size=128, vocab_size=320, rope_theta=10_000.0,
                        mrope_section=(2, 3, 3)),
        vit=VitConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, window_size=56,
                      fullatt_block_indexes=(1,), out_hidden_size=64),
        vae=VaeConfig(kind="pixel", latent_channels=48, spatial_stride=4, temporal_stride=1),
        max_latent_size=32, max_latent_frames=17,
    )


def _nano() -> LanceConfig:
    return LanceConfig(
        text=TextConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                        head_dim=64, intermediate_size=1024, vocab_size=320, rope_theta=10_000.0,
                        mrope_section=(8, 12, 12)),
        vit=VitConfig(depth=4, hidden_size=128, num_heads=4, intermediate_size=256, window_size=112,
                      fullatt_block_indexes=(3,), out_hidden_size=384),
        vae=VaeConfig(kind="pixel", latent_channels=48, spatial_stride=4, temporal_stride=1),
        max_latent_size=64, max_latent_frames=17,
    )


def _lance_3b() -> LanceConfig:
    return LanceConfig()


PRESETS = {"tiny": _tiny, "nano": _nano, "lance-3b": _lance_3b}

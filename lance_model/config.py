"""Configuration of a Lance model: plain dataclasses that round-trip to JSON, plus named presets.

`LanceConfig` holds the text backbone (`TextConfig`), the vision tower (`VitConfig`), the latent
autoencoder (`VaeConfig`) and the training-objective knobs that live with the model (loss weights,
timestep shift, CFG dropout). Presets sit in one registry (`PRESETS`): `tiny` for unit tests,
`nano` for the demo, `small` for one-GPU learning runs, `lance-3b` for the released shape.

`LanceConfig.from_pretrained(dir)` reads our own `lance_config.json`, or the official checkpoint
layout (`llm_config.json`: a Qwen2.5-VL-style text config whose `vision_config` dict gives the ViT
shape; an optional `vit_config.json` overrides the ViT).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from .configio import (
    ConfigError,
    PositiveFloat,
    PositiveInt,
    Probability,
    check_types,
    configclass,
    from_dict,
    require,
)

CONFIG_FILE = "lance_config.json"
OFFICIAL_LLM_CONFIG_FILE = "llm_config.json"
OFFICIAL_VIT_CONFIG_FILE = "vit_config.json"

AttentionBackend = Literal["auto", "sdpa", "flex", "flash"]
VaeKind = Literal["wan2.2", "pixel"]
ATTENTION_BACKENDS: tuple[str, ...] = AttentionBackend.__args__
VAE_KINDS: tuple[str, ...] = VaeKind.__args__
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False, description="a non-negative weight")]
MropeSection = Annotated[tuple[PositiveInt, PositiveInt, PositiveInt],
                         Field(description="three positive ints (t, h, w sections)")]


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@configclass
class TextConfig:
    """The Qwen2-family decoder shared by both experts (each expert holds its own copy of these weights)."""

    hidden_size: PositiveInt = 2048
    num_hidden_layers: PositiveInt = 36
    num_attention_heads: PositiveInt = 16
    num_key_value_heads: PositiveInt = 2
    head_dim: PositiveInt = 128
    intermediate_size: PositiveInt = 11008
    vocab_size: PositiveInt = 151936
    rms_norm_eps: PositiveFloat = 1e-6
    rope_theta: PositiveFloat = 1_000_000.0
    mrope_section: MropeSection = (16, 24, 24)
    # the released layout (False): contiguous t | h | w frequency sections, the width getting only the
    # slowest; True: Qwen3-VL's interleaved layout (lance_model/rope.py), for models trained from scratch
    mrope_interleaved: bool = False
    qk_norm: bool = True
    tie_word_embeddings: bool = False

    def validate(self, prefix: str = "text") -> None:
        """Cross-field rules (types and ranges are checked by `from_dict` / `check_types`)."""
        require(self.num_attention_heads % self.num_key_value_heads == 0, f"{prefix}.num_key_value_heads",
                self.num_key_value_heads, f"a divisor of num_attention_heads ({self.num_attention_heads})")
        require(self.head_dim % 2 == 0, f"{prefix}.head_dim", self.head_dim, "an even number")
        section = self.mrope_section
        require(sum(section) * 2 == self.head_dim, f"{prefix}.mrope_section", list(section),
                f"three ints summing to head_dim/2 = {self.head_dim // 2}")


@configclass
class VitConfig:
    """Qwen2.5-VL vision tower (windowed ViT + 2x2 patch merger whose output width is the LLM width)."""

    depth: PositiveInt = 32
    hidden_size: PositiveInt = 1280
    num_heads: PositiveInt = 16
    intermediate_size: PositiveInt = 3420
    patch_size: PositiveInt = 14
    temporal_patch_size: PositiveInt = 2
    spatial_merge_size: PositiveInt = 2
    window_size: PositiveInt = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: PositiveInt = 2048
    in_channels: PositiveInt = 3
    hidden_act: str = "silu"
    trainable: bool = False

    @property
    def stride(self) -> int:
        """Pixels per merged token side (28 for the released ViT)."""
        return self.patch_size * self.spatial_merge_size

    def validate(self, prefix: str = "vit") -> None:
        """Cross-field rules (types and ranges are checked by `from_dict` / `check_types`)."""
        require(self.hidden_size % self.num_heads == 0, f"{prefix}.num_heads", self.num_heads,
                f"a divisor of hidden_size ({self.hidden_size})")
        require(all(0 <= i < self.depth for i in self.fullatt_block_indexes), f"{prefix}.fullatt_block_indexes",
                list(self.fullatt_block_indexes), f"block indexes below depth ({self.depth})")


@configclass
class VaeConfig:
    """The latent autoencoder. `wan2.2`: the Wan2.2 3D causal VAE (diffusers `AutoencoderKLWan`);
    `pixel`: a parameter-free space-to-depth "VAE" (no weights; lets tiny models generate)."""

    kind: VaeKind = "wan2.2"
    latent_channels: PositiveInt = 48
    spatial_stride: PositiveInt = 16
    temporal_stride: PositiveInt = 4
    # Wan2.2 architecture (diffusers AutoencoderKLWan arguments); ignored by `pixel`.
    base_dim: PositiveInt = 160
    dim_mult: tuple[PositiveInt, ...] = (1, 2, 4, 4)
    num_res_blocks: PositiveInt = 2
    # Decoder width (Wan2.2 uses a wider decoder: 256 vs the encoder's 160); None = same as base_dim.
    decoder_base_dim: PositiveInt | None = 256
    # Local weights: a diffusers VAE directory or the official `Wan2.2_VAE.pth`; None = random init.
    weights: str | None = None

    def validate(self, prefix: str = "vae") -> None:
        """Cross-field rules (types and ranges are checked by `from_dict` / `check_types`)."""
        if self.kind == "pixel":
            require(self.latent_channels == 3 * self.spatial_stride ** 2, f"{prefix}.latent_channels",
                    self.latent_channels, f"3*spatial_stride^2 = {3 * self.spatial_stride ** 2} for the pixel VAE")
            require(self.temporal_stride == 1, f"{prefix}.temporal_stride", self.temporal_stride,
                    "1 for the pixel VAE (frames are kept as they are)")


@configclass
class LanceConfig:
    """Everything needed to build a `Lance` model (and its training objective)."""

    text: TextConfig = field(default_factory=TextConfig)
    vit: VitConfig | None = field(default_factory=VitConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    # Latent position table: rows = max_latent_frames * max_latent_size^2.
    max_latent_size: PositiveInt = 64
    max_latent_frames: PositiveInt = 31
    timestep_embed_dim: PositiveInt = 256
    # Tokenizer: "byte" (self-contained) or a local directory holding a Qwen2 tokenizer.
    tokenizer: Annotated[str, Field(min_length=1, description='"byte" or a local tokenizer directory')] = "byte"
    attention_backend: AttentionBackend = "auto"
    # Frozen parts (the VAE is always frozen; the ViT follows vit.trainable).
    freeze_embeddings: bool = True
    freeze_lm_head: bool = True
    # Training objective (MODEL.md §6).
    ce_weight: Weight = 0.25
    mse_weight: Weight = 1.0
    timestep_shift: PositiveFloat = 4.0
    caption_dropout: Probability = 0.1
    condition_dropout: Probability = 0.1

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
        """Every field's type and range (also of values set in code), then the cross-field rules."""
        check_types(self)
        self.text.validate()
        if self.vit is not None:
            self.vit.validate()
            require(self.vit.out_hidden_size == self.text.hidden_size, "vit.out_hidden_size",
                    self.vit.out_hidden_size, f"text.hidden_size ({self.text.hidden_size})")
        self.vae.validate()
        return self

    def with_overrides(self, overrides: Mapping[str, Any], prefix: str = "") -> LanceConfig:
        """A validated copy with `overrides` applied: top-level fields, or sections given as (partial)
        mappings that merge into this config's section (`{"text": {"num_hidden_layers": 3}}`).
        Errors name the field under `prefix` (e.g. `model.overrides.`)."""
        cfg = from_dict(type(self), _merge(self.to_dict(), dict(overrides)), prefix)
        try:
            return cfg.validate()
        except ConfigError as exc:
            raise exc.prefixed(prefix) from None

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
        """Preset `name` with `overrides` (see `with_overrides`), validated."""
        if name not in PRESETS:
            raise ConfigError(f"preset={name!r}: expected one of {sorted(PRESETS)}", "preset")
        return PRESETS[name]().with_overrides(overrides)

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


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
        raise ConfigError(f"text.{e.args[0]}=None: required in a Qwen2 text config", f"text.{e.args[0]}") from None
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
        mrope_interleaved=bool(rope.get("mrope_interleaved", False)),
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


def _small() -> LanceConfig:
    """`nano`'s layout at 768 x 12 (151M backbone parameters over both experts, about 75M active per
    token) with a wider ViT: sized for one-GPU learning runs such as the text-rendering recipe, where
    `nano` steps are bound by launches rather than FLOPs."""
    return _nano().with_overrides({
        "text": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
                 "intermediate_size": 2048},
        "vit": {"hidden_size": 256, "intermediate_size": 512, "out_hidden_size": 768},
    })


def _lance_3b() -> LanceConfig:
    return LanceConfig()


PRESETS = {"tiny": _tiny, "nano": _nano, "small": _small, "lance-3b": _lance_3b}
PresetName = Literal[tuple(PRESETS)]  # a field naming a preset: one of its keys

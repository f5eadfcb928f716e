"""Tests of lance_model.config: presets, validation, (de)serialisation, official config files (CPU, fast)."""
from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
import torch

from lance_model.config import (
    CONFIG_FILE,
    OFFICIAL_LLM_CONFIG_FILE,
    OFFICIAL_VIT_CONFIG_FILE,
    PRESETS,
    ConfigError,
    LanceConfig,
    TextConfig,
    VitConfig,
    from_official_config,
    text_config_from_qwen2,
    vit_config_from_qwen25vl,
    vit_config_to_qwen25vl,
)

# The Qwen2.5-VL-3B-Instruct config.json values (what the official `llm_config.json` is based on:
# a flat Qwen2.5-VL text config plus a `vision_config` dict; official_facts.md §1).
QWEN25VL_3B_VISION = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
    "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
    "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
}
QWEN25VL_3B_LLM_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    # Qwen2.5-VL-3B ties its embeddings; the official Lance loader forces this to False.
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": QWEN25VL_3B_VISION,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}


def write_json(path, data) -> None:
    path.write_text(json.dumps(data, indent=2))


# ---------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", ["tiny", "nano", "small", "lance-3b"])
def test_preset_validates_and_builds(name):
    from lance_model import Lance

    cfg = LanceConfig.from_preset(name)
    assert cfg.validate() is cfg
    assert cfg.vit is not None and cfg.vit.out_hidden_size == cfg.text.hidden_size
    assert sum(cfg.text.mrope_section) * 2 == cfg.text.head_dim
    with torch.device("meta"):
        model = Lance(cfg)
    assert len(model.language_model.model.layers) == cfg.text.num_hidden_layers
    assert model.vae2llm.in_features == cfg.vae.latent_channels


def test_presets_are_fresh_objects():
    a = LanceConfig.from_preset("tiny")
    a.text.hidden_size = 999
    assert LanceConfig.from_preset("tiny").text.hidden_size == 64


def test_lance_3b_preset_is_the_released_shape():
    cfg = LanceConfig.from_preset("lance-3b")
    t, v = cfg.text, cfg.vit
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
            t.intermediate_size, t.vocab_size) == (2048, 36, 16, 2, 128, 11008, 151936)
    assert (t.rms_norm_eps, t.rope_theta, tuple(t.mrope_section)) == (1e-6, 1e6, (16, 24, 24))
    assert t.qk_norm and not t.tie_word_embeddings
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.patch_size, v.temporal_patch_size,
            v.spatial_merge_size, v.window_size, tuple(v.fullatt_block_indexes), v.out_hidden_size) == \
        (32, 1280, 16, 3420, 14, 2, 2, 112, (7, 15, 23, 31), 2048)
    assert (cfg.vae.latent_channels, cfg.vae.spatial_stride, cfg.vae.temporal_stride) == (48, 16, 4)
    assert (cfg.max_latent_size, cfg.max_latent_frames) == (64, 31)


def test_preset_overrides():
    cfg = LanceConfig.from_preset("tiny", attention_backend="sdpa", text={**dataclasses.asdict(
        LanceConfig.from_preset("tiny").text), "num_hidden_layers": 3})
    assert cfg.attention_backend == "sdpa"
    assert isinstance(cfg.text, TextConfig) and cfg.text.num_hidden_layers == 3


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match=r"preset='huge'.*lance-3b.*nano.*tiny"):
        LanceConfig.from_preset("huge")


def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match=r"hiden_size=5: unknown LanceConfig field"):
        LanceConfig.from_preset("tiny", hiden_size=5)


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_round_trip(name):
    cfg = LanceConfig.from_preset(name)
    d = cfg.to_dict()
    assert LanceConfig.from_dict(d) == cfg
    # through JSON: lists come back as tuples
    back = LanceConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert isinstance(back.text.mrope_section, tuple) and isinstance(back.vit.fullatt_block_indexes, tuple)


def test_save_from_pretrained_round_trip(tmp_path):
    cfg = LanceConfig.from_preset("tiny", attention_backend="sdpa", ce_weight=0.5)
    path = cfg.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / CONFIG_FILE and path.is_file()
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    back = LanceConfig.from_pretrained(tmp_path / "ckpt")
    assert back == cfg
    assert back.attention_backend == "sdpa" and back.ce_weight == 0.5


def test_round_trip_without_vit(tmp_path):
    cfg = LanceConfig.from_preset("tiny", vit=None)
    cfg.save(tmp_path)
    back = LanceConfig.from_pretrained(tmp_path)
    assert back.vit is None and back == cfg


def test_our_config_wins_over_official(tmp_path):
    cfg = LanceConfig.from_preset("tiny")
    cfg.save(tmp_path)
    write_json(tmp_path / OFFICIAL_LLM_CONFIG_FILE, QWEN25VL_3B_LLM_CONFIG)
    assert LanceConfig.from_pretrained(tmp_path) == cfg


# ---------------------------------------------------------------------- official files
def test_official_llm_config_gives_released_text_config(tmp_path):
    write_json(tmp_path / OFFICIAL_LLM_CONFIG_FILE, QWEN25VL_3B_LLM_CONFIG)
    cfg = LanceConfig.from_pretrained(tmp_path)
    ref = LanceConfig.from_preset("lance-3b")
    assert cfg.text == ref.text  # incl. head_dim 2048/16 = 128 and tie_word_embeddings forced False
    assert cfg.text.mrope_section == (16, 24, 24) and cfg.text.rope_theta == 1e6
    assert cfg.vit == ref.vit
    assert cfg.tokenizer == "byte"  # no tokenizer files in the directory


def test_official_config_with_tokenizer_files_uses_the_directory(tmp_path):
    write_json(tmp_path / OFFICIAL_LLM_CONFIG_FILE, QWEN25VL_3B_LLM_CONFIG)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert LanceConfig.from_pretrained(tmp_path).tokenizer == str(tmp_path)


def test_official_config_with_partial_vision_config(tmp_path):
    # The fields the official code actually reads from llm_config.json's vision_config.
    raw = {**QWEN25VL_3B_LLM_CONFIG, "vision_config": {"spatial_merge_size": 2, "tokens_per_second": 2}}
    write_json(tmp_path / OFFICIAL_LLM_CONFIG_FILE, raw)
    assert from_official_config(tmp_path).vit == LanceConfig.from_preset("lance-3b").vit


def test_official_config_reads_tiny_shapes_and_vit_config_file(tmp_path):
    tiny = LanceConfig.from_preset("tiny")
    t = tiny.text
    raw = {"hidden_size": t.hidden_size, "num_hidden_layers": t.num_hidden_layers,
           "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
           "intermediate_size": t.intermediate_size, "vocab_size": t.vocab_size, "rms_norm_eps": t.rms_norm_eps,
           "rope_theta": t.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
           "vision_config": {"spatial_merge_size": 2, "tokens_per_second": 2}}
    write_json(tmp_path / OFFICIAL_LLM_CONFIG_FILE, raw)
    # without vit_config.json the ViT is the released one, re-targeted at the text width
    cfg = from_official_config(tmp_path)
    assert cfg.text == t
    assert cfg.vit.depth == 32 and cfg.vit.out_hidden_size == t.hidden_size
    # a vit_config.json (Qwen2.5-VL vision config, bare or nested) wins
    write_json(tmp_path / OFFICIAL_VIT_CONFIG_FILE, {"vision_config": vit_config_to_qwen25vl(tiny.vit)})
    assert from_official_config(tmp_path).vit == tiny.vit
    write_json(tmp_path / OFFICIAL_VIT_CONFIG_FILE, vit_config_to_qwen25vl(tiny.vit))
    assert from_official_config(tmp_path).vit == tiny.vit


def test_text_config_from_transformers5_style():
    # transformers 5 writes rope_parameters (with rope_theta inside) and no head_dim
    d = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "vocab_size": 320, "rms_norm_eps": 1e-6,
         "rope_parameters": {"mrope_section": [2, 3, 3], "rope_theta": 10000.0, "rope_type": "default",
                             "type": "mrope"}}
    t = text_config_from_qwen2(d)
    assert t == LanceConfig.from_preset("tiny").text
    t.validate()


def test_text_config_from_qwen2_missing_field():
    with pytest.raises(ConfigError, match="text.vocab_size"):
        text_config_from_qwen2({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "intermediate_size": 128})


def test_vit_config_qwen25vl_round_trip():
    for name in ("tiny", "nano", "small", "lance-3b"):
        vit = LanceConfig.from_preset(name).vit
        assert vit_config_from_qwen25vl(vit_config_to_qwen25vl(vit)) == vit
    assert vit_config_from_qwen25vl(QWEN25VL_3B_VISION) == VitConfig()


def test_official_config_bad_mrope_is_a_config_error(tmp_path):
    raw = copy.deepcopy(QWEN25VL_3B_LLM_CONFIG)
    raw["rope_scaling"]["mrope_section"] = [16, 24, 16]
    write_json(tmp_path / OFFICIAL_LLM_CONFIG_FILE, raw)
    with pytest.raises(ConfigError, match=re.escape("text.mrope_section=[16, 24, 16]")):
        LanceConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- bad values
def _tiny_dict(**changes):
    d = LanceConfig.from_preset("tiny").to_dict()
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = d
        for p in path:
            node = node[p]
        node[last] = value
    return d


@pytest.mark.parametrize("changes, pattern", [
    ({"text__mrope_section": [2, 3, 4]}, r"text\.mrope_section=\[2, 3, 4\]: expected .*head_dim/2 = 8"),
    ({"text__mrope_section": [4, 4]}, r"text\.mrope_section=.*three positive ints"),
    ({"attention_backend": "foo"}, r"attention_backend='foo': expected one of .*sdpa"),
    ({"text__hidden_size": 0}, r"text\.hidden_size=0: expected a positive integer"),
    ({"text__hidden_size": True}, r"text\.hidden_size=True: expected a positive integer"),
    ({"text__num_key_value_heads": 3}, r"text\.num_key_value_heads=3: expected a divisor"),
    ({"text__head_dim": 15}, r"text\.head_dim=15"),
    ({"vit__num_heads": 3}, r"vit\.num_heads=3: expected a divisor of hidden_size \(32\)"),
    ({"vit__fullatt_block_indexes": [5]}, r"vit\.fullatt_block_indexes=\[5\]"),
    ({"vit__out_hidden_size": 32}, r"vit\.out_hidden_size=32: expected text\.hidden_size \(64\)"),
    ({"vae__kind": "sd"}, r"vae\.kind='sd': expected one of"),
    ({"vae__latent_channels": 16}, r"vae\.latent_channels=16: expected 3\*spatial_stride\^2 = 48"),
    ({"caption_dropout": 1.5}, r"caption_dropout=1\.5: expected a probability"),
    ({"ce_weight": -1.0}, r"ce_weight=-1\.0: expected a non-negative weight"),
    ({"timestep_shift": 0}, r"timestep_shift=0: expected a positive number"),
    ({"max_latent_size": "64"}, r"max_latent_size='64': expected a positive integer"),
    ({"colour": "red"}, r"colour='red': unknown LanceConfig field"),
    ({"text__hiden": 3}, r"text\.hiden=3: unknown TextConfig field"),
    ({"vit__foo": 1}, r"vit\.foo=1: unknown VitConfig field"),
    ({"text": 5}, r"text=5: expected a TextConfig"),
])
def test_bad_values_raise_config_error_naming_field_and_value(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        LanceConfig.from_dict(_tiny_dict(**changes))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_bad_value_in_saved_config(tmp_path):
    write_json(tmp_path / CONFIG_FILE, _tiny_dict(attention_backend="foo"))
    with pytest.raises(ConfigError, match="attention_backend='foo'"):
        LanceConfig.from_pretrained(tmp_path)


def test_invalid_json_is_a_config_error(tmp_path):
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / CONFIG_FILE))):
        LanceConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- missing files
def test_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        LanceConfig.from_pretrained(missing)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + r".*lance_config\.json.*llm_config\.json"):
        LanceConfig.from_pretrained(tmp_path)

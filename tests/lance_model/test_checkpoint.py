"""Tests of lance_model.checkpoint: the official key layout (MODEL.md §2), save/load round trips,
the official release layout, weight-file selection, error reporting, the separate ViT file, and
initialisation from a (tiny, randomly initialised) Qwen2.5-VL checkpoint. CPU, `tiny` preset."""
from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lance_model import Lance, LanceConfig
from lance_model.checkpoint import (
    CheckpointError,
    read_tensors,
)
from lance_model.config import CONFIG_FILE, OFFICIAL_LLM_CONFIG_FILE
from lance_model.heads import sincos_3d_table

POS_KEY = "latent_pos_embed.pos_embed"


# ---------------------------------------------------------------------- the layout of MODEL.md §2
def expected_layout(num_layers: int, vit_depth: int | None) -> set[str]:
    """The state-dict keys of MODEL.md §2, generated from the layout description (not from our code)."""
    keys = {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
            "language_model.model.norm_moe_gen.weight", "language_model.lm_head.weight",
            "time_embedder.mlp.0.weight", "time_embedder.mlp.0.bias",
            "time_embedder.mlp.2.weight", "time_embedder.mlp.2.bias",
            "vae2llm.weight", "vae2llm.bias", "llm2vae.weight", "llm2vae.bias", POS_KEY}
    for i in range(num_layers):
        p = f"language_model.model.layers.{i}."
        for g in ("", "_moe_gen"):
            keys |= {f"{p}input_layernorm{g}.weight", f"{p}post_attention_layernorm{g}.weight",
                     f"{p}self_attn.o_proj{g}.weight", f"{p}self_attn.q_norm{g}.weight",
                     f"{p}self_attn.k_norm{g}.weight"}
            keys |= {f"{p}self_attn.{x}_proj{g}.{w}" for x in "qkv" for w in ("weight", "bias")}
        keys |= {f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        keys |= {f"{p}mlp_moe_gen.{x}_proj.weight" for x in ("gate", "up", "down")}
    if vit_depth is not None:
        v = "vit_model."
        keys |= {f"{v}patch_embed.proj.weight", f"{v}merger.ln_q.weight"}
        keys |= {f"{v}merger.mlp.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")}
        for n in range(vit_depth):
            b = f"{v}blocks.{n}."
            keys |= {f"{b}norm1.weight", f"{b}norm2.weight"}
            keys |= {f"{b}{m}.{w}" for m in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj",
                                               "mlp.down_proj") for w in ("weight", "bias")}
    return keys


def assert_same_keys(actual, expected) -> None:
    actual, expected = set(actual), set(expected)
    extra, missing = sorted(actual - expected), sorted(expected - actual)
    assert not extra and not missing, f"keys not in the layout: {extra}\nlayout keys missing: {missing}"


# ---------------------------------------------------------------------- fixtures
def tiny_config(**kw) -> LanceConfig:
    return LanceConfig.from_preset("tiny", **kw)


def fresh_tiny(seed: int = 0, **kw) -> Lance:
    torch.manual_seed(seed)
    model = Lance(tiny_config(**kw))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # q/k norms and biases would otherwise be all-ones/zeros: make them distinct
        for name, p in model.named_parameters():
            if name != POS_KEY:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.01)
    return model


@pytest.fixture(scope="module")
def tiny_model() -> Lance:
    return fresh_tiny()


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_model.save_pretrained(d)
    return d


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_state_equal(a: dict, b: dict, skip=(POS_KEY,)) -> None:
    assert_same_keys(set(a) - set(skip), set(b) - set(skip))
    bad = [k for k in a if k not in skip and not torch.equal(a[k], b[k])]
    assert not bad, f"tensors differ: {bad}"


def keys_of(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


# ---------------------------------------------------------------------- layout
def test_lance_3b_on_meta_device_layout_and_size():
    with torch.device("meta"):
        model = Lance(LanceConfig.from_preset("lance-3b"))
    on_device = [n for n, p in model.named_parameters() if not p.is_meta]
    on_device += [n for n, b in model.named_buffers() if not b.is_meta]
    assert not on_device, f"tensors with real storage: {on_device}"
    counts = model.num_parameters()
    assert 3.0e9 <= counts["active"] <= 3.6e9, counts
    assert 6.0e9 <= counts["total"] <= 7.0e9, counts
    assert_same_keys(model.state_dict().keys(), expected_layout(36, 32))
    # a few shapes of the released checkpoint
    sd = model.state_dict()
    assert sd[POS_KEY].shape == (31 * 64 * 64, 2048)
    assert sd["language_model.model.layers.0.self_attn.k_proj_moe_gen.weight"].shape == (256, 2048)
    assert sd["language_model.model.layers.0.self_attn.q_norm.weight"].shape == (128,)
    assert sd["vae2llm.weight"].shape == (2048, 48) and sd["llm2vae.weight"].shape == (48, 2048)
    assert sd["time_embedder.mlp.0.weight"].shape == (2048, 256)
    assert sd["vit_model.merger.mlp.2.weight"].shape == (2048, 1280 * 4)


def test_tiny_layout(tiny_model):
    assert_same_keys(tiny_model.state_dict().keys(), expected_layout(2, 2))


# ---------------------------------------------------------------------- save / load
def test_save_load_round_trip_is_exact(tiny_model, saved_dir):
    assert {p.name for p in saved_dir.iterdir()} == {"model.safetensors", CONFIG_FILE, OFFICIAL_LLM_CONFIG_FILE}
    assert POS_KEY not in keys_of(saved_dir / "model.safetensors")
    assert_same_keys(keys_of(saved_dir / "model.safetensors"), expected_layout(2, 2) - {POS_KEY})

    loaded = Lance.from_pretrained(saved_dir)
    assert loaded.config == tiny_model.config
    assert_state_equal(tiny_model.state_dict(), loaded.state_dict(), skip=())
    for (n1, b1), (n2, b2) in zip(tiny_model.named_buffers(), loaded.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2), n1
    assert not any(p.is_meta for p in loaded.parameters())
    # the position table was rebuilt, not read
    fresh = Lance(tiny_config())
    assert torch.equal(loaded.latent_pos_embed.pos_embed, fresh.latent_pos_embed.pos_embed)
    cfg = loaded.config
    assert torch.equal(loaded.latent_pos_embed.pos_embed,
                       sincos_3d_table(cfg.max_latent_frames, cfg.max_latent_size, cfg.text.hidden_size))
    # freezing follows the config after load
    assert not loaded.language_model.model.embed_tokens.weight.requires_grad
    assert not loaded.latent_pos_embed.pos_embed.requires_grad
    assert loaded.language_model.model.layers[0].mlp_moe_gen.up_proj.weight.requires_grad
    assert not any(p.requires_grad for p in loaded.vit_model.parameters())


def test_corrupted_position_table_is_ignored(tiny_model, saved_dir, tmp_path):
    d = copy_ckpt(saved_dir, tmp_path / "ck")
    state = read_tensors(d / "model.safetensors")
    state[POS_KEY] = torch.zeros(7, 3)  # wrong values and shape: never trusted
    save_file(state, str(d / "model.safetensors"))
    loaded = Lance.from_pretrained(d)
    assert torch.equal(loaded.latent_pos_embed.pos_embed, tiny_model.latent_pos_embed.pos_embed)


def test_load_with_dtype(saved_dir, tiny_model):
    loaded = Lance.from_pretrained(saved_dir, dtype=torch.bfloat16)
    w = loaded.language_model.model.layers[1].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, tiny_model.language_model.model.layers[1].self_attn.q_proj.weight.to(torch.bfloat16))
    assert loaded.latent_pos_embed.pos_embed.dtype == torch.bfloat16


def test_llm_config_json_is_official_style(tiny_model, saved_dir):
    llm = json.loads((saved_dir / OFFICIAL_LLM_CONFIG_FILE).read_text())
    t = tiny_model.config.text
    assert (llm["hidden_size"], llm["num_hidden_layers"], llm["num_attention_heads"], llm["num_key_value_heads"],
            llm["intermediate_size"], llm["vocab_size"]) == (t.hidden_size, t.num_hidden_layers,
                                                              t.num_attention_heads, t.num_key_value_heads,
                                                              t.intermediate_size, t.vocab_size)
    assert llm["rope_scaling"]["mrope_section"] == list(t.mrope_section)
    assert llm["tie_word_embeddings"] is False
    # fields the official inference code reads with attribute / dict access
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "pad_token_id"):
        assert isinstance(llm[key], int) and llm[key] < t.vocab_size, key
    assert llm["vision_config"]["spatial_merge_size"] == 2 and llm["vision_config"]["tokens_per_second"] == 2
    assert llm["vision_config"]["depth"] == tiny_model.config.vit.depth


def test_official_release_layout_loads(tiny_model, saved_dir, tmp_path):
    """Only llm_config.json + model.safetensors (the released layout): the tiny shape comes back."""
    d = copy_ckpt(saved_dir, tmp_path / "official")
    (d / CONFIG_FILE).unlink()
    assert {p.name for p in d.iterdir()} == {"model.safetensors", OFFICIAL_LLM_CONFIG_FILE}
    cfg = LanceConfig.from_pretrained(d)
    assert cfg.text == tiny_model.config.text
    assert cfg.vit == tiny_model.config.vit
    loaded = Lance.from_pretrained(d)
    assert_state_equal(tiny_model.state_dict(), loaded.state_dict())
    assert torch.equal(loaded.latent_pos_embed.pos_embed,
                       sincos_3d_table(cfg.max_latent_frames, cfg.max_latent_size, cfg.text.hidden_size))


def test_tied_embeddings_round_trip(tmp_path):
    """A tied model still writes its own lm_head (the official layout), and comes back tied."""
    model = fresh_tiny(seed=3, text={**tiny_config().to_dict()["text"], "tie_word_embeddings": True})
    emb = model.language_model.model.embed_tokens.weight
    assert model.language_model.lm_head.weight is emb
    model.save_pretrained(tmp_path)
    assert "language_model.lm_head.weight" in keys_of(tmp_path / "model.safetensors")
    loaded = Lance.from_pretrained(tmp_path)
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    assert torch.equal(loaded.language_model.lm_head.weight, emb)
    # official layout: untied, with the head equal to the embedding
    (tmp_path / CONFIG_FILE).unlink()
    official = Lance.from_pretrained(tmp_path)
    assert not official.config.text.tie_word_embeddings
    assert torch.equal(official.language_model.lm_head.weight, emb)


# ---------------------------------------------------------------------- weight files
@pytest.fixture(scope="module")
def model_and_ema_dir(tmp_path_factory, tiny_model, saved_dir):
    d = copy_ckpt(saved_dir, tmp_path_factory.mktemp("ema") / "ck")
    ema_state = {k: v + 1.0 if v.is_floating_point() and k != POS_KEY else v
                 for k, v in tiny_model.state_dict().items()}
    from lance_model.checkpoint import save_pretrained

    save_pretrained(tiny_model, d, filename="ema.safetensors", state=ema_state)
    return d, ema_state


def test_weights_ema_picks_ema_file(model_and_ema_dir):
    d, ema_state = model_and_ema_dir
    loaded = Lance.from_pretrained(d, weights="ema")
    assert_state_equal(ema_state, loaded.state_dict())


def test_weights_auto_prefers_model_then_falls_back_to_ema(model_and_ema_dir, tiny_model, tmp_path):
    d, ema_state = model_and_ema_dir
    assert_state_equal(tiny_model.state_dict(), Lance.from_pretrained(d).state_dict())
    assert_state_equal(tiny_model.state_dict(), Lance.from_pretrained(d, weights="model").state_dict())
    only_ema = copy_ckpt(d, tmp_path / "only_ema")
    (only_ema / "model.safetensors").unlink()
    assert_state_equal(ema_state, Lance.from_pretrained(only_ema, weights="auto").state_dict())
    with pytest.raises(FileNotFoundError, match=re.escape(str(only_ema)) + ".*model.safetensors"):
        Lance.from_pretrained(only_ema, weights="model")


def test_missing_weights_file_names_the_paths(saved_dir, tmp_path):
    d = copy_ckpt(saved_dir, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(d)) + ".*model.safetensors.*ema.safetensors"):
        Lance.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        Lance.from_pretrained(d, weights="ema")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Lance.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "x.safetensors"))):
        read_tensors(tmp_path / "x.safetensors")


# ---------------------------------------------------------------------- errors and reports
def _rewrite(d, fn):
    state = read_tensors(d / "model.safetensors")
    fn(state)
    save_file(state, str(d / "model.safetensors"))


def test_wrong_shape_names_key_and_both_shapes(saved_dir, tmp_path):
    d = copy_ckpt(saved_dir, tmp_path / "shape")
    key = "language_model.model.layers.1.mlp_moe_gen.up_proj.weight"
    _rewrite(d, lambda s: s.__setitem__(key, torch.zeros(127, 64)))
    with pytest.raises(CheckpointError, match=re.escape(key) + r".*\(127, 64\).*\(128, 64\)"):
        Lance.from_pretrained(d)


def test_unknown_key_is_reported_and_ignored(saved_dir, tiny_model, tmp_path, caplog):
    d = copy_ckpt(saved_dir, tmp_path / "extra")
    _rewrite(d, lambda s: s.__setitem__("connector.fc1.weight", torch.ones(3, 3)))
    with caplog.at_level(logging.WARNING, logger="lance_model.checkpoint"):
        loaded = Lance.from_pretrained(d)
    assert "connector.fc1.weight" in caplog.text
    assert "connector.fc1.weight" not in loaded.state_dict()
    assert_state_equal(tiny_model.state_dict(), loaded.state_dict())


def test_missing_key_fails_naming_it(saved_dir, tmp_path):
    d = copy_ckpt(saved_dir, tmp_path / "missing")
    _rewrite(d, lambda s: s.pop("llm2vae.bias"))
    with pytest.raises(CheckpointError, match=r"missing key.*llm2vae\.bias"):
        Lance.from_pretrained(d)


def test_pth_state_dict_loads_weights_only(tiny_model, saved_dir, tmp_path):
    state = {k: v.clone() for k, v in tiny_model.state_dict().items() if k != POS_KEY}
    torch.save(state, tmp_path / "sd.pth")
    back = read_tensors(tmp_path / "sd.pth")
    assert_state_equal(state, back)
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    assert_state_equal(state, read_tensors(tmp_path / "wrapped.pth"))
    # as the weights file of a checkpoint directory
    d = copy_ckpt(saved_dir, tmp_path / "pth")
    (d / "model.safetensors").unlink()
    shutil.copy(tmp_path / "sd.pth", d / "model.pth")
    assert_state_equal(state, Lance.from_pretrained(d, weights="model.pth").state_dict())


class _NotATensor:  # an arbitrary object: weights_only loading must refuse to unpickle it
    pass


def test_pth_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "evil": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        read_tensors(tmp_path / "evil.pth")


# ---------------------------------------------------------------------- ViT in its own file
@pytest.mark.parametrize("official_layout", [False, True])
def test_vit_in_separate_file_with_bare_keys(saved_dir, tiny_model, tmp_path, official_layout):
    d = copy_ckpt(saved_dir, tmp_path / "vit_apart")
    state = read_tensors(d / "model.safetensors")
    vit = {k[len("vit_model."):]: state.pop(k) for k in list(state) if k.startswith("vit_model.")}
    assert vit and "patch_embed.proj.weight" in vit
    save_file(state, str(d / "model.safetensors"))
    save_file(vit, str(d / "vit.safetensors"))
    if official_layout:
        (d / CONFIG_FILE).unlink()
    loaded = Lance.from_pretrained(d)
    assert_state_equal(tiny_model.state_dict(), loaded.state_dict())
    # without the ViT file the ViT keys are missing, by name
    (d / "vit.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"vit_model\.(blocks|merger|patch_embed)"):
        Lance.from_pretrained(d)


# ---------------------------------------------------------------------- Qwen2.5-VL initialisation
TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128, "vocab_size": 320, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
TINY_VISION = {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "window_size": 56,
                   "fullatt_block_indexes": [1], "out_hidden_size": 64}


def to_old_style(key: str) -> str:
    """Any Qwen2.5-VL key -> the transformers-4 style (`model.layers.*`, `visual.*`, `lm_head.*`)."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def to_new_style(key: str) -> str:
    """Old style -> the transformers-5 in-memory style (`model.language_model.*`, `model.visual.*`)."""
    key = to_old_style(key)
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def lance_key(old_key: str) -> str:
    """Independent statement of the official mapping: `visual` -> `vit_model`, else `language_model.` prefix."""
    if old_key.startswith("visual."):
        return "vit_model." + old_key[len("visual."):]
    return "language_model." + old_key


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2_5_VLConfig(
        text_config={**TINY_TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        vision_config=TINY_VISION, tie_word_embeddings=False)
    torch.manual_seed(1)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    root = tmp_path_factory.mktemp("qwen")
    saved = root / "as_saved"
    model.save_pretrained(saved)
    raw = read_tensors(saved / "model.safetensors")
    old = {to_old_style(k): v for k, v in raw.items()}  # the reference source, old-style keys

    old_dir = root / "old_style"
    old_dir.mkdir()
    shutil.copy(saved / "config.json", old_dir / "config.json")
    save_file(old, str(old_dir / "model.safetensors"))

    # new-style keys, a transformers-4 flat config.json, and a tied source (no lm_head stored)
    new_dir = root / "new_style_tied"
    new_dir.mkdir()
    flat = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **TINY_TEXT,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "tie_word_embeddings": True,
            "vision_config": {**TINY_VISION, "in_chans": 3, "tokens_per_second": 2}}
    (new_dir / "config.json").write_text(json.dumps(flat))
    save_file({to_new_style(k): v for k, v in old.items() if k != "lm_head.weight"},
              str(new_dir / "model.safetensors"))
    return {"as_saved": saved, "old_style": old_dir, "new_style_tied": new_dir}, old


@pytest.mark.parametrize("which", ["as_saved", "old_style", "new_style_tied"])
def test_init_from_qwen25vl(qwen_dirs, which):
    dirs, src = qwen_dirs
    directory = dirs[which]
    tied_source = which == "new_style_tied"
    model = Lance.from_qwen25vl(directory)
    cfg = model.config
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.text.head_dim, cfg.text.vocab_size) == (64, 2, 16, 320)
    assert cfg.text.mrope_section == (2, 3, 3) and cfg.text.rope_theta == 10000.0
    assert not cfg.text.tie_word_embeddings
    assert (cfg.vit.depth, cfg.vit.hidden_size, cfg.vit.out_hidden_size) == (2, 32, 64)
    sd = model.state_dict()
    assert_same_keys(sd.keys(), expected_layout(2, 2))

    # every understanding / ViT weight equals its source tensor
    for k, v in src.items():
        if tied_source and k == "lm_head.weight":
            continue
        assert torch.equal(sd[lance_key(k)], v), k
    assert sum(k.startswith("vit_model.") for k in sd) == sum(k.startswith("visual.") for k in src)
    head, emb = sd["language_model.lm_head.weight"], sd["language_model.model.embed_tokens.weight"]
    if tied_source:  # untied as a copy of the embedding
        assert torch.equal(head, src["model.embed_tokens.weight"])
        assert head.data_ptr() != emb.data_ptr()

    # every generation-expert weight equals its understanding twin, in its own storage
    gen = [k for k in sd if "_moe_gen" in k]
    assert len(gen) == 2 * 14 + 1  # per layer: 2 norms, q/k/v w+b, o, q/k norm, 3 MLP; + final norm
    for k in gen:
        twin = k.replace("_moe_gen", "")
        assert torch.equal(sd[k], sd[twin]), k
        assert sd[k].untyped_storage().data_ptr() != sd[twin].untyped_storage().data_ptr(), k
    layer = model.language_model.model.layers[0].self_attn
    with torch.no_grad():
        layer.q_proj_moe_gen.weight.add_(1.0)
    assert not torch.equal(layer.q_proj_moe_gen.weight, layer.q_proj.weight)

    # what kept a fresh init is reported
    report = model.qwen_init_report
    expected_fresh = {"time_embedder.mlp.0.weight", "time_embedder.mlp.0.bias", "time_embedder.mlp.2.weight",
                      "time_embedder.mlp.2.bias", "vae2llm.weight", "vae2llm.bias", "llm2vae.weight", "llm2vae.bias"}
    expected_fresh |= {f"language_model.model.layers.{i}.self_attn.{n}_norm{g}.weight"
                       for i in range(2) for n in "qk" for g in ("", "_moe_gen")}
    assert_same_keys(report.missing, expected_fresh)
    assert not report.unexpected


def test_init_from_qwen25vl_then_save_load(qwen_dirs, tmp_path):
    dirs, _ = qwen_dirs
    model = Lance.from_qwen25vl(dirs["old_style"])
    model.save_pretrained(tmp_path)
    loaded = Lance.from_pretrained(tmp_path)
    assert_state_equal(model.state_dict(), loaded.state_dict())


def test_init_from_qwen25vl_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        Lance.from_qwen25vl(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "config.json"))):
        Lance.from_qwen25vl(tmp_path)

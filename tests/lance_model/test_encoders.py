"""Tests of lance_model.encoders: ViT patching/tower and the latent autoencoders (CPU, tiny sizes)."""
from __future__ import annotations

import re

import pytest
import torch

from lance_model.config import VaeConfig, VitConfig
from lance_model.encoders import (
    PixelVae,
    VaeWeightsError,
    WanVae,
    build_vae,
    build_vit,
    encode_vit,
    load_vae,
    official_to_diffusers_key,
    vit_patches,
    vit_token_count,
)

# ---------------------------------------------------------------------- expected values
# Written out here, not imported from the code under test: the released numbers.
# OpenAI CLIP pixel normalisation (Qwen2.5-VL's image processor uses it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Wan2.2 (TI2V-5B) VAE per-channel latent mean / std, 48 channels each, as released with the model.
WAN22_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
# The pixel "VAE" scales [-1, 1] pixels by 2 (natural images: per-channel std about 0.45 -> about 0.9).
PIXEL_SCALE = 2.0


# ---------------------------------------------------------------------- fixtures
def tiny_vit_cfg(**kw) -> VitConfig:
    base = {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "window_size": 56,
                "fullatt_block_indexes": (1,), "out_hidden_size": 48}
    base.update(kw)
    return VitConfig(**base)


def tiny_wan_cfg(**kw) -> VaeConfig:
    base = {"kind": "wan2.2", "base_dim": 8, "decoder_base_dim": None, "dim_mult": (1, 2, 2, 2),
            "num_res_blocks": 1}
    base.update(kw)
    return VaeConfig(**base)


@pytest.fixture(scope="module")
def vit_cfg() -> VitConfig:
    return tiny_vit_cfg()


@pytest.fixture(scope="module")
def vit(vit_cfg: VitConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vit(vit_cfg)


@pytest.fixture(scope="module")
def wan() -> WanVae:
    torch.manual_seed(0)
    return load_vae(tiny_wan_cfg())


# ---------------------------------------------------------------------- ViT
@pytest.mark.parametrize("frames,h,w", [(1, 56, 84), (5, 28, 56), (4, 84, 28)])
def test_vit_patch_and_token_counts(vit, vit_cfg, frames, h, w):
    x = torch.rand(frames, 3, h, w)
    patches, grid = vit_patches(x, vit_cfg)
    t2 = (frames + 1) // 2
    assert grid.dtype == torch.long and grid.tolist() == [t2, h // 14, w // 14]
    assert patches.shape == (t2 * (h // 14) * (w // 14), 3 * 2 * 14 * 14)
    n_merged = t2 * (h // 28) * (w // 28)
    assert vit_token_count(frames, h, w, vit_cfg) == n_merged
    out = encode_vit(vit, patches, grid)
    assert out.shape == (n_merged, vit_cfg.out_hidden_size)
    assert not out.requires_grad


def test_vit_key_list(vit, vit_cfg):
    per_block = ["norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight",
                 "mlp.up_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias"]
    expected = ["patch_embed.proj.weight"]
    expected += [f"blocks.{i}.{k}" for i in range(vit_cfg.depth) for k in per_block]
    expected += ["merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.0.bias",
                 "merger.mlp.2.weight", "merger.mlp.2.bias"]
    assert list(vit.state_dict().keys()) == expected
    assert vit.state_dict()["merger.mlp.2.weight"].shape == (vit_cfg.out_hidden_size, 4 * vit_cfg.hidden_size)
    assert vit.config._attn_implementation == "lance_flash_varlen"  # one varlen call per layer (vit.py)
    assert not any(p.requires_grad for p in vit.parameters())


def test_vit_trainable_follows_config():
    model = build_vit(tiny_vit_cfg(trainable=True))
    assert all(p.requires_grad for p in model.parameters())
    patches, grid = vit_patches(torch.rand(1, 3, 28, 28), tiny_vit_cfg())
    assert encode_vit(model, patches, grid).requires_grad


def test_vit_patches_match_hf_image_processor(vit_cfg):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = torch.randint(0, 256, (3, 56, 84), dtype=torch.uint8)
    ref = Qwen2VLImageProcessorPil()(images=[img], do_resize=False, return_tensors="pt")
    ours, grid = vit_patches(img.float()[None] / 255.0, vit_cfg)
    assert grid.tolist() == ref["image_grid_thw"][0].tolist()
    torch.testing.assert_close(ours, ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def test_vit_video_layout_and_odd_padding(vit_cfg):
    frames = torch.rand(3, 3, 28, 56)
    patches, grid = vit_patches(frames, vit_cfg)
    padded = torch.cat([frames, frames[-1:]])  # the odd video repeats its last frame
    assert torch.equal(patches, vit_patches(padded, vit_cfg)[0])
    # Row 0 = temporal group 0, merge window (0, 0), sub-patch (0, 0); columns (c, t, y, x).
    norm = (frames - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    row0 = patches[0].view(3, 2, 14, 14)
    torch.testing.assert_close(row0[:, 0], norm[0, :, :14, :14])
    torch.testing.assert_close(row0[:, 1], norm[1, :, :14, :14])
    # Row 1 = the next patch to the right inside the same 2x2 merge window; row 2 = the one below.
    torch.testing.assert_close(patches[1].view(3, 2, 14, 14)[:, 0], norm[0, :, :14, 14:28])
    torch.testing.assert_close(patches[2].view(3, 2, 14, 14)[:, 0], norm[0, :, 14:28, :14])
    # Row 4 = the next merge window to the right; rows of temporal group 1 follow all of group 0.
    torch.testing.assert_close(patches[4].view(3, 2, 14, 14)[:, 0], norm[0, :, :14, 28:42])
    per_t = int(grid[1] * grid[2])
    torch.testing.assert_close(patches[per_t].view(3, 2, 14, 14)[:, 0], norm[2, :, :14, :14])


def test_encode_vit_several_items(vit, vit_cfg):
    a, ga = vit_patches(torch.rand(1, 3, 56, 56), vit_cfg)
    b, gb = vit_patches(torch.rand(2, 3, 28, 84), vit_cfg)
    both = encode_vit(vit, torch.cat([a, b]), torch.stack([ga, gb]))
    torch.testing.assert_close(both, torch.cat([encode_vit(vit, a, ga), encode_vit(vit, b, gb)]),
                               atol=1e-5, rtol=1e-5)


def test_vit_bad_sizes_are_named(vit, vit_cfg):
    with pytest.raises(ValueError, match="30x56"):
        vit_patches(torch.rand(1, 3, 30, 56), vit_cfg)
    with pytest.raises(ValueError, match="28x42"):
        vit_token_count(1, 28, 42, vit_cfg)
    patches, _ = vit_patches(torch.rand(1, 3, 28, 28), vit_cfg)
    with pytest.raises(ValueError, match="needs 8 rows"):
        encode_vit(vit, patches, torch.tensor([1, 2, 4]))


# ---------------------------------------------------------------------- pixel VAE
@pytest.mark.parametrize("frames", [1, 5])
def test_pixel_vae_roundtrip_is_exact(frames):
    vae = build_vae(VaeConfig(kind="pixel", latent_channels=48, spatial_stride=4, temporal_stride=1))
    assert isinstance(vae, PixelVae) and not list(vae.parameters())
    video = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 48, frames, 4, 6) == (2, *vae.latent_shape(frames, 16, 24))
    assert torch.equal(vae.decode(z), video)
    # Channel c*s*s + i*s + j holds pixel (i, j) of each 4x4 cell, times the fixed scale.
    assert torch.equal(z[:, 1 * 16 + 2 * 4 + 3], video[:, 1, :, 2::4, 3::4] * PIXEL_SCALE)


def test_pixel_vae_bad_size():
    vae = PixelVae(4)
    with pytest.raises(ValueError, match="18x24"):
        vae.encode(torch.zeros(1, 3, 1, 18, 24))


# ---------------------------------------------------------------------- Wan2.2 VAE
def test_wan_shapes_and_frozen(wan):
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    z = wan.encode(video)
    assert z.shape == (1, 48, 2, 2, 3) == (1, *wan.latent_shape(5, 32, 48))
    out = wan.decode(z)
    assert out.shape == video.shape and out.abs().max() <= 1.0
    assert (wan.spatial_stride, wan.temporal_stride, wan.latent_channels) == (16, 4, 48)
    assert not any(p.requires_grad for p in wan.parameters())
    wan.train()
    assert not wan.training and not wan.model.training
    image = wan.encode(torch.zeros(2, 3, 1, 16, 16))
    assert image.shape == (2, 48, 1, 1, 1)


def test_wan_config_is_wan22(wan):
    c = wan.model.config
    assert (c.z_dim, c.in_channels, c.out_channels, c.patch_size, c.is_residual) == (48, 12, 12, 2, True)
    assert list(c.temperal_downsample) == [False, True, True]
    assert (c.scale_factor_temporal, c.scale_factor_spatial) == (4, 16)


def test_wan_normalisation_matches_diffusers(wan):
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    raw = wan.model.encode(video).latent_dist.mean
    assert len(WAN22_MEAN) == len(WAN22_STD) == 48
    mean = torch.tensor(WAN22_MEAN).view(1, 48, 1, 1, 1)
    std = torch.tensor(WAN22_STD).view(1, 48, 1, 1, 1)
    torch.testing.assert_close(wan.encode(video), (raw - mean) / std)
    # decode inverts the normalisation before the diffusers decoder
    z = torch.randn(1, 48, 2, 2, 2)
    torch.testing.assert_close(wan.decode(z), wan.model.decode(z * std + mean).sample)


def test_wan_bad_sizes_are_named(wan):
    with pytest.raises(ValueError, match="24x32"):
        wan.encode(torch.zeros(1, 3, 1, 24, 32))
    with pytest.raises(ValueError, match="4 frames"):
        wan.encode(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="4 frames"):
        wan.latent_shape(4, 32, 32)


# ---------------------------------------------------------------------- official Wan2.2 key names
# The inverse of the official -> diffusers mapping, written independently for the round trip.
_INV_RES = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight",
            "conv1.bias": "residual.2.bias", "norm2.gamma": "residual.3.gamma",
            "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
            "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def to_official(key: str, num_res_blocks: int) -> str:
    simple = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
    for a, b in simple.items():
        if key.startswith(a):
            return b + key[len(a):]
    coder, rest = key.split(".", 1)
    for a, b in {"conv_in.": "conv1.", "norm_out.": "head.0.", "conv_out.": "head.2."}.items():
        if rest.startswith(a):
            return f"{coder}.{b}{rest[len(a):]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{coder}.middle.1.{m.group(1)}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", rest):
        return f"{coder}.middle.{2 * int(m.group(1))}.{_INV_RES[m.group(2)]}"
    outer = "downsamples" if coder == "encoder" else "upsamples"
    if m := re.match(r"(?:down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{coder}.{outer}.{m.group(1)}.{outer}.{m.group(2)}.{_INV_RES[m.group(3)]}"
    if m := re.match(r"(?:down|up)_blocks\.(\d+)\.(?:downsampler|upsampler)\.(.+)", rest):
        n = num_res_blocks if coder == "encoder" else num_res_blocks + 1
        return f"{coder}.{outer}.{m.group(1)}.{outer}.{n}.{m.group(2)}"
    raise AssertionError(f"unmapped diffusers key {key}")


def official_state_dict(wan: WanVae) -> dict[str, torch.Tensor]:
    return {to_official(k, 1): v.clone() for k, v in wan.model.state_dict().items()}


def test_official_key_names_known_examples():
    # Literal official names (from the Wan2.2 VAE / diffusers' conversion script).
    cases = {
        "conv1.weight": "quant_conv.weight",
        "conv2.bias": "post_quant_conv.bias",
        "encoder.conv1.weight": "encoder.conv_in.weight",
        "encoder.middle.0.residual.0.gamma": "encoder.mid_block.resnets.0.norm1.gamma",
        "decoder.middle.2.residual.6.weight": "decoder.mid_block.resnets.1.conv2.weight",
        "decoder.middle.1.to_qkv.weight": "decoder.mid_block.attentions.0.to_qkv.weight",
        "encoder.head.0.gamma": "encoder.norm_out.gamma",
        "decoder.head.2.bias": "decoder.conv_out.bias",
        "encoder.downsamples.1.downsamples.0.shortcut.weight":
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.downsamples.2.downsamples.2.time_conv.weight":
            "encoder.down_blocks.2.downsampler.time_conv.weight",
        "decoder.upsamples.0.upsamples.3.resample.1.bias": "decoder.up_blocks.0.upsampler.resample.1.bias",
        "decoder.upsamples.3.upsamples.2.residual.3.gamma": "decoder.up_blocks.3.resnets.2.norm2.gamma",
    }
    for official, diffusers in cases.items():
        assert official_to_diffusers_key(official) == diffusers
    assert official_to_diffusers_key("encoder.downsamples.0.upsamples.0.residual.0.gamma") is None
    assert official_to_diffusers_key("model.conv1.weight") is None


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_official_weights_roundtrip(wan, tmp_path, suffix):
    sd = official_state_dict(wan)
    assert "encoder.downsamples.1.downsamples.1.time_conv.weight" in sd
    assert "decoder.upsamples.0.upsamples.2.time_conv.weight" in sd
    path = tmp_path / f"Wan2.2_VAE{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file
        save_file(sd, str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the load
    loaded = load_vae(tiny_wan_cfg(weights=str(path)))
    ref = wan.model.state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_diffusers_directory(wan, tmp_path):
    wan.model.save_pretrained(tmp_path / "vae")
    loaded = build_vae(tiny_wan_cfg(weights=str(tmp_path / "vae")))
    for k, v in wan.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k


def test_weight_errors_are_named(wan, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vae(tiny_wan_cfg(weights=str(missing)))

    sd = official_state_dict(wan)
    sd.pop("decoder.head.2.bias")
    sd["encoder.middle.0.residual.9.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad_keys.pth")
    with pytest.raises(VaeWeightsError, match=r"encoder\.middle\.0\.residual\.9\.weight"):
        load_vae(tiny_wan_cfg(weights=str(tmp_path / "bad_keys.pth")))

    sd = official_state_dict(wan)
    sd.pop("decoder.head.2.bias")
    torch.save(sd, tmp_path / "missing_key.pth")
    with pytest.raises(VaeWeightsError, match=r"missing keys \['decoder\.conv_out\.bias'\]"):
        load_vae(tiny_wan_cfg(weights=str(tmp_path / "missing_key.pth")))

    sd = official_state_dict(wan)
    sd["decoder.head.2.bias"] = torch.zeros(7)
    torch.save(sd, tmp_path / "bad_shape.pth")
    with pytest.raises(VaeWeightsError, match=r"decoder\.conv_out\.bias.*\(7,\).*\(12,\)"):
        load_vae(tiny_wan_cfg(weights=str(tmp_path / "bad_shape.pth")))


def test_build_vae_rejects_bad_wan_config():
    with pytest.raises(ValueError, match="spatial_stride"):
        build_vae(tiny_wan_cfg(dim_mult=(1, 2, 2)))
    with pytest.raises(ValueError, match="latent_channels"):
        build_vae(tiny_wan_cfg(latent_channels=16))

"""Curation with one encoder off (`encode.vit: false` / `encode.vae: false`): the rows still become
shard rows (the copies the disabled encoder would have read are not written), with the other
encoder's outputs and no columns of the disabled one."""
from __future__ import annotations

import pytest
from test_official_layout import CONFIG, curate

from data_curation.config import CurationConfig
from lance_platform.config import load_config


@pytest.mark.parametrize("off", ["vit", "vae"])
def test_one_encoder_off_still_writes_shards(tmp_path, off):
    cfg = load_config(CurationConfig, CONFIG, [
        "sources=[{kind: synthetic, name: s, synthetic: {images: 3, videos: 0, edits: 0, qa: 2}}]",
        "tracking.enabled=false", f"encode.{off}=false", "model.preset=tiny"])
    _, back = curate(cfg, tmp_path, encoders=("vae",) if off == "vit" else ("vit",))
    assert len(back) == 5 and {r["task"] for r in back} == {"t2i", "i2t"}
    # the other encoder's output where the task has that copy: a t2i target's latent, an i2t image's tokens
    kept_task, kept = ("t2i", "target_vae_latent") if off == "vit" else ("i2t", "source_vit_tokens")
    dropped = "vit_tokens" if off == "vit" else "vae_latent"
    assert all(r[kept] is not None for r in back if r["task"] == kept_task)
    for r in back:
        assert all(r.get(f"{slot}_{dropped}") is None for slot in ("source", "target")), r["task"]
        assert not any(k.endswith(("_vae_in", "_vit_in")) for k in r)

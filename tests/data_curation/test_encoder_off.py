"""Curation with one encoder off (`encode.vit: false` / `encode.vae: false`): the rows still become
shard rows (the copies the disabled encoder would have read are not written), with the other
encoder's outputs and no columns of the disabled one."""
from __future__ import annotations

from pathlib import Path

import pytest

from data_curation.config import CurationConfig
from data_curation.sources import list_source
from data_curation.stages import (
    PREPARE_COLUMNS,
    InspectStage,
    PrepareStage,
    TokenizeStage,
    VaeStage,
    VitStage,
    rows_of,
    shard_row,
    to_batch,
)
from lance_model.config import LanceConfig
from lance_platform.config import load_config
from lance_platform.schema import read_shard, write_shard

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "curation" / "synthetic.yaml"
TINY = LanceConfig.from_preset("tiny")


@pytest.mark.parametrize("off", ["vit", "vae"])
def test_one_encoder_off_still_writes_shards(tmp_path, off):
    cfg = load_config(CurationConfig, CONFIG, [
        "sources=[{kind: synthetic, name: s, synthetic: {images: 3, videos: 0, edits: 0, qa: 2}}]",
        "tracking.enabled=false", f"encode.{off}=false", "model.preset=tiny"])
    items = [i.__dict__ for i in list_source(cfg.sources[0])]
    inspect = InspectStage(cfg)
    stage = PrepareStage(cfg, TINY.vae.spatial_stride, TINY.vit.stride)
    prepared = [stage.prepare({**i, "sample_id": inspect.inspect(i)["sample_id"]}) for i in items]
    batch = to_batch(prepared, PREPARE_COLUMNS)
    encoder = VaeStage(cfg.model) if off == "vit" else VitStage(cfg.model)
    batch = TokenizeStage(TINY.tokenizer)(encoder(batch))
    rows = [{k: v for k, v in shard_row(r).items() if k not in ("status", "reason", "detail")}
            for r in rows_of(batch)]
    back = read_shard(write_shard(rows, tmp_path / "shard-00000.parquet")).to_pylist()
    assert len(back) == 5 and {r["task"] for r in back} == {"t2i", "i2t"}
    # the other encoder's output where the task has that copy: a t2i target's latent, an i2t image's tokens
    kept_task, kept = ("t2i", "target_vae_latent") if off == "vit" else ("i2t", "source_vit_tokens")
    dropped = "vit_tokens" if off == "vit" else "vae_latent"
    assert all(r[kept] is not None for r in back if r["task"] == kept_task)
    for r in back:
        assert all(r.get(f"{slot}_{dropped}") is None for slot in ("source", "target")), r["task"]
        assert not any(k.endswith(("_vae_in", "_vit_in")) for k in r)

"""Optional `<slot>_pixels` (output.store_pixels): PNG / MP4 bytes of the bucketed media that decode
to the bucket size, carried through the encoder stages into a shard (no Ray)."""
from __future__ import annotations

import io
from pathlib import Path

import decord
import numpy as np
import pytest
from PIL import Image

from data_curation.buckets import bucket_size
from data_curation.config import CurationConfig
from data_curation.sources import Fetcher, list_source
from data_curation.stages import (
    PREPARE_COLUMNS,
    PrepareStage,
    TokenizeStage,
    VaeStage,
    VitStage,
    rows_of,
    shard_row,
    to_batch,
)
from lance_model.config import LanceConfig
from lance_platform.config import ConfigError, load_config
from lance_platform.schema import read_shard, write_shard

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "curation" / "synthetic.yaml"
SYNTH = "sources=[{kind: synthetic, name: s, synthetic: {images: 1, videos: 1, edits: 1, qa: 1}}]"


def prepared(*overrides: str) -> tuple[CurationConfig, list[dict]]:
    cfg = load_config(CurationConfig, CONFIG, [SYNTH, "tracking.enabled=false", *overrides])
    model = LanceConfig.from_preset("tiny")
    stage = PrepareStage(cfg, model.vae.spatial_stride, model.vit.stride)
    fetcher = Fetcher()
    rows = []
    for item in list_source(cfg.sources[0]):
        sample_id = fetcher.fetch(item.__dict__).sample_id()
        rows.append(stage.prepare({**item.__dict__, "sample_id": sample_id}))
    return cfg, rows


def decode_pixels(data: bytes) -> np.ndarray:
    """[F, H, W, 3] from PNG or MP4 bytes."""
    if data.startswith(b"\x89PNG"):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None]
    reader = decord.VideoReader(io.BytesIO(data))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


@pytest.fixture(scope="module")
def with_pixels():
    return prepared("output.store_pixels=true")


def test_pixels_decode_to_the_bucket_size(with_pixels):
    cfg, rows = with_pixels
    b = cfg.buckets
    vae_stride, vit_stride = 4, 28   # the tiny preset's pixel VAE and ViT (patch 14 x merge 2)
    by_task = {r["task"]: r for r in rows}
    assert set(by_task) == {"t2i", "t2v", "i2i", "i2t"}
    expected = {  # (task, slot) -> (format, frames, (h, w)); 64x96 input -> the 4:3 bucket
        ("t2i", "target"): ("png", 1, bucket_size("4:3", b.vae_image_area, vae_stride)),
        ("t2v", "target"): ("mp4", by_task["t2v"]["num_frames"], bucket_size("4:3", b.vae_video_area, vae_stride)),
        ("i2i", "target"): ("png", 1, bucket_size("4:3", b.vae_image_area, vae_stride)),
        ("i2i", "source"): ("png", 1, bucket_size("4:3", b.vae_image_area, vae_stride)),   # the VAE copy
        ("i2t", "source"): ("png", 1, bucket_size("4:3", b.vit_image_area, vit_stride)),   # only a ViT copy
    }
    got = {}
    for (task, slot), (fmt, frames, hw) in expected.items():
        row = by_task[task]
        data = row.get(f"{slot}_pixels")
        assert data.startswith(b"\x89PNG") == (fmt == "png"), (task, slot)
        pixels = decode_pixels(data)
        got[task, slot] = (fmt, len(pixels), pixels.shape[1:3])
        copy = row[f"{slot}_vae_in"] if row[f"{slot}_vae_in"].size else row[f"{slot}_vit_in"]
        assert pixels.shape == copy.shape
        tol = 0 if fmt == "png" else 12   # PNG is lossless; H.264 at crf 18 is close
        assert np.abs(pixels.astype(int) - copy.astype(int)).mean() <= tol, (task, slot)
    assert got == expected
    assert by_task["t2v"]["num_frames"] == 9
    assert by_task["t2i"].get("source_pixels") is None and by_task["i2t"].get("target_pixels") is None


def test_pixels_off_by_default():
    cfg, rows = prepared()
    assert cfg.output.store_pixels is False
    assert all(r.get(f"{s}_pixels") is None for r in rows for s in ("target", "source"))
    with pytest.raises(ConfigError, match="output.store_pixels"):
        load_config(CurationConfig, CONFIG, ["output.store_pixels=3"])


def test_pixels_reach_the_shard(with_pixels, tmp_path):
    cfg, rows = with_pixels
    batch = to_batch(rows, PREPARE_COLUMNS)
    batch = TokenizeStage(LanceConfig.from_preset("tiny").tokenizer)(VitStage(cfg.model)(VaeStage(cfg.model)(batch)))
    out = [shard_row(r) for r in rows_of(batch)]
    drop = ("status", "reason", "detail")
    path = write_shard([{k: v for k, v in r.items() if k not in drop} for r in out], tmp_path / "s.parquet")
    stored = {r["task"]: r for r in read_shard(path).to_pylist()}
    for row in rows:
        for slot in ("target", "source"):
            assert stored[row["task"]][f"{slot}_pixels"] == row.get(f"{slot}_pixels")

"""Shard schema: tensor round trips, version checks, rows -> model samples."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from lance_platform.schema import (
    SCHEMA_VERSION,
    VERSION_KEY,
    SchemaVersionError,
    bytes_to_tensor,
    read_shard,
    row_to_sample,
    shard_schema,
    tensor_to_bytes,
    write_shard,
)


def test_bf16_bytes_round_trip():
    t = torch.randn(2, 3, 4, 48)
    back = bytes_to_tensor(tensor_to_bytes(t), t.shape)
    assert torch.equal(back, t.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"shape \(5,\) needs 5"):
        bytes_to_tensor(tensor_to_bytes(torch.zeros(4)), (5,))


def test_write_read_rows_to_samples(tmp_path):
    lat = torch.randn(1, 3, 4, 48)
    vit = torch.randn(6, 64)
    rows = [
        {"sample_id": "a", "task": "t2i", "caption": "hi", "target_vae_latent": tensor_to_bytes(lat),
         "target_vae_shape": [1, 3, 4, 48]},
        {"sample_id": "b", "task": "i2t", "question": "q?", "answer": "ok", "source_vit_tokens": tensor_to_bytes(vit),
         "source_vit_shape": [6, 64], "source_vit_grid": [1, 4, 6]},
        {"sample_id": "c", "task": "i2i", "caption": "edit", "target_vae_latent": tensor_to_bytes(lat),
         "target_vae_shape": [1, 3, 4, 48], "source_vae_latent": tensor_to_bytes(lat), "source_vae_shape": [1, 3, 4, 48],
         "source_vit_tokens": tensor_to_bytes(vit), "source_vit_shape": [6, 64], "source_vit_grid": [1, 4, 6]},
    ]
    path = write_shard(rows, tmp_path / "shard-00000.parquet", encoder={"vae": "pixel"})
    table = read_shard(path)
    assert table.num_rows == 3 and table.schema.names == shard_schema().names
    samples = [row_to_sample(r) for r in table.to_pylist()]
    assert [s.task for s in samples] == ["t2i", "i2t", "image_edit"]
    assert torch.equal(samples[0].target.latent, lat.to(torch.bfloat16).float().permute(3, 0, 1, 2))
    assert samples[1].answer == "ok" and samples[1].source.vit_grid == (1, 4, 6)
    assert torch.equal(samples[2].source.vit_tokens, vit.to(torch.bfloat16).float())
    assert not list(tmp_path.glob(".*tmp*"))


def test_reader_refuses_unknown_schema_version(tmp_path):
    path = write_shard([{"sample_id": "a", "task": "t2i"}], tmp_path / "s.parquet")
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({VERSION_KEY: b"99"}), path)
    with pytest.raises(SchemaVersionError, match=rf"version 99 .*reader version {SCHEMA_VERSION}"):
        read_shard(path)

"""Fixtures for training tests: a small curated corpus written straight in the shard schema."""
from __future__ import annotations

import random

import pytest
import torch

from lance_platform.schema import tensor_to_bytes, write_shard

WORDS = ["OPEN", "STOP", "EXIT", "SALE"]


def make_rows(n: int, seed: int = 0, hidden: int = 64) -> list[dict]:
    """t2i / i2t / i2i rows with small random latents and ViT tokens (tiny preset widths)."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(WORDS)
        lat = torch.randn(1, 2, 3, 48, generator=g)
        vit = torch.randn(6, hidden, generator=g)
        common = {"source_uri": f"synthetic://{seed}/{i}", "height": 8, "width": 12, "num_frames": 1, "bucket": "3:2"}
        rows.append({**common, "sample_id": f"t2i-{seed}-{i}", "task": "t2i", "caption": f'a sign "{word}"',
                     "target_vae_latent": tensor_to_bytes(lat), "target_vae_shape": [1, 2, 3, 48]})
        rows.append({**common, "sample_id": f"i2t-{seed}-{i}", "task": "i2t", "question": "What does it say?",
                     "answer": word, "source_vit_tokens": tensor_to_bytes(vit), "source_vit_shape": [6, hidden],
                     "source_vit_grid": [1, 4, 6]})
        rows.append({**common, "sample_id": f"i2i-{seed}-{i}", "task": "i2i", "caption": f'change the text to "{word}"',
                     "target_vae_latent": tensor_to_bytes(lat.flip(1)), "target_vae_shape": [1, 2, 3, 48],
                     "source_vae_latent": tensor_to_bytes(lat), "source_vae_shape": [1, 2, 3, 48],
                     "source_vit_tokens": tensor_to_bytes(vit), "source_vit_shape": [6, hidden],
                     "source_vit_grid": [1, 4, 6]})
    return rows


@pytest.fixture
def shard_dir(tmp_path):
    rows = make_rows(8)
    out = tmp_path / "shards"
    write_shard(rows[:12], out / "shard-00000.parquet")
    write_shard(rows[12:], out / "shard-00001.parquet")
    return out


@pytest.fixture
def row_factory():
    return make_rows

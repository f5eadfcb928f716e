"""Fixtures for training tests: a small curated corpus written straight in the shard schema, with
the token ids and the tokenizer record curation stores (the tiny preset's byte tokenizer)."""
from __future__ import annotations

import random

import pytest
import torch

from lance_model.tokenizer import ByteTokenizer, tokenizer_record
from lance_platform.schema import tensor_to_bytes, write_shard

WORDS = ["OPEN", "STOP", "EXIT", "SALE"]
BYTES = ByteTokenizer()
BYTE_RECORD = tokenizer_record(BYTES)


def with_ids(row: dict) -> dict:
    """The row with `<field>_ids` of its texts, as curation's tokenize stage stores them."""
    return {**row, **{f"{k}_ids": BYTES.encode(row[k]) for k in ("caption", "question", "answer") if row.get(k)}}


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
    return [with_ids(r) for r in rows]


@pytest.fixture
def shard_dir(tmp_path):
    rows = make_rows(8)
    out = tmp_path / "shards"
    write_shard(rows[:12], out / "shard-00000.parquet", tokenizer=BYTE_RECORD)
    write_shard(rows[12:], out / "shard-00001.parquet", tokenizer=BYTE_RECORD)
    return out


@pytest.fixture
def row_factory():
    return make_rows


@pytest.fixture
def fail_once_at_step(monkeypatch):
    """`arm(step)`: in the next `run_stage`, the rank-0 worker raises once when it is about to pack
    `step`, leaving `<stage dir>/.fault_injected` (holding the step) so that the restarted worker
    goes on; Ray Train then resumes the stage from its last checkpoint. Test-only fault injection:
    the entry point `run_stage` hands to Ray Train is replaced by one that patches the packer inside
    the worker process (a nested function, so Ray ships it by value)."""
    from pipelines import trainer

    def arm(fail_step: int) -> None:
        def failing_entry(config: dict) -> None:
            from pathlib import Path

            import ray.train

            from pipelines import batching
            from pipelines.train_loop import train_loop

            marker = Path(config["storage_dir"]) / ".fault_injected"
            rank = ray.train.get_context().get_world_rank()
            original = batching.Packer.next_pack

            def next_pack(self, step, *args, **kwargs):
                if step == fail_step and rank == 0 and not marker.exists():
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text(str(step))
                    raise RuntimeError(f"injected failure at step {step}")
                return original(self, step, *args, **kwargs)

            batching.Packer.next_pack = next_pack
            try:
                train_loop(config)
            finally:
                batching.Packer.next_pack = original

        monkeypatch.setattr(trainer, "_train_loop_entry", failing_entry)

    return arm

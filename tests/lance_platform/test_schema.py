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


def _x2t_row(**text) -> dict:
    vit = torch.randn(4, 64)
    return {"sample_id": "q", "task": "i2t", "source_vit_tokens": tensor_to_bytes(vit), "source_vit_shape": [4, 64],
            "source_vit_grid": [1, 4, 4], **text}


def test_x2t_instruction_becomes_the_system_prompt_with_its_ids():
    from lance_model.sequence import CAPTION, SequenceBuilder
    from lance_model.tokenizer import IM_END, IM_START, load_tokenizer

    tok = load_tokenizer("byte")
    instruction, question = "Read the sign.", "What does it say?"
    row = _x2t_row(caption=instruction, caption_ids=tok.encode(instruction), question=question,
                   question_ids=tok.encode(question), answer="OPEN", answer_ids=tok.encode("OPEN"))
    sample = row_to_sample(row)
    assert (sample.system, sample.system_ids) == (instruction, tok.encode(instruction))
    assert (sample.caption, sample.caption_ids) == (question, tok.encode(question))
    rendered = SequenceBuilder(tok).render(sample)
    assert rendered.splits[0].text_ids == tok.encode(f"{IM_START}system\n{instruction}{IM_END}\n{IM_START}user\n")
    assert [s.text_ids for s in rendered.splits if s.modality == CAPTION] == [tok.encode(question)]
    # ids stored by another tokenizer run are used as they are, not re-encoded from the text
    odd = row_to_sample({**row, "caption_ids": [7, 8, 9]})
    head = SequenceBuilder(tok).render(odd).splits[0].text_ids
    assert head == [*tok.encode(f"{IM_START}system\n"), 7, 8, 9, *tok.encode(f"{IM_END}\n{IM_START}user\n")]


def test_x2t_empty_question_and_missing_instruction():
    only_instruction = row_to_sample(_x2t_row(caption="Describe it.", question=None, answer="x"))
    assert only_instruction.system == "Describe it." and only_instruction.caption == ""
    assert only_instruction.caption_ids is None and only_instruction.system_ids is None  # no stored ids
    plain = row_to_sample(_x2t_row(question="q?", question_ids=[1, 2], answer="x"))
    assert plain.system is None and plain.system_ids is None and plain.caption_ids == [1, 2]


def test_i2v_row_carries_the_source_latent_as_the_clean_first_frame():
    from lance_model.generation import _clean_frames

    target, first = torch.randn(3, 4, 6, 8), torch.randn(1, 4, 6, 8)  # stored [t, h, w, c]
    row = {"sample_id": "v", "task": "i2v", "caption": "waves", "target_vae_latent": tensor_to_bytes(target),
           "target_vae_shape": [3, 4, 6, 8], "source_vae_latent": tensor_to_bytes(first),
           "source_vae_shape": [1, 4, 6, 8]}
    sample = row_to_sample(row)
    assert sample.task == "i2v" and sample.target.clean_frames == 1 and sample.target.latent_shape == (3, 4, 6)
    n, clean = _clean_frames(sample)
    expected = first.to(torch.bfloat16).float().permute(3, 0, 1, 2).flatten(1).transpose(0, 1)
    assert n == 1 and torch.equal(clean, expected)


def test_a_trainable_vit_reads_the_stored_pixels_and_learns_through_them(tiny_config):
    """With `vit.trainable` a row's ViT input is the patches of its stored PNG at the ViT grid's
    size (the tower runs, and gets gradients, in the forward); a frozen tower keeps the stored
    tokens; a row without pixels names the curation option that stores them."""
    import dataclasses
    import io

    import numpy as np
    from PIL import Image

    from lance_model.encoders.vit import vit_patches
    from lance_model.model import Lance
    from lance_model.packing import pack_samples
    from lance_model.sequence import SequenceBuilder
    from lance_model.tokenizer import load_tokenizer

    image = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    row = _x2t_row(question="q?", answer="ok", source_pixels=png.getvalue())
    frozen = row_to_sample(row, tiny_config.vit)
    assert frozen.source.vit_tokens is not None and frozen.source.vit_patches is None

    vit = dataclasses.replace(tiny_config.vit, trainable=True)
    sample = row_to_sample(row, vit)
    expected = vit_patches(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, vit)[0]
    assert sample.source.vit_tokens is None and torch.equal(sample.source.vit_patches, expected)
    assert sample.source.vit_grid == (1, 4, 4)

    # the stored copy at another size (a VAE copy) is resized to the ViT grid first
    big = io.BytesIO()
    Image.fromarray(np.asarray(Image.fromarray(image).resize((112, 112)))).save(big, format="PNG")
    assert row_to_sample({**row, "source_pixels": big.getvalue()}, vit).source.vit_patches.shape == expected.shape

    cfg = dataclasses.replace(tiny_config, vit=vit)
    model = Lance(cfg)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    builder = SequenceBuilder(load_tokenizer(cfg.tokenizer), cfg.vit.spatial_merge_size)
    model(pack_samples([sample], builder, cfg)).loss.backward()
    grads = [p.grad for p in model.vit_model.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)

    with pytest.raises(ValueError, match=r"no source_pixels: curate with output\.store_pixels: true"):
        row_to_sample(_x2t_row(question="q?", answer="ok"), vit)

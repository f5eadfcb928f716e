"""Official-layout rows through curation into training samples, at unit level (no Ray):
list_source -> InspectStage / PrepareStage -> encoder stages -> shard -> row_to_sample -> SequenceBuilder.

- an i2v record's source image (the clip's first frame) gets a VAE copy in the target's bucket and
  size, so its latent is the clean first latent frame the sampler fixes; a record without a
  source image takes the clip's own first frame;
- an i2t Parquet row's instruction (`caption_i`) becomes the system prompt of the training sample,
  its question (`caption_q`) the user text after the image, with the stored token ids;
- an empty `caption_q` is accepted when `caption_i` is there; a row with neither is `missing_question`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_curation.buckets import bucket_size
from data_curation.config import CurationConfig
from data_curation.media import encode_image, encode_video
from data_curation.sources import Fetcher, list_source
from data_curation.stages import (
    PREPARE_COLUMNS,
    InspectStage,
    PrepareStage,
    TokenizeStage,
    VaeStage,
    VitStage,
    rows_of,
    shard_row,
    slot_copies,
    to_batch,
)
from data_curation.synthetic import render_moving_video, render_text_image
from lance_model.config import LanceConfig
from lance_model.generation import _clean_frames
from lance_model.sequence import CAPTION, TEMPLATE, SequenceBuilder, system_prompt
from lance_model.tokenizer import IM_END, IM_START, load_tokenizer
from lance_platform.config import load_config
from lance_platform.schema import read_shard, row_to_sample, write_shard

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "curation" / "synthetic.yaml"
H, W = 64, 96
TINY = LanceConfig.from_preset("tiny")
INSTRUCTION = "You read signs aloud. Answer with the sign's text only."
QUESTION = "What does the sign say?"


def config(source: str) -> CurationConfig:
    return load_config(CurationConfig, CONFIG, [f"sources=[{source}]", "tracking.enabled=false"])


def curate(cfg: CurationConfig, tmp_path: Path, encoders: tuple[str, ...] = ("vae", "vit")
           ) -> tuple[dict[str, dict], list[dict]]:
    """(inspect rows by source_uri, shard rows read back) of every item of the config's one source,
    through the `encoders` named (the pipeline's order: VAE, then ViT)."""
    items = [i.__dict__ for i in list_source(cfg.sources[0])]
    inspected = {r["source_uri"]: r for r in (InspectStage(cfg).inspect(i) for i in items)}
    stage = PrepareStage(cfg, TINY.vae.spatial_stride, TINY.vit.stride)
    prepared = [stage.prepare({**i, "sample_id": inspected[i["source_uri"]]["sample_id"]})
                for i in items if inspected[i["source_uri"]]["status"] == "ok"]
    batch = to_batch(prepared, PREPARE_COLUMNS)
    for name, stage_class in (("vae", VaeStage), ("vit", VitStage)):
        if name in encoders:
            batch = stage_class(cfg.model)(batch)
    batch = TokenizeStage(TINY.tokenizer)(batch)
    drop = ("status", "reason", "detail")
    rows = [{k: v for k, v in shard_row(r).items() if k not in drop} for r in rows_of(batch)]
    path = write_shard(rows, tmp_path / "shard-00000.parquet")
    return inspected, read_shard(path).to_pylist()


# ---------------------------------------------------------------------------------------- i2v
@pytest.fixture(scope="module")
def i2v_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v")
    clip = render_moving_video("RAY", H, W, 13, seed=5)
    (root / "with_source.mp4").write_bytes(encode_video(clip, 12))
    (root / "first.png").write_bytes(encode_image(clip[0]))
    (root / "own_frame.mp4").write_bytes(encode_video(render_moving_video("DATA", H, W, 13, seed=6), 12))
    records = [{"path": "with_source.mp4", "task": "i2v", "caption": "the word RAY slides", "source_path": "first.png"},
               {"path": "own_frame.mp4", "task": "i2v", "caption": "the word DATA slides"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = config(f"{{kind: folder, name: f, uri: '{root}', captions: captions.jsonl}}")
    stage = PrepareStage(cfg, TINY.vae.spatial_stride, TINY.vit.stride)
    fetcher = Fetcher()
    prepared = {}
    for item in list_source(cfg.sources[0]):
        sample_id = fetcher.fetch(item.__dict__).sample_id()
        prepared[Path(item.source_uri).name] = stage.prepare({**item.__dict__, "sample_id": sample_id})
    return cfg, prepared, curate(cfg, root / "out")[1]


def test_i2v_source_gets_a_vae_copy_only():
    assert slot_copies("i2v", "source") == (True, False)
    assert slot_copies("i2v", "target") == (True, False)
    assert slot_copies("t2v", "source") == (False, False)


def test_i2v_source_copy_is_the_first_frame_in_the_target_size(i2v_rows):
    cfg, prepared, _ = i2v_rows
    h, w = bucket_size("4:3", cfg.buckets.vae_video_area, TINY.vae.spatial_stride)  # 64x96 -> 4:3 bucket
    for name in ("with_source.mp4", "own_frame.mp4"):
        row = prepared[name]
        assert row["status"] == "ok" and row["bucket"] == "4:3"
        target, source = row["target_vae_in"], row["source_vae_in"]
        assert target.shape == (row["num_frames"], h, w, 3) and row["num_frames"] % 4 == 1
        assert source.shape == (1, h, w, 3) and row["source_vit_in"].size == 0
    own = prepared["own_frame.mp4"]
    assert np.array_equal(own["source_vae_in"][0], own["target_vae_in"][0])  # the clip's own first frame
    given = prepared["with_source.mp4"]  # the PNG of frame 0 vs frame 0 decoded from H.264: close
    assert np.abs(given["source_vae_in"].astype(int) - given["target_vae_in"][:1].astype(int)).mean() < 12


def test_i2v_sample_has_the_clean_first_frame_latent(i2v_rows):
    _, _, rows = i2v_rows
    assert len(rows) == 2
    for row in rows:
        t, h, w, c = row["target_vae_shape"]
        assert row["source_vae_shape"] == [1, h, w, c] and t > 1
        sample = row_to_sample(row)
        assert sample.task == "i2v" and sample.target.clean_frames == 1
        assert sample.source.latent.shape == (c, 1, h, w)
        n, clean = _clean_frames(sample)
        assert n == 1 and clean.shape == (h * w, c)
        # the pixel VAE encodes a frame on its own: the source latent is the target's first latent frame
        # (exactly for the clip's own frame, closely for the separate PNG)
        first = sample.target.latent[:, :1]
        assert (sample.source.latent - first).abs().mean() < 0.1
    own = next(row_to_sample(r) for r in rows if r["source_uri"].endswith("own_frame.mp4"))
    assert torch.equal(own.source.latent, own.target.latent[:, :1])


# ---------------------------------------------------------------------------------------- i2t
@pytest.fixture(scope="module")
def i2t_parquet(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2t")
    words = ["OPEN", "STOP", "EXIT", "SALE"]
    images = [encode_image(render_text_image(word, H, W, i)) for i, word in enumerate(words)]
    table = pa.table({"image_bytes": images,
                      "caption_i": [INSTRUCTION, INSTRUCTION, None, None],
                      "caption_q": [QUESTION, "", QUESTION, ""],
                      "caption_a": words})
    pq.write_table(table, root / "qa.parquet")
    cfg = config(f"{{kind: parquet, name: pq, layout: i2t, uri: '{root / 'qa.parquet'}'}}")
    inspected, rows = curate(cfg, root / "out")
    return inspected, {r["answer"]: r for r in rows}


def test_empty_question_is_accepted_with_an_instruction(i2t_parquet):
    inspected, rows = i2t_parquet
    status = {uri.rsplit("row=", 1)[1]: (r["status"], r["reason"]) for uri, r in inspected.items()}
    assert status == {"0": ("ok", None), "1": ("ok", None), "2": ("ok", None),
                      "3": ("quarantined", "missing_question")}
    assert sorted(rows) == ["EXIT", "OPEN", "STOP"]
    assert rows["STOP"]["caption"] == INSTRUCTION and rows["STOP"]["question"] is None
    assert rows["EXIT"]["caption"] is None and rows["EXIT"]["question"] == QUESTION


def _template_text(tok, split) -> str:
    return tok.decode(split.text_ids)


def test_instruction_is_the_system_prompt_of_the_sample(i2t_parquet):
    _, rows = i2t_parquet
    tok = load_tokenizer(TINY.tokenizer)
    builder = SequenceBuilder(tok)
    row = rows["OPEN"]
    assert row["caption_ids"] == tok.encode(INSTRUCTION) and row["question_ids"] == tok.encode(QUESTION)
    sample = row_to_sample(row)
    assert sample.system == INSTRUCTION and sample.system_ids == row["caption_ids"]
    assert sample.caption == QUESTION and sample.caption_ids == row["question_ids"]
    rendered = builder.render(sample)
    head = rendered.splits[0]
    assert head.modality == TEMPLATE
    # stored ids give exactly the tokens of the text path
    assert head.text_ids == tok.encode(f"{IM_START}system\n{INSTRUCTION}{IM_END}\n{IM_START}user\n")
    captions = [s for s in rendered.splits if s.modality == CAPTION]
    assert [s.text_ids for s in captions] == [row["question_ids"]]
    assert [s.kind for s in rendered.splits[:3]] == ["text", "vit", "text"]  # system+user, image, question


def test_empty_question_renders_the_instruction_alone(i2t_parquet):
    _, rows = i2t_parquet
    tok = load_tokenizer(TINY.tokenizer)
    sample = row_to_sample(rows["STOP"])
    assert sample.system == INSTRUCTION and sample.caption == "" and sample.caption_ids is None
    rendered = SequenceBuilder(tok).render(sample)
    assert not [s for s in rendered.splits if s.modality == CAPTION]
    assert INSTRUCTION in tok.decode(rendered.splits[0].text_ids)
    answer = [s for s in rendered.splits if s.ce]
    assert len(answer) == 1 and answer[0].text_ids == [*rows["STOP"]["answer_ids"], tok.special_id(IM_END)]


def test_row_without_instruction_keeps_the_default_prompt(i2t_parquet):
    _, rows = i2t_parquet
    tok = load_tokenizer(TINY.tokenizer)
    sample = row_to_sample(rows["EXIT"])
    assert sample.system is None and sample.system_ids is None
    head = SequenceBuilder(tok).render(sample).splits[0]
    assert tok.decode(head.text_ids) == f"{IM_START}system\n{system_prompt('i2t')}{IM_END}\n{IM_START}user\n"

"""The captioning stage on CPU with a tiny random Lance checkpoint: each captioned row's caption is
exactly the model's greedy x2t decode of the row's frames, the web caption is kept beside it, the
model is recorded, other tasks pass through, and the config refuses what cannot run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_curation.captioning import CaptionStage, caption_frames, captioner_tag
from data_curation.config import CaptionConfig
from data_curation.media import encode_image, encode_video
from data_curation.sources import Fetcher, list_source
from data_curation.stages import PREPARE_COLUMNS, PrepareStage, load_item, to_batch
from data_curation.synthetic import render_moving_video, render_text_image
from lance_model import Lance, LanceConfig
from lance_model.generation import LanceGenerator, Request, TextOptions
from lance_platform.config import ConfigError

TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("captioner")
    torch.manual_seed(0)
    model = Lance(LanceConfig.from_preset("tiny"))
    model.init_weights(std=0.05)
    model.save_pretrained(root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_corpus")
    records = []
    for i, word in enumerate(("CAT", "DOG")):
        (root / f"img{i}.png").write_bytes(encode_image(render_text_image(word, 64, 96, seed=i)))
        records.append({"path": f"img{i}.png", "caption": f"a sign saying {word}"})
    (root / "clip.mp4").write_bytes(encode_video(render_moving_video("GO", 64, 96, 12, seed=3), 12))
    records.append({"path": "clip.mp4", "caption": "moving text GO"})
    (root / "qa.png").write_bytes(encode_image(render_text_image("YES", 64, 96, seed=5)))
    records.append({"path": "qa.png", "task": "i2t", "question": "What does it say?", "answer": "YES"})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def prepared_batch(corpus, cfg) -> dict[str, np.ndarray]:
    stage = PrepareStage(cfg, 4, 28)
    rows = []
    for item in map(vars, list_source(cfg.sources[0])):
        sample_id = load_item(Fetcher(), item, cfg).sample_id
        rows.append(stage.prepare({**item, "sample_id": sample_id}))
    assert [r["status"] for r in rows] == ["ok"] * len(rows)
    return to_batch(rows, PREPARE_COLUMNS)


def test_captions_are_the_models_greedy_decode_and_the_original_is_kept(checkpoint, corpus, folder_config,
                                                                         tmp_path):
    cfg = folder_config(corpus, tmp_path / "out", "captioning.enabled=true", f"captioning.path='{checkpoint}'",
                        f"captioning.max_new_tokens={TOKENS}", "captioning.batch_size=2")
    batch = prepared_batch(corpus, cfg)
    tasks = list(batch["task"])
    assert sorted(tasks) == ["i2t", "t2i", "t2i", "t2v"]
    before = list(batch["caption"])
    frames = list(batch["target_vae_in"])
    out = CaptionStage(cfg.captioning, num_gpus=0)(batch)

    generator = LanceGenerator(Lance.from_pretrained(checkpoint))
    tag = f"lance:{checkpoint.resolve()}"
    assert captioner_tag(cfg.captioning) == tag
    for i, task in enumerate(tasks):
        if task == "i2t":  # an understanding row's caption is its instruction: never rewritten
            assert out["caption_original"][i] is None and out["caption_model"][i] is None
            assert out["caption"][i] == before[i] and out["status"][i] == "ok"
            continue
        clip = torch.from_numpy(frames[i]).permute(0, 3, 1, 2).float() / 255.0  # the VAE copy, as stored
        kind, prompt = ("v2t", cfg.captioning.video_prompt) if len(clip) > 1 else ("i2t", cfg.captioning.prompt)
        [expected] = generator.generate([Request(kind, prompt, source=clip)],
                                        text=TextOptions(max_new_tokens=TOKENS))
        assert out["caption_original"][i] == before[i] and out["caption_model"][i] == tag
        if expected.text.text.strip():
            assert out["caption"][i] == expected.text.text.strip() != before[i], (task, out["caption"][i])
            assert out["status"][i] == "ok"
        else:  # the model stopped at once: quarantined, not trained on an empty prompt
            assert out["status"][i] == "quarantined" and out["reason"][i] == "empty_generated_caption"
    assert sum(m is not None for m in out["caption_model"]) == 3
    assert len(out["target_vae_in"]) == 4  # the frames are left for the VAE stage


def test_caption_frames_pick_spread_frames_and_cap_the_area():
    video = np.stack([np.full((60, 120, 3), i, np.uint8) for i in range(33)])
    x = caption_frames(video, max_area=1800, max_frames=5)
    assert x.shape[0] == 5 and x.dtype == torch.float32
    assert [round(float(f.mean()) * 255) for f in x] == [0, 8, 16, 24, 32]
    assert x.shape[2] * x.shape[3] <= 1800 and abs(x.shape[3] / x.shape[2] - 2.0) < 0.1
    small = caption_frames(video[:1], max_area=10_000, max_frames=5)
    assert small.shape == (1, 3, 60, 120)


def test_config_refuses_what_cannot_run(tmp_path):
    CaptionConfig().validate(encode_vae=False)  # off: nothing to check
    with pytest.raises(ConfigError, match="captioning.path"):
        CaptionConfig(enabled=True).validate(encode_vae=True)
    with pytest.raises(ConfigError, match="captioning.path"):
        CaptionConfig(enabled=True, path=str(tmp_path / "absent")).validate(encode_vae=True)
    with pytest.raises(ConfigError, match="encode.vae"):
        CaptionConfig(enabled=True, path=str(tmp_path)).validate(encode_vae=False)

"""Scene splitting: a synthetic video of three visually distinct shots of known length is cut at the
known frames, each scene is judged by the duration filters on its own, the kept scene's frames come
from inside its span, and a curated run stores one row per kept scene with its span (refresh sees
the video as done)."""
from __future__ import annotations

import itertools
import json

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from data_curation.config import SceneConfig
from data_curation.scenes import Scene, detect_scenes, parent_uri, scene_sample_id, scene_uri
from data_curation.sources import list_source
from data_curation.stages import InspectStage, PrepareStage
from lance_platform.schema import read_shard

FPS = 12
SHOTS = [(24, (200, 40, 40)), (36, (40, 40, 200)), (30, (40, 180, 40))]  # frames, background RGB
CUTS = [24, 60]
TOTAL = 90


def write_shots(path) -> None:
    """Three shots (plain background + a moving white square), written with OpenCV's MPEG-4 encoder."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (96, 64))
    assert writer.isOpened()
    for frames, rgb in SHOTS:
        for t in range(frames):
            img = np.empty((64, 96, 3), np.uint8)
            img[:] = rgb[::-1]  # OpenCV frames are BGR
            x = 8 + 2 * t % 60
            img[20:40, x:x + 20] = 255
            writer.write(img)
    writer.release()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_shots(root / "shots.mp4")
    (root / "captions.jsonl").write_text(json.dumps({"path": "shots.mp4", "caption": "three shots"}) + "\n")
    return root


def test_detected_spans_match_the_known_cuts(corpus):
    data = (corpus / "shots.mp4").read_bytes()
    for detector in ("content", "adaptive"):
        scenes = detect_scenes(data, SceneConfig(enabled=True, detector=detector), FPS, TOTAL)
        assert len(scenes) == 3, (detector, scenes)
        assert scenes[0].start == 0 and scenes[-1].end == TOTAL
        assert all(a.end == b.start for a, b in itertools.pairwise(scenes))
        for scene, cut in zip(scenes[1:], CUTS):
            assert abs(scene.start - cut) <= 1, (detector, scenes)
    # a threshold no shot change reaches: one scene, the whole clip
    whole = detect_scenes(data, SceneConfig(enabled=True, threshold=255.0), FPS, TOTAL)
    assert whole == [Scene(0, TOTAL, FPS)]
    # no scene shorter than min_scene_seconds: the 2 s first shot merges into the next one
    merged = detect_scenes(data, SceneConfig(enabled=True, min_scene_seconds=2.5), FPS, TOTAL)
    assert len(merged) == 2 and merged[0].start == 0 and abs(merged[1].start - CUTS[1]) <= 1, merged


def test_scene_keys_map_back_to_their_item():
    scene = Scene(60, 90, 12.0)
    assert scene_uri("/data/a.mp4", scene) == "/data/a.mp4#t=5.000,7.500"
    assert scene_uri("/data/x.tar#key", scene) == "/data/x.tar#key&t=5.000,7.500"
    for uri in ("/data/a.mp4", "/data/x.tar#key", "/p/f.parquet#rg=0&row=3"):
        assert parent_uri(scene_uri(uri, scene)) == uri
        assert parent_uri(uri) == uri
    assert scene_sample_id("abc", 0, 24) != scene_sample_id("abc", 24, 60)


def test_each_scene_is_inspected_filtered_and_sampled_on_its_own(corpus, folder_config, tmp_path):
    # chunk_long off: the 3 s scene is judged whole (chunking it to the 2.8 s limit: test_long_scenes.py)
    cfg = folder_config(corpus, tmp_path / "out", "scenes.enabled=true", "scenes.chunk_long=false",
                        "filters.min_seconds=2.2", "filters.max_seconds=2.8", "filters.min_motion=0",
                        "filters.min_blur=0")
    [item] = [vars(i) for i in list_source(cfg.sources[0])]
    rows = InspectStage(cfg).inspect_all(item)
    assert [r["status"] for r in rows] == ["filtered", "filtered", "ok"]
    assert [r["reason"] for r in rows] == ["duration", "duration", None]
    assert "2.00 s (min 2.2" in rows[0]["detail"] and "3.00 s" in rows[1]["detail"]
    assert [round(r["duration"], 2) for r in rows] == [2.0, 3.0, 2.5]
    assert len({r["sample_id"] for r in rows}) == 3
    assert all(parent_uri(r["source_uri"]) == item["source_uri"] for r in rows)
    kept = rows[2]
    assert abs(kept["start_s"] - 5.0) <= 1 / FPS and kept["end_s"] == TOTAL / FPS
    # pass 2 samples the frames inside the kept scene only: every frame shows the third shot's green
    work = {**item, "source_uri": kept["source_uri"], "sample_id": kept["sample_id"],
            **{k: kept[k] for k in ("start_frame", "end_frame", "start_s", "end_s")}}
    prepared = PrepareStage(cfg, 4, 28).prepare(work)
    assert prepared["status"] == "ok", prepared
    frames = prepared["target_vae_in"]
    assert prepared["num_frames"] == len(frames) == 29  # 30 frames at 12 fps -> 4k+1
    corner = frames[:, :4, :4].reshape(-1, 3).mean(0)
    assert np.allclose(corner, SHOTS[2][1], atol=12), corner
    assert (prepared["start_s"], prepared["end_s"]) == (kept["start_s"], kept["end_s"])


def test_curated_run_has_one_row_per_kept_scene_and_new_captions(ray_local, corpus, folder_config, tmp_path):
    """One Ray run for both optional stages: scenes split, and every row re-captioned by a tiny
    random Lance checkpoint (its caption = the greedy x2t decode of the row's stored pixels)."""
    import shutil

    import torch

    from data_curation.media import decode_image, encode_image
    from data_curation.pipeline import run_curation
    from data_curation.synthetic import render_text_image
    from lance_model import Lance, LanceConfig
    from lance_model.generation import LanceGenerator, Request, TextOptions
    from lance_model.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = Lance(LanceConfig.from_preset("tiny"))
    model.init_weights(std=0.05)
    model.save_pretrained(tmp_path / "ckpt")
    root = tmp_path / "corpus"
    root.mkdir()
    shutil.copy(corpus / "shots.mp4", root / "shots.mp4")
    (root / "sign.png").write_bytes(encode_image(render_text_image("CAT", 64, 96, seed=1)))
    (root / "captions.jsonl").write_text(json.dumps({"path": "shots.mp4", "caption": "three shots"}) + "\n"
                                         + json.dumps({"path": "sign.png", "caption": "a sign: CAT"}) + "\n")
    out = tmp_path / "out"
    cfg = folder_config(root, out, "scenes.enabled=true", "filters.min_seconds=2.2", "filters.min_motion=0",
                        "filters.min_blur=0", "output.store_pixels=true", "captioning.enabled=true",
                        f"captioning.path='{tmp_path / 'ckpt'}'", "captioning.max_new_tokens=5",
                        "encode.actor_num_cpus=0.3")  # three actor pools on 2 CPUs leave 1 for the tasks
    result = run_curation(cfg, "curate")
    assert result.counts["new"] == 2 and result.counts["scenes"] == {"videos": 1, "scenes": 3, "long_scenes": 0, "clips": 3}
    assert result.counts["curated"] == 3 and result.counts["filtered"] == {"duration": 1}
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [r for s in manifest["shards"] for r in read_shard(out / s["path"]).to_pylist()]
    videos = [r for r in rows if r["task"] == "t2v"]
    spans = sorted((round(r["start_s"] * FPS), round(r["end_s"] * FPS)) for r in videos)
    assert len(spans) == 2 and spans[1][1] == TOTAL
    assert abs(spans[0][0] - CUTS[0]) <= 1 and abs(spans[1][0] - CUTS[1]) <= 1 and spans[0][1] == spans[1][0]
    ledger = pq.read_table(out / "ledger" / "run-00000.parquet").to_pylist()
    assert sorted(r["outcome"] for r in ledger) == ["curated", "curated", "curated", "filtered:duration"]
    quarantine = pq.read_table(out / "quarantine" / "run-00000.parquet").to_pylist()
    assert [(q["reason"], q["source_uri"].endswith(",2.000")) for q in quarantine] == [("duration", True)]
    # captions: new ones tokenized, web ones kept, the model named
    tokenizer = load_tokenizer(LanceConfig.from_preset("tiny").tokenizer)
    tag = f"lance:{(tmp_path / 'ckpt').resolve()}"
    assert sorted(r["caption_original"] for r in rows) == ["a sign: CAT", "three shots", "three shots"]
    for r in rows:
        assert r["caption_model"] == tag and r["caption"] and r["caption"] != r["caption_original"]
        assert r["caption_ids"] == tokenizer.encode(r["caption"])
    [image] = [r for r in rows if r["task"] == "t2i"]
    frames = torch.from_numpy(decode_image(image["target_pixels"]).frames.copy()).permute(0, 3, 1, 2).float() / 255.0
    [expected] = LanceGenerator(Lance.from_pretrained(tmp_path / "ckpt")).generate(
        [Request("i2t", cfg.captioning.prompt, source=frames)], text=TextOptions(max_new_tokens=5))
    assert image["caption"] == expected.text.text.strip()
    again = run_curation(cfg, "refresh")  # the video's scenes are in the ledger: nothing is new
    assert again.counts["new"] == 0 and again.run is None


def test_scene_splitting_without_pyscenedetect_is_a_config_error(monkeypatch):
    import importlib.util

    from lance_platform.config import ConfigError

    SceneConfig().validate()  # off: nothing needed
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scenedetect" else real(name, *a))
    with pytest.raises(ConfigError, match=r"scenes\.enabled.*lance-pipelines\[scenes\]"):
        SceneConfig(enabled=True).validate()

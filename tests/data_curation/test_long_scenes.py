"""Long scenes: a synthetic 10 s video with no cut (one scene) becomes consecutive clips within the
clip-length limit, each sampled inside its own span, with counts and ledger rows that add up; the
rest a minimum duration cannot keep is a filtered clip, and `scenes.chunk_long: false` keeps the
old single sample of the first window."""
from __future__ import annotations

import itertools
import json

import cv2
import numpy as np
import pytest

from data_curation.pipeline import ledger_row
from data_curation.report import count_outcomes, scene_counts
from data_curation.scenes import Scene, chunk_scene, parent_uri
from data_curation.sources import list_source
from data_curation.stages import InspectStage, PrepareStage

FPS = 12
TOTAL = 120  # 10 s


def grey(t: int) -> float:
    """The background level of frame `t`: a slow ramp (no cut), so a frame tells its time."""
    return 40 + 1.5 * t


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_scene")
    writer = cv2.VideoWriter(str(root / "long.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (96, 64))
    assert writer.isOpened()
    for t in range(TOTAL):
        img = np.full((64, 96, 3), round(grey(t)), np.uint8)
        x = 8 + 2 * t % 60
        img[20:40, x:x + 20] = 255
        writer.write(img)
    writer.release()
    (root / "captions.jsonl").write_text(json.dumps({"path": "long.mp4", "caption": "one long shot"}) + "\n")
    return root


def inspect_rows(corpus, folder_config, tmp_path, *overrides):
    cfg = folder_config(corpus, tmp_path / "out", "scenes.enabled=true", "decode.max_seconds=3.0",
                        "filters.min_motion=0", "filters.min_blur=0", *overrides)
    [item] = [vars(i) for i in list_source(cfg.sources[0])]
    return cfg, item, InspectStage(cfg).inspect_all(item)


def spans(rows):
    return [(r["start_frame"], r["end_frame"]) for r in rows]


def test_chunk_scene_splits_evenly_within_the_limits():
    assert chunk_scene(Scene(10, 40, 12.0), 3.0) == [Scene(10, 40, 12.0)]  # 2.5 s: within the limit
    clips = chunk_scene(Scene(0, 120, 12.0, index=2), 3.0, 2.0)
    assert [(c.start, c.end, c.index, c.part, c.parts) for c in clips] == [
        (0, 30, 2, 0, 4), (30, 60, 2, 1, 4), (60, 90, 2, 2, 4), (90, 120, 2, 3, 4)]
    # an exact multiple of the limit, and a non-integer frame rate: contiguous, none over the limit
    assert [(c.start, c.end) for c in chunk_scene(Scene(0, 72, 12.0), 3.0)] == [(0, 36), (36, 72)]
    ntsc = chunk_scene(Scene(5, 905, 29.97), 6.0, 1.0)
    assert ntsc[0].start == 5 and ntsc[-1].end == 905 and len(ntsc) == 6
    assert all(a.end == b.start for a, b in itertools.pairwise(ntsc))
    assert all(1.0 <= c.end_s - c.start_s <= 6.0 for c in ntsc)
    # equal clips would be shorter than the minimum: full-limit clips and a short rest
    assert [(c.start, c.end) for c in chunk_scene(Scene(0, 120, 12.0), 3.0, 2.9)] == [
        (0, 36), (36, 72), (72, 108), (108, 120)]
    with pytest.raises(ValueError, match="max_seconds=0"):
        chunk_scene(Scene(0, 120, 12.0), 0)


def test_a_long_scene_becomes_clips_each_sampled_inside_its_span(corpus, folder_config, tmp_path):
    cfg, item, rows = inspect_rows(corpus, folder_config, tmp_path, "filters.min_seconds=2.0")
    assert spans(rows) == [(0, 30), (30, 60), (60, 90), (90, 120)]
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert [(r["start_s"], r["end_s"]) for r in rows] == [(0.0, 2.5), (2.5, 5.0), (5.0, 7.5), (7.5, 10.0)]
    assert [r["duration"] for r in rows] == [2.5] * 4 and [r["num_frames"] for r in rows] == [29] * 4
    assert {r["scene_index"] for r in rows} == {0} and {r["scene_parts"] for r in rows} == {4}
    assert len({r["sample_id"] for r in rows}) == 4 and len({r["source_uri"] for r in rows}) == 4
    assert all(parent_uri(r["source_uri"]) == item["source_uri"] for r in rows)
    # the counts and the ledger add up: one new video, four clips, four curated ledger rows
    assert scene_counts(rows) == {"videos": 1, "scenes": 1, "long_scenes": 1, "clips": 4}
    assert count_outcomes(rows) == {}
    assert [ledger_row({**r}, 0)["outcome"] for r in rows] == ["curated"] * 4
    # pass 2: every clip's frames come from its own span (the background ramp dates each frame)
    prepare = PrepareStage(cfg, 4, 28)
    for r in rows:
        work = {**item, **{k: r[k] for k in ("source_uri", "sample_id", "start_frame", "end_frame",
                                               "start_s", "end_s")}}
        out = prepare.prepare(work)
        assert out["status"] == "ok", out
        frames = out["target_vae_in"]
        assert out["num_frames"] == len(frames) == 29 and (out["start_s"], out["end_s"]) == (r["start_s"], r["end_s"])
        level = frames[:, :3, :3].reshape(len(frames), -1).mean(1)
        # within 4 frames' worth of ramp (MPEG-4 noise); a neighbouring clip is 30 frames away
        assert abs(level[0] - grey(r["start_frame"])) <= 6, (r["start_frame"], level[0])
        assert abs(level[-1] - grey(r["end_frame"] - 1)) <= 6, (r["end_frame"], level[-1])


def test_the_clip_limit_is_the_smaller_of_decode_and_filter_max_seconds(corpus, folder_config, tmp_path):
    _, _, rows = inspect_rows(corpus, folder_config, tmp_path, "filters.max_seconds=2.0")
    assert spans(rows) == [(i, i + 24) for i in range(0, TOTAL, 24)]
    assert [r["status"] for r in rows] == ["ok"] * 5 and {r["num_frames"] for r in rows} == {21}


def test_a_rest_shorter_than_the_minimum_is_a_filtered_clip(corpus, folder_config, tmp_path):
    _, item, rows = inspect_rows(corpus, folder_config, tmp_path, "filters.min_seconds=2.9")
    assert spans(rows) == [(0, 36), (36, 72), (72, 108), (108, 120)]
    assert [(r["status"], r["reason"]) for r in rows] == [("ok", None)] * 3 + [("filtered", "duration")]
    counts = {"new": 1, "scenes": scene_counts(rows), **count_outcomes(rows)}
    assert counts["filtered"] == {"duration": 1}
    curated = sum(r["status"] == "ok" for r in rows)
    assert counts["new"] - counts["scenes"]["videos"] + counts["scenes"]["clips"] == curated + 1
    assert sorted(ledger_row(r, 0)["outcome"] for r in rows) == ["curated"] * 3 + ["filtered:duration"]


def test_without_chunking_a_long_scene_is_one_sample_of_its_first_window(corpus, folder_config, tmp_path):
    cfg, item, rows = inspect_rows(corpus, folder_config, tmp_path, "scenes.chunk_long=false")
    assert spans(rows) == [(0, TOTAL)] and rows[0]["status"] == "ok" and rows[0]["duration"] == 10.0
    assert rows[0]["num_frames"] == 33  # 36 frames of the first 3 s -> 4k+1
    assert scene_counts(rows) == {"videos": 1, "scenes": 1, "long_scenes": 0, "clips": 1}
    work = {**item, **{k: rows[0][k] for k in ("source_uri", "sample_id", "start_frame", "end_frame",
                                               "start_s", "end_s")}}
    frames = PrepareStage(cfg, 4, 28).prepare(work)["target_vae_in"]
    assert abs(frames[-1, :3, :3].mean() - grey(35)) <= 6  # the rest of the scene is never sampled

"""Animated images: in a video task a GIF / WebP / APNG is decoded as a video (each frame for its own
delay, sampled at the target fps), in an image task it is quarantined or, with
`decode.animated_images: first_frame`, kept as its first frame with the dropped frames counted."""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from data_curation.media import MediaError, animation_sample, decode_image, decode_media
from data_curation.report import animation_counts
from data_curation.sources import list_source
from data_curation.stages import InspectStage, PrepareStage

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
DELAYS_MS = [200, 300, 500]  # 1.0 s in all
# 12 fps over 1 s -> 12 wanted -> 9 frames (4k+1) at t = k/9 s: 2 red, 3 green, 4 blue
EXPECTED = [RED] * 2 + [GREEN] * 3 + [BLUE] * 4


def animation(fmt: str = "GIF", delays=DELAYS_MS, colours=(RED, GREEN, BLUE), size=(64, 48)) -> bytes:
    frames = [Image.new("RGB", size, c) for c in colours]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=list(delays), loop=0, **extra)
    return buf.getvalue()


def colours(frames: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in f[f.shape[0] // 2, f.shape[1] // 2]) for f in frames]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animation_decoded_as_video_shows_each_frame_for_its_delay(fmt):
    decoded = decode_media(animation(fmt), "image", 12.0, 6.0, animated="video")
    assert decoded.frames.shape == (9, 48, 64, 3)
    assert colours(decoded.frames) == EXPECTED
    assert decoded.fps == 9.0 and decoded.duration == pytest.approx(1.0) and decoded.source_frames == 3


def test_animation_sampling_follows_max_seconds_target_fps_and_zero_delays():
    short = decode_media(animation(), "image", 12.0, 0.5, animated="video")  # first 0.5 s: 5 frames
    assert colours(short.frames) == [RED] * 2 + [GREEN] * 3 and short.duration == pytest.approx(1.0)
    slow = decode_media(animation(), "image", 5.0, 6.0, animated="video")  # 5 fps: 5 frames at 0.2 s
    assert colours(slow.frames) == [RED, GREEN, GREEN, BLUE, BLUE] and slow.fps == 5.0
    # GIF delays of 0 are shown for 100 ms: 0.3 s at 40 fps -> 12 wanted -> 9 frames
    zero = decode_media(animation(delays=[0, 0, 0]), "image", 40.0, 6.0, animated="video")
    assert zero.duration == pytest.approx(0.3) and colours(zero.frames) == [RED] * 3 + [GREEN] * 3 + [BLUE] * 3
    indices, fps = animation_sample([0.5, 0.5], 5.0, 6.0)
    assert indices.tolist() == [0, 0, 0, 1, 1] and fps == 5.0
    indices, fps = animation_sample([0.5, 0.5], 4.0, 6.0)  # 4 wanted -> 1 frame: no frame rate
    assert indices.tolist() == [0] and fps == 0.0
    # a still image in a video slot stays one frame
    still = io.BytesIO()
    Image.new("RGB", (64, 48), RED).save(still, "GIF")
    one = decode_media(still.getvalue(), "image", 12.0, 6.0, animated="video")
    assert one.frames.shape == (1, 48, 64, 3) and one.duration == 0.0


def test_an_animation_as_a_still_is_refused_or_its_dropped_frames_counted():
    with pytest.raises(MediaError, match="GIF with 3 frames") as info:
        decode_image(animation())
    assert info.value.reason == "animated_image"
    first = decode_image(animation(), animated="first_frame")
    assert colours(first.frames) == [RED] and first.dropped_frames == 2 and first.duration == 0.0
    with pytest.raises(ValueError, match="animated='movie'"):
        decode_image(animation(), animated="movie")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("animated")
    (root / "clip.gif").write_bytes(animation())
    (root / "still.gif").write_bytes(animation(colours=(GREEN, BLUE, RED)))
    records = [{"path": "clip.gif", "caption": "red, green, blue", "task": "t2v"},
               {"path": "still.gif", "caption": "a green card", "task": "t2i"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def inspect_corpus(corpus, folder_config, tmp_path, *overrides):
    cfg = folder_config(corpus, tmp_path / "out", "filters.min_motion=0", "filters.min_blur=0", *overrides)
    items = {i.source_uri.rsplit("/", 1)[1]: vars(i) for i in list_source(cfg.sources[0])}
    stage = InspectStage(cfg)
    return cfg, items, {name: stage.inspect(item) for name, item in items.items()}


def test_video_task_curates_the_animation_and_image_task_counts_what_it_drops(corpus, folder_config, tmp_path,
                                                                               caplog):
    with caplog.at_level(logging.INFO, logger="data_curation.stages"):
        cfg, items, rows = inspect_corpus(corpus, folder_config, tmp_path, "decode.animated_images=first_frame")
    clip, still = rows["clip.gif"], rows["still.gif"]
    assert (clip["status"], clip["num_frames"], clip["duration"]) == ("ok", 9, pytest.approx(1.0))
    assert (clip["animated"], clip["dropped_frames"]) == ("video", 0)
    assert (still["status"], still["num_frames"], still["animated"], still["dropped_frames"]) == ("ok", 1, "first_frame", 2)
    assert animation_counts(list(rows.values())) == {"as_video": 1, "first_frame": 1, "dropped_frames": 2}
    assert any("still.gif" in m and "2 frame(s) dropped" in m for m in caplog.messages), caplog.messages
    # pass 2: the video row's VAE copy has the 9 sampled frames in their colours, the still one frame
    prepare = PrepareStage(cfg, 4, 28)
    video = prepare.prepare({**items["clip.gif"], "sample_id": clip["sample_id"]})
    assert video["status"] == "ok" and video["num_frames"] == 9 and video["fps"] == 9.0
    assert colours(video["target_vae_in"]) == EXPECTED
    image = prepare.prepare({**items["still.gif"], "sample_id": still["sample_id"]})
    assert image["num_frames"] == 1 and colours(image["target_vae_in"]) == [GREEN]
    # the default still quarantines the image task's animation; the video task is unaffected
    _, _, default = inspect_corpus(corpus, folder_config, tmp_path)
    assert (default["still.gif"]["status"], default["still.gif"]["reason"]) == ("quarantined", "animated_image")
    assert default["clip.gif"]["status"] == "ok"
    assert animation_counts(list(default.values())) == {"as_video": 1, "first_frame": 0, "dropped_frames": 0}
    assert animation_counts([default["still.gif"]]) is None

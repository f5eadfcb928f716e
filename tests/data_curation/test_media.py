"""Decode, frame sampling, buckets, filters and the encoder stages on plain dicts (no Ray)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_curation.buckets import bucket_size, choose_bucket, resize_crop
from data_curation.config import ModelRef
from data_curation.dedup import hamming, perceptual_hash
from data_curation.media import (
    MediaError,
    decode_image,
    decode_text,
    decode_video,
    encode_image,
    encode_video,
    sample_frame_indices,
)
from data_curation.stages import VaeStage, VitStage, shard_row, slot_copies
from data_curation.synthetic import render_moving_video, render_text_image
from lance_model.config import LanceConfig
from lance_model.encoders.vit import vit_token_count

EMPTY = np.zeros((0, 0, 0, 3), np.uint8)


def column(*arrays: np.ndarray) -> np.ndarray:
    """An object column of frame arrays, as Ray hands ragged tensors to a stage."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


@pytest.mark.parametrize(("fps", "frames", "max_seconds", "expected"), [
    (24, 48, 6.0, 21),    # 2 s -> 24 frames at 12 fps -> 21 = 4*5+1
    (10, 15, 6.0, 13),    # 1.5 s at 10 fps: only 15 source frames -> 13
    (30, 300, 6.0, 69),   # 10 s clipped to 6 s -> 72 -> 69
    (30, 300, 2.0, 21),   # understanding: 2 s -> 24 -> 21
    (25, 1, 6.0, 1),
])
def test_frame_sampling_counts(fps, frames, max_seconds, expected):
    idx = sample_frame_indices(frames, fps, 12.0, max_seconds)
    assert len(idx) == expected and (len(idx) - 1) % 4 == 0
    clip = min(frames, round(max_seconds * fps))
    assert idx[0] == 0 and idx[-1] == clip - 1 and np.all(np.diff(idx) > 0) | (len(idx) == 1)


def test_decoded_video_frames_and_latent_shapes():
    clip = render_moving_video("RAY", 64, 96, 48, seed=1)
    decoded = decode_video(encode_video(clip, 24), 12.0, 6.0)
    assert decoded.frames.shape == (21, 64, 96, 3)
    assert decoded.source_frames == 48 and decoded.duration == pytest.approx(2.0)
    assert decoded.fps == pytest.approx(20 * 24 / 47)
    frames = resize_crop(decoded.frames, *bucket_size(choose_bucket(64, 96), 48 * 48, 4))
    assert frames.shape == (21, 40, 56, 3)
    cfg = LanceConfig.from_preset("tiny")
    out = VaeStage(ModelRef())({"target_vae_in": column(frames, frames[:1]), "source_vae_in": column(EMPTY, EMPTY)})
    row = shard_row({k: v[0] for k, v in out.items()})
    assert row["target_vae_shape"] == [21, 10, 14, cfg.vae.latent_channels]
    assert shard_row({k: v[1] for k, v in out.items()})["target_vae_shape"] == [1, 10, 14, 48]
    assert row["source_vae_latent"] is None and row["source_vae_shape"] is None


def test_vit_stage_groups_by_shape_and_matches_single_item_encoding():
    cfg = LanceConfig.from_preset("tiny")
    a = np.random.default_rng(0).integers(0, 255, (1, 56, 84, 3), dtype=np.uint8)
    b = np.random.default_rng(1).integers(0, 255, (5, 56, 56, 3), dtype=np.uint8)
    stage = VitStage(ModelRef())
    out = stage({"source_vit_in": column(a, b, a), "target_vit_in": column(EMPTY, EMPTY, EMPTY)})
    rows = [shard_row({k: v[i] for k, v in out.items()}) for i in range(3)]
    assert rows[0]["source_vit_grid"] == [1, 4, 6] and rows[1]["source_vit_grid"] == [3, 4, 4]
    assert rows[1]["source_vit_shape"] == [vit_token_count(5, 56, 56, cfg.vit), cfg.vit.out_hidden_size]
    assert rows[0]["source_vit_tokens"] == rows[2]["source_vit_tokens"]
    single = stage({"source_vit_in": column(b), "target_vit_in": column(EMPTY)})
    alone = torch.frombuffer(bytearray(single["source_vit_tokens"][0]), dtype=torch.bfloat16)
    batched = torch.frombuffer(bytearray(rows[1]["source_vit_tokens"]), dtype=torch.bfloat16)
    torch.testing.assert_close(alone.float(), batched.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("hw", "bucket", "vae768", "vit768"), [
    ((1080, 1920), "16:9", (576, 1024), (588, 1036)),
    ((1920, 1080), "9:16", (1024, 576), (1036, 588)),
    ((1000, 1000), "1:1", (768, 768), (756, 756)),
    ((768, 1024), "4:3", (672, 880), (672, 896)),
    ((1024, 768), "3:4", (880, 672), (896, 672)),
    ((800, 2000), "21:9", (496, 1168), (504, 1176)),
])
def test_bucket_choice_and_sizes(hw, bucket, vae768, vit768):
    assert choose_bucket(*hw) == bucket
    assert bucket_size(bucket, 768 * 768, 16) == vae768
    assert bucket_size(bucket, 768 * 768, 28) == vit768
    frames = np.zeros((1, hw[0] // 8, hw[1] // 8, 3), dtype=np.uint8)
    assert resize_crop(frames, *bucket_size(bucket, 64 * 64, 4)).shape[1:3] == bucket_size(bucket, 64 * 64, 4)


def test_decode_errors_carry_reasons():
    jpeg = encode_image(render_text_image("OPEN", 64, 96), "JPEG")
    with pytest.raises(MediaError) as e:
        decode_image(jpeg[: len(jpeg) // 2])
    assert e.value.reason == "truncated_image"
    with pytest.raises(MediaError, match="empty_file"):
        decode_video(b"", 12, 6)
    with pytest.raises(MediaError, match="undecodable_video"):
        decode_video(b"\x00garbage" * 300, 12, 6)
    with pytest.raises(MediaError, match="caption_not_utf8"):
        decode_text(b"\xff\xfe", "caption", True, 100)
    with pytest.raises(MediaError, match="missing_caption"):
        decode_text(b"  ", "caption", True, 100)


def test_perceptual_hash_near_and_far():
    img = render_text_image("STOP", 64, 96, seed=1)
    small = resize_crop(img[None], 48, 72)
    other = render_text_image("EXIT", 64, 96, seed=2)
    h = perceptual_hash(img[None])
    assert hamming(np.array([perceptual_hash(small)]), h)[0] <= 2
    assert hamming(np.array([perceptual_hash(other[None])]), h)[0] > 10


def test_slot_copies_follow_the_shard_contract():
    assert slot_copies("t2i", "target") == (True, False)
    assert slot_copies("i2i", "source") == (True, True)
    assert slot_copies("i2t", "source") == (False, True)


def test_a_one_frame_video_is_too_short_not_static():
    one = encode_video(render_moving_video("GO", 64, 64, 1, seed=1), fps=12)
    with pytest.raises(MediaError) as err:
        decode_video(one, target_fps=12, max_seconds=5)
    assert err.value.reason == "too_short" and "1 frame" in str(err.value)
    two = decode_video(encode_video(render_moving_video("GO", 64, 64, 2, seed=1), fps=12), target_fps=12, max_seconds=5)
    assert two.source_frames == 2

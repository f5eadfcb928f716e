"""Nothing bad in a corpus stops curation, at unit level (no Ray): list_source -> InspectStage.

Decompression bombs, animated images, 16-bit greyscale and transparency at the decoder; the
planted-defect folder corpus (bomb, task typo, missing listed file, external symlink, caption-table
lines that are not UTF-8 or not JSON) and a bad-typed Parquet file through listing and inspection,
with the exact reason of every item; and shard checksums verified once against the manifest.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from defects import animated_gif, png_header, write_defect_corpus, write_defect_parquet
from PIL import Image

from data_curation.config import CurationConfig
from data_curation.media import MediaError, decode_image, decode_video, encode_image, encode_video
from data_curation.sources import list_source
from data_curation.stages import InspectStage
from data_curation.store import CuratedDataset, Manifest, ShardWriter
from data_curation.synthetic import render_moving_video, render_text_image
from lance_platform import schema
from lance_platform.config import ConfigError, load_config
from lance_platform.schema import ShardChecksumError, check_version, read_shard, verify_shard

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "curation" / "synthetic.yaml"


def reason_of(fn, *args) -> str:
    with pytest.raises(MediaError) as info:
        fn(*args)
    return info.value.reason


# ---------------------------------------------------------------------------------------- decoding
def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # 30000^2 is past Pillow's own bomb error; 7000^2 (49 MP) is below Pillow's limit but above ours
    # (40 MP, the default)
    assert reason_of(decode_image, png_header(30000, 30000)) == "too_many_pixels"
    with pytest.raises(MediaError, match=r"7000x7000 = 49000000 pixels \(limit 40000000\)"):
        decode_image(png_header(7000, 7000))
    assert reason_of(decode_image, png_header(3000, 3000), 3000 * 3000 - 1) == "too_many_pixels"
    assert decode_image(png_header(3000, 3000), 0).frames.shape == (1, 3000, 3000, 3)  # 0: no limit
    small = encode_image(render_text_image("OPEN", 64, 96, 1))
    assert reason_of(decode_image, small, 64 * 96 - 1) == "too_many_pixels"
    assert decode_image(small, 64 * 96).frames.shape == (1, 64, 96, 3)


def test_pixel_limit_applies_to_video_frames():
    clip = encode_video(render_moving_video("RAY", 64, 96, 12, seed=5), 12)
    with pytest.raises(MediaError, match="video frame is 96x64 = 6144 pixels"):
        decode_video(clip, 12, 6, 64 * 96 - 1)
    assert decode_video(clip, 12, 6, 64 * 96).frames.shape == (9, 64, 96, 3)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 96).round().astype(np.uint16).reshape(64, 96)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    frame = decode_image(buf.getvalue()).frames[0]
    assert np.array_equal(frame[..., 0], frame[..., 2])
    assert np.abs(frame[..., 0].astype(int) - np.round(ramp / 257.0)).max() <= 1
    assert frame[0, 0, 0] == 0 and frame[-1, -1, 0] == 255 and 120 <= frame.mean() <= 135


def test_transparency_is_composited_on_the_background():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200                      # red everywhere ...
    rgba[:, :16, 3] = 255                   # ... opaque on the left, transparent on the right
    rgba[:8, 16:, 3] = 128                  # half-transparent strip
    data = encode_image(rgba)
    white = decode_image(data).frames[0]
    assert tuple(white[20, 0]) == (200, 0, 0) and tuple(white[20, 31]) == (255, 255, 255)
    a = 128 / 255                           # 200*a + 255*(1-a) = 227.4, 0*a + 255*(1-a) = 127.0
    assert np.abs(white[0, 31].astype(float) - (200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a))).max() <= 1
    black = decode_image(data, 0, (0, 0, 0)).frames[0]
    assert tuple(black[20, 31]) == (0, 0, 0) and abs(int(black[0, 31, 0]) - 200 * a) <= 1 and black[0, 31, 1] == 0
    # palette transparency (a GIF's transparent index) too
    pal = Image.fromarray(rgba[..., :3]).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=int(np.asarray(pal)[0, 0]))
    assert tuple(decode_image(buf.getvalue()).frames[0][20, 31]) == (255, 255, 255)


def test_animated_image_is_refused_and_a_still_gif_is_kept():
    with pytest.raises(MediaError, match="GIF with 3 frames") as info:
        decode_image(animated_gif(64, 96))
    assert info.value.reason == "animated_image"
    assert decode_image(animated_gif(64, 96, frames=1)).frames.shape == (1, 64, 96, 3)


def test_new_config_fields_are_checked():
    cfg = load_config(CurationConfig, CONFIG, [])
    assert cfg.checks.max_pixels == 40_000_000 and cfg.decode.alpha_background == (255, 255, 255)
    assert cfg.sources[0].follow_external_symlinks is False
    with pytest.raises(ConfigError, match="checks.max_pixels=-1"):
        load_config(CurationConfig, CONFIG, ["checks.max_pixels=-1"])
    with pytest.raises(ConfigError, match="decode.alpha_background"):
        load_config(CurationConfig, CONFIG, ["decode.alpha_background=[0, 0, 256]"])


# ---------------------------------------------------------------------------------------- corpora
def inspect_folder(root: Path, *overrides: str) -> dict[str, dict]:
    source = f"sources=[{{kind: folder, name: folder, uri: '{root}', captions: captions.jsonl{''.join(overrides)}}}]"
    cfg = load_config(CurationConfig, CONFIG, [source, "tracking.enabled=false"])
    items = list_source(cfg.sources[0])
    stage = InspectStage(cfg)
    return {i.source_uri.rsplit("/", 1)[1]: stage.inspect(i.__dict__) for i in items}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_defect_corpus(tmp_path_factory.mktemp("robust") / "corpus")


def test_every_planted_defect_is_an_item_with_its_reason(corpus):
    rows = inspect_folder(corpus.root)
    assert set(rows) == set(corpus.outcomes)
    status = {"too_many_pixels", "animated_image", "unknown_task", "missing_file", "symlink_outside_source",
              "caption_table_not_utf8", "caption_table_bad_json", "caption_not_utf8", "missing_caption",
              "too_small", "truncated_image", "empty_file", "undecodable_video"}
    for name, outcome in corpus.outcomes.items():
        row = rows[name]
        if outcome in status:
            assert (row["status"], row["reason"]) == ("quarantined", outcome), name
        elif outcome == "curated":  # dedup and filters are decided later; these decode and validate
            assert row["status"] == "ok", (name, row["reason"], row["detail"])
    table = (corpus.root / "captions.jsonl").read_bytes().split(b"\n")
    gone_line = next(n for n, line in enumerate(table, 1) if b'"gone.png"' in line)
    assert f"line {gone_line} lists 'gone.png', which does not exist" in rows["gone.png"]["detail"]
    assert "'T2I'" in rows["typo.png"]["detail"]
    assert "secret.png" in rows["outside.png"]["detail"] and "outside the source root" in rows["outside.png"]["detail"]
    bad_lines = sorted(n for n in corpus.outcomes if n.startswith("captions.jsonl#line="))
    assert len(bad_lines) == 2
    for name in bad_lines:
        assert f"captions.jsonl line {name.rsplit('=', 1)[1]} is not " in rows[name]["detail"]
    # every other record of the table was kept: the curated items got their captions from it
    assert rows["img_0.png"]["caption_chars"] > 0 and rows["qa_0.png"]["task"] == "i2t"


def test_external_symlink_is_curated_when_the_source_follows_them(corpus):
    rows = inspect_folder(corpus.root, ", follow_external_symlinks: true")
    assert (rows["outside.png"]["status"], rows["outside.png"]["reason"]) == ("ok", None)
    assert rows["outside.png"]["width"] == 96
    assert rows["bomb.png"]["reason"] == "too_many_pixels"


def test_symlink_inside_the_source_is_fine(tmp_path):
    root = tmp_path / "c"
    (root / "real").mkdir(parents=True)
    (root / "real" / "a.png").write_bytes(encode_image(render_text_image("OPEN", 64, 96, 1)))
    (root / "alias.png").symlink_to(root / "real" / "a.png")
    (root / "captions.jsonl").write_text(json.dumps({"path": "alias.png", "caption": "a sign"}) + "\n"
                                         + json.dumps({"path": "real/a.png", "caption": "a sign"}) + "\n")
    rows = inspect_folder(root)
    assert {n: r["status"] for n, r in rows.items()} == {"alias.png": "ok", "a.png": "ok"}


def test_bad_typed_parquet_rows_are_quarantined_and_good_rows_kept(tmp_path):
    outcomes = write_defect_parquet(tmp_path / "pq")
    cfg = load_config(CurationConfig, CONFIG, [f"sources=[{{kind: parquet, name: pq, uri: '{tmp_path / 'pq'}', "
                                               "layout: t2i}]", "tracking.enabled=false"])
    items = list_source(cfg.sources[0])
    stage = InspectStage(cfg)
    rows = {i.source_uri.rsplit("/", 1)[1]: stage.inspect(i.__dict__) for i in items}
    got = {n: ("curated" if r["status"] == "ok" else r["reason"]) for n, r in rows.items()}
    assert got == outcomes
    assert rows["bad.parquet#rg=0&row=0"]["detail"].startswith("column 'image_bytes' is int64 (this row: int 7)")


def test_an_unexpected_exception_costs_one_item(tmp_path, monkeypatch):
    root = tmp_path / "c"
    root.mkdir()
    for i, word in enumerate(("OPEN", "STOP")):
        (root / f"{word}.png").write_bytes(encode_image(render_text_image(word, 64, 96, i)))
    (root / "captions.jsonl").write_text("".join(json.dumps({"path": f"{w}.png", "caption": w}) + "\n"
                                                 for w in ("OPEN", "STOP")))
    from data_curation import stages

    real = stages.decode_media
    stop = (root / "STOP.png").read_bytes()

    def failing_on_stop(data, *args):
        if data == stop:
            raise KeyError("boom")
        return real(data, *args)

    monkeypatch.setattr(stages, "decode_media", failing_on_stop)
    rows = inspect_folder(root)
    assert (rows["OPEN.png"]["status"], rows["STOP.png"]["status"]) == ("ok", "quarantined")
    assert (rows["STOP.png"]["reason"], rows["STOP.png"]["detail"]) == ("unexpected_error", "KeyError: 'boom'")


# ---------------------------------------------------------------------------------------- checksums
def committed_dataset(root: Path) -> tuple[CuratedDataset, list[Path]]:
    dataset = CuratedDataset(root)
    writer = ShardWriter(dataset, 0, 1, {"test": True})  # 1 byte target: one row per shard
    for i in range(2):
        writer.add({"sample_id": f"s{i}", "task": "t2i", "caption": f"caption {i}", "height": 8, "width": 8})
    dataset.commit(Manifest(), {"run": 0}, writer.shards, [], [], None, {"test": True})
    return dataset, [root / s["path"] for s in writer.shards]


def test_corrupt_shard_is_refused_by_name(tmp_path):
    dataset, (first, second) = committed_dataset(tmp_path / "ds")
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    for read in (check_version, read_shard):
        with pytest.raises(ShardChecksumError, match=rf"corrupt shard .*{first.name}: sha256 [0-9a-f]{{64}} does not match"):
            read(first)
    with pytest.raises(ShardChecksumError) as info:
        dataset.shard_paths()
    assert info.value.path == str(first)
    assert read_shard(second).column("caption").to_pylist() == ["caption 1"]
    second.write_bytes(second.read_bytes() + b"x")  # a size change is refused without hashing
    with pytest.raises(ShardChecksumError, match=rf"{second.name}: \d+ bytes, the manifest recorded \d+"):
        check_version(second)


def test_clean_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    dataset, shards = committed_dataset(tmp_path / "ds")
    hashed: list[str] = []
    real = schema.sha256_file
    monkeypatch.setattr(schema, "sha256_file", lambda path, *a: hashed.append(Path(path).name) or real(path, *a))
    for _ in range(3):
        assert [read_shard(p).num_rows for p in shards] == [1, 1]
        check_version(shards[0])
        assert dataset.shard_paths() == shards
    assert sorted(hashed) == sorted(p.name for p in shards)
    # a file rewritten with other bytes (new mtime) is hashed again, and caught
    shards[0].write_bytes(shards[1].read_bytes())
    with pytest.raises(ShardChecksumError):
        read_shard(shards[0])
    assert len(hashed) == 3


def test_shards_outside_a_manifest_are_read_unverified(tmp_path):
    path = schema.write_shard([{"sample_id": "a", "task": "t2i"}], tmp_path / "loose" / "a.parquet")
    assert verify_shard(path) is False
    assert read_shard(path).num_rows == 1
    assert pq.read_table(path).num_rows == 1

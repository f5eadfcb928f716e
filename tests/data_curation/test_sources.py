"""WebDataset and Parquet sources at unit level (no Ray): list_source -> Fetcher -> InspectStage.

Every corpus is built here from synthetic media: WebDataset tars (`key.jpg`/`.png`/`.mp4` with
`.txt`/`.json`, including damaged members and damaged tars) and Parquet files in each official
Lance layout (DATA.md §1). The checks: tasks, slots, texts, stable content-hash sample_ids (same
bytes + text -> same id, whatever the URI or source kind), and that bad members are quarantined
with a reason while the rest of the corpus goes through.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_curation.config import CurationConfig, SourceConfig
from data_curation.media import encode_image, encode_video
from data_curation.sources import TEXT_FIELDS, Fetched, Fetcher, SourceError, list_source
from data_curation.stages import InspectStage
from data_curation.synthetic import (
    QUESTION,
    image_caption,
    render_moving_video,
    render_text_image,
    video_caption,
)
from lance_platform.config import load_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "curation" / "synthetic.yaml"
H, W = 64, 96


@pytest.fixture(scope="module")
def media():
    """Encoded synthetic media, made once (video encoding is the slow part)."""
    return {
        "open_jpg": encode_image(render_text_image("OPEN", H, W, 1), "JPEG"),
        "stop_png": encode_image(render_text_image("STOP", H, W, 2)),
        "exit_png": encode_image(render_text_image("EXIT", H, W, 3)),
        "sale_png": encode_image(render_text_image("SALE", H, W, 4)),
        "ray_mp4": encode_video(render_moving_video("RAY", H, W, 12, seed=5), 12),
        "data_mp4": encode_video(render_moving_video("DATA", H, W, 12, seed=6), 12),
    }


def expected_id(media: dict[str, tuple[bytes, str]], caption=None, question=None, answer=None) -> str:
    text = {"caption": caption, "question": question, "answer": answer}
    return Fetched(media, {k: None if v is None else v.encode() for k, v in text.items()}).sample_id()


def config(src: dict) -> CurationConfig:
    flow = "{" + ", ".join(f"{k}: '{v}'" for k, v in src.items()) + "}"
    return load_config(CurationConfig, CONFIG, [f"sources=[{flow}]", "tracking.enabled=false"])


def fetch_all(src: SourceConfig):
    items = list_source(src)
    fetcher = Fetcher()
    out = {}
    for item in items:
        try:
            out[item.source_uri] = (item, fetcher.fetch(item.__dict__))
        except Exception as exc:  # noqa: BLE001 - the test inspects what a bad item raises
            out[item.source_uri] = (item, exc)
    return items, out


def inspect_all(cfg: CurationConfig) -> dict[str, dict]:
    stage = InspectStage(cfg)
    return {row["source_uri"]: row for row in (stage.inspect(i.__dict__) for i in list_source(cfg.sources[0]))}


def texts(fetched: Fetched) -> dict[str, str | None]:
    return {k: None if fetched.text[k] is None else fetched.text[k].decode() for k in TEXT_FIELDS}


# ---------------------------------------------------------------------------------------- webdataset
def write_tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="module")
def wds(tmp_path_factory, media):
    """Three tars: good and bad samples, an exact copy of a sample, and a tar cut off mid-member."""
    root = tmp_path_factory.mktemp("wds")
    m = media
    write_tar(root / "shard-000.tar", [
        ("s000.jpg", m["open_jpg"]), ("s000.txt", image_caption("OPEN").encode()),
        ("s001.png", m["stop_png"]), ("s001.json", json.dumps({"caption": image_caption("STOP"), "x": 1}).encode()),
        ("s002.mp4", m["ray_mp4"]), ("s002.txt", video_caption("RAY").encode()),
        ("s003.jpg", m["open_jpg"][: len(m["open_jpg"]) // 2]), ("s003.txt", b"half a sign"),
        ("s004.png", m["exit_png"]), ("s004.json", b"{not json"),
        ("s005.txt", b"a caption without its image"),
        ("s006.png", m["sale_png"]), ("s006.json", b'{"caption": "from the json"}'),
        ("s006.txt", image_caption("SALE").encode()),
        ("s007.png", m["exit_png"]), ("s007.txt", b"\xff\xfe not utf-8"),
        ("sub/dir.v1/s008.PNG", m["sale_png"]), ("sub/dir.v1/s008.txt", b"in a sub-directory"),
    ])
    write_tar(root / "shard-001.tar", [("t000.jpg", m["open_jpg"]), ("t000.txt", image_caption("OPEN").encode())])
    whole = write_tar(root / "scratch" / "full.tar", [
        ("u000.png", m["stop_png"]), ("u000.txt", b"kept before the damage"),
        ("u001.png", m["exit_png"]), ("u001.txt", b"lost"),
    ])
    cut = whole.index(m["exit_png"]) + 100  # inside u001.png's data
    (root / "shard-002.tar").write_bytes(whole[:cut])
    (root / "scratch" / "full.tar").unlink()
    (root / "shard-003.tar").write_bytes(b"this is not a tar archive " * 40)
    (root / "README.md").write_text("not a tar: ignored by listing")
    return root


def test_webdataset_listing_tasks_texts_and_ids(wds, media):
    items, fetched = fetch_all(SourceConfig(kind="webdataset", name="wds", uri=str(wds)))
    uris = [i.source_uri for i in items]
    assert len(uris) == len(set(uris))
    by_key = {u[len(str(wds)) + 1:]: u for u in uris}
    assert sorted(by_key) == sorted([
        *(f"shard-000.tar#s00{i}" for i in range(8)), "shard-000.tar#sub/dir.v1/s008", "shard-001.tar#t000",
        "shard-002.tar", "shard-002.tar#u000", "shard-003.tar"])

    def get(key):
        return fetched[by_key[key]][1]

    s0 = get("shard-000.tar#s000")
    assert s0.media == {"target": (media["open_jpg"], "image")}
    assert texts(s0) == {"caption": image_caption("OPEN"), "question": None, "answer": None}
    assert texts(get("shard-000.tar#s001"))["caption"] == image_caption("STOP")   # from the JSON
    assert texts(get("shard-000.tar#s006"))["caption"] == image_caption("SALE")   # .txt wins over .json
    assert get("shard-000.tar#s002").media["target"] == (media["ray_mp4"], "video")
    assert get("shard-000.tar#sub/dir.v1/s008").media["target"] == (media["sale_png"], "image")
    tasks = {k: fetched[u][0].task for k, u in by_key.items()}
    assert tasks["shard-000.tar#s002"] == "t2v" and tasks["shard-000.tar#s000"] == "t2i"
    # content-hash ids: the same bytes + text under two tars is one sample; ids match the formula
    assert s0.sample_id() == get("shard-001.tar#t000").sample_id() == expected_id(
        {"target": (media["open_jpg"], "image")}, image_caption("OPEN"))
    assert get("shard-000.tar#s001").sample_id() == expected_id({"target": (media["stop_png"], "image")},
                                                                image_caption("STOP"))
    # a key with no media member holds no media (it is not its caption read as an image)
    assert get("shard-000.tar#s005").media == {}
    # damaged tars: listed as one error item each; what was readable before the damage survives
    assert texts(get("shard-002.tar#u000"))["caption"] == "kept before the damage"
    assert "incomplete sample(s) ['u001']" in str(get("shard-002.tar"))
    # listing again gives the same items and fingerprints; fetching again the same ids
    again, refetched = fetch_all(SourceConfig(kind="webdataset", name="wds", uri=str(wds)))
    assert [(i.source_uri, i.fingerprint) for i in again] == [(i.source_uri, i.fingerprint) for i in items]
    assert all(isinstance(f, Exception) or f.sample_id() == fetched[u][1].sample_id()
               for u, (_, f) in refetched.items())


def test_webdataset_bad_members_are_quarantined_not_fatal(wds):
    rows = inspect_all(config({"kind": "webdataset", "name": "wds", "uri": str(wds)}))
    outcome = {u[len(str(wds)) + 1:]: (r["status"], r["reason"]) for u, r in rows.items()}
    assert outcome == {
        "shard-000.tar#s000": ("ok", None), "shard-000.tar#s001": ("ok", None), "shard-000.tar#s002": ("ok", None),
        "shard-000.tar#s003": ("quarantined", "truncated_image"),
        "shard-000.tar#s004": ("quarantined", "bad_metadata"),
        "shard-000.tar#s005": ("quarantined", "missing_media"),
        "shard-000.tar#s006": ("ok", None),
        "shard-000.tar#s007": ("quarantined", "caption_not_utf8"),
        "shard-000.tar#sub/dir.v1/s008": ("ok", None),
        "shard-001.tar#t000": ("ok", None),                      # dedup (later, on the driver) drops it
        "shard-002.tar": ("quarantined", "unreadable_tar"), "shard-002.tar#u000": ("ok", None),
        "shard-003.tar": ("quarantined", "unreadable_tar"),
    }
    ok = {u: r for u, r in rows.items() if r["status"] == "ok"}
    video = next(r for u, r in ok.items() if u.endswith("#s002"))
    assert video["task"] == "t2v" and video["num_frames"] == 9 and (video["height"], video["width"]) == (H, W)
    assert rows[next(u for u in rows if u.endswith("#s000"))]["sample_id"] == \
        rows[next(u for u in rows if u.endswith("#t000"))]["sample_id"]


# ---------------------------------------------------------------------------------------- parquet
def layout_rows(layout: str, m: dict) -> tuple[list[dict], list[dict]]:
    """(Parquet rows, expected {task slots -> (bytes, kind), texts}) of a layout: two good rows and
    a last row whose media are garbage bytes."""
    img = (m["stop_png"], m["exit_png"], b"\x89PNG garbage" * 20)
    alt = (m["sale_png"], m["open_jpg"], m["stop_png"])
    vid = (m["ray_mp4"], m["data_mp4"], b"\x00\x00\x00\x18ftypmp42 garbage" * 20)
    alt_vid = (m["data_mp4"], m["ray_mp4"], m["ray_mp4"])
    rows, expected = [], []
    for i in range(3):
        cap, q, a = f"caption {i}", f"{QUESTION} ({i})", f"answer {i}"
        if layout in ("t2i", "t2v"):
            col, kind, data = ("image_bytes", "image", img[i]) if layout == "t2i" else ("video_bytes", "video", vid[i])
            rows.append({"caption": cap, col: data})
            expected.append(({"target": (data, kind)}, {"caption": cap}))
        elif layout in ("i2i", "v2v"):
            what, kind, src, tgt = (("image", "image", alt[i], img[i]) if layout == "i2i"
                                    else ("video", "video", alt_vid[i], vid[i]))
            rows.append({"caption": cap, f"input_{what}_bytes": src, f"output_{what}_bytes": tgt})
            expected.append(({"source": (src, kind), "target": (tgt, kind)}, {"caption": cap}))
        else:
            col, kind, data = ("image_bytes", "image", img[i]) if layout == "i2t" else ("video_bytes", "video", vid[i])
            rows.append({col: data, "caption_i": cap, "caption_q": q, "caption_a": a})
            expected.append(({"source": (data, kind)}, {"caption": cap, "question": q, "answer": a}))
    return rows, expected


@pytest.mark.parametrize("layout", ["t2i", "t2v", "i2i", "v2v", "i2t", "v2t"])
def test_parquet_layouts(tmp_path, media, layout):
    rows, expected = layout_rows(layout, media)
    path = tmp_path / f"{layout}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # two row groups
    src = SourceConfig(kind="parquet", name="pq", uri=str(path), layout=layout)
    items, fetched = fetch_all(src)
    assert [i.source_uri for i in items] == [f"{path}#rg=0&row=0", f"{path}#rg=0&row=1", f"{path}#rg=1&row=0"]
    assert {i.task for i in items} == {layout}
    for item, (slots, text) in zip(items, expected):
        got = fetched[item.source_uri][1]
        assert got.media == slots
        assert texts(got) == {k: text.get(k) for k in TEXT_FIELDS}
        assert got.sample_id() == expected_id(slots, **text)
    assert len({f.sample_id() for _, f in fetched.values()}) == 3

    rows_out = inspect_all(config({"kind": "parquet", "name": "pq", "uri": str(path), "layout": layout}))
    status = [(rows_out[i.source_uri]["status"], rows_out[i.source_uri]["reason"]) for i in items]
    kind = "video" if "v" in layout else "image"
    assert status == [("ok", None), ("ok", None), ("quarantined", f"undecodable_{kind}")]
    assert [rows_out[i.source_uri]["sample_id"] for i in items[:2]] == [fetched[i.source_uri][1].sample_id()
                                                                       for i in items[:2]]


def test_parquet_ids_match_other_sources_and_hf_image_structs(tmp_path, media, wds):
    """An HF `Image` struct column {bytes, path}, a binary caption column, a directory of files, and
    the same sample in WebDataset and Parquet getting one id."""
    table = pa.table({
        "caption": pa.array([image_caption("OPEN").encode(), b"\xff bad", None], pa.binary()),
        "image_bytes": pa.array([{"bytes": media["open_jpg"], "path": "a.jpg"},
                                 {"bytes": media["stop_png"], "path": "b.png"},
                                 {"bytes": media["exit_png"], "path": "c.png"}]),
    })
    (tmp_path / "pq").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "pq" / "part-0.parquet")
    pq.write_table(table.slice(2), tmp_path / "pq" / "part-1.parquet")
    (tmp_path / "pq" / "_SUCCESS").write_text("")
    src = {"kind": "parquet", "name": "pq", "uri": str(tmp_path / "pq"), "layout": "t2i"}
    items, fetched = fetch_all(SourceConfig(**src))
    assert [i.source_uri.rsplit("/", 1)[1] for i in items] == [
        "part-0.parquet#rg=0&row=0", "part-0.parquet#rg=0&row=1", "part-1.parquet#rg=0&row=0"]
    first = fetched[items[0].source_uri][1]
    _, wds_fetched = fetch_all(SourceConfig(kind="webdataset", name="wds", uri=str(wds / "shard-001.tar")))
    assert first.sample_id() == next(iter(wds_fetched.values()))[1].sample_id()
    rows = inspect_all(config(src))
    assert [(rows[i.source_uri]["status"], rows[i.source_uri]["reason"]) for i in items] == [
        ("ok", None), ("quarantined", "caption_not_utf8"), ("quarantined", "missing_caption")]


def test_parquet_layout_mismatch_fails_at_listing(tmp_path, media):
    path = tmp_path / "t2i.parquet"
    pq.write_table(pa.table({"caption": ["c"], "image_bytes": [media["stop_png"]]}), path)
    with pytest.raises(SourceError, match=r"layout 'i2i' needs columns \['input_image_bytes', 'output_image_bytes'\]"):
        list_source(SourceConfig(kind="parquet", name="pq", uri=str(path), layout="i2i"))
    with pytest.raises(SourceError, match=r"layout 'i2t' needs columns \['caption_a', 'caption_q'\]"):
        list_source(SourceConfig(kind="parquet", name="pq", uri=str(path), layout="i2t"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .parquet files"):
        list_source(SourceConfig(kind="parquet", name="pq", uri=str(tmp_path / "empty"), layout="t2i"))

"""End-to-end curation on a local Ray: planted defects (a folder corpus and a Parquet file of the
wrong types, next to good items), shard round trip, crash-safe refresh."""
from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from defects import write_defect_corpus, write_defect_parquet

from data_curation.media import encode_image
from data_curation.pipeline import run_curation
from data_curation.sources import list_source
from data_curation.stages import PrepareStage, VaeStage, VitStage, shard_row, to_batch
from data_curation.synthetic import image_caption, render_text_image
from lance_model.config import LanceConfig
from lance_platform.schema import SCHEMA_VERSION, read_shard, row_to_sample, shard_encoder


def shard_rows(out) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [r for s in manifest["shards"] for r in read_shard(out / s["path"]).to_pylist()]


@pytest.fixture(scope="module")
def defect_run(ray_local, tmp_path_factory, folder_config):
    root = tmp_path_factory.mktemp("defects")
    corpus = write_defect_corpus(root / "corpus")
    corpus.outcomes.update(write_defect_parquet(root / "parquet"))
    sources = (f"sources=[{{kind: folder, name: folder, uri: '{corpus.root}', captions: captions.jsonl}}, "
               f"{{kind: parquet, name: pq, uri: '{root / 'parquet'}', layout: t2i}}]")
    cfg = folder_config(corpus.root, root / "out", "tracking.enabled=true", f"tracking.workdir={root / 'mlflow'}",
                        "output.store_pixels=true", sources)
    result = run_curation(cfg, "curate")
    return corpus, cfg, result, root / "out"


def test_planted_defects_give_exact_rows_and_counts(defect_run):
    corpus, _, result, out = defect_run
    # nothing stops the job: the bomb, the bad-typed Parquet file, the unusable caption lines, the
    # missing file and the symlink out of the corpus are each one quarantined item, counted
    assert result.counts == {
        "listed": 29, "already_seen": 0, "new": 29, "curated": 10, "shards": 1,
        "quarantined": {"animated_image": 1, "caption_not_utf8": 1, "caption_table_bad_json": 1,
                        "caption_table_not_utf8": 1, "empty_file": 1, "missing_caption": 1, "missing_file": 1,
                        "symlink_outside_source": 1, "too_many_pixels": 1, "too_small": 1, "truncated_image": 1,
                        "undecodable_video": 1, "unknown_task": 1, "wrong_column_type": 2},
        "filtered": {"blur": 1, "static": 1},
        "duplicate": {"exact": 1, "near": 1},
    }
    rows = shard_rows(out)
    assert sorted(r["source_uri"].rsplit("/", 1)[1] for r in rows) == corpus.expected("curated")
    quarantine = pq.read_table(out / "quarantine" / "run-00000.parquet").to_pylist()
    got = {q["source_uri"].rsplit("/", 1)[1]: (q["stage"], q["reason"]) for q in quarantine}
    stage = {"filter": "filter", "dedup": "dedup"}
    expected = {name: (stage.get(o.split(":")[0], "validate"), o.split(":")[-1])
                for name, o in corpus.outcomes.items() if o != "curated"}
    assert got == expected
    by_name = {r["source_uri"].rsplit("/", 1)[1]: r for r in rows}
    assert by_name["vid_0.mp4"]["num_frames"] == 21 and by_name["vid_1.mp4"]["num_frames"] == 13
    assert by_name["vid_0.mp4"]["target_vae_shape"] == [21, 10, 14, 48]        # 48x48 area, 4:3, stride 4
    assert by_name["img_0.png"]["target_vae_shape"] == [1, 14, 18, 48] and by_name["img_0.png"]["bucket"] == "4:3"
    qa = by_name["qa_0.png"]
    assert qa["task"] == "i2t" and qa["answer"] == "PARK" and qa["source_vit_grid"] == [1, 4, 4]
    assert qa["target_vae_latent"] is None and bytes(qa["answer_ids"]) == b"PARK"
    edit = by_name["edit_0_out.png"]
    assert edit["source_vae_shape"] == edit["target_vae_shape"] and edit["source_vit_shape"] == [4, 64]
    # output.store_pixels: PNG / MP4 of the bucketed main visual, at the row's size
    import io

    import decord
    from PIL import Image
    for name, row in by_name.items():
        data = row["source_pixels" if row["task"] == "i2t" else "target_pixels"]
        if name.endswith(".mp4"):
            video = decord.VideoReader(io.BytesIO(data))
            assert (len(video), *video[0].shape) == (row["num_frames"], row["height"], row["width"], 3)
        else:
            assert Image.open(io.BytesIO(data)).size == (row["width"], row["height"])
    assert edit["source_pixels"] is not None and by_name["img_0.png"]["source_pixels"] is None


def test_run_writes_manifest_report_and_mlflow_run(defect_run):
    _, cfg, result, out = defect_run
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["total_rows"] == 10
    shard = out / manifest["shards"][0]["path"]
    import hashlib
    assert manifest["shards"][0]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert shard_encoder(shard) == manifest["encoder"] and manifest["encoder"]["vae"]["spatial_stride"] == 4
    report = out / manifest["runs"][0]["report"]
    assert {p.name for p in report.iterdir()} == {"stats.json", "resolution.png", "duration.png",
                                                  "caption_length.png", "buckets.png"}
    assert json.loads((report / "stats.json").read_text())["buckets"] == {"4:3": 10}
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{cfg.tracking.workdir}/mlflow.db")
    run = client.get_run(result.mlflow_run_id)
    assert run.data.metrics["curated"] == 10 and run.data.metrics["quarantined.truncated_image"] == 1
    assert run.data.metrics["quarantined.too_many_pixels"] == 1 and run.data.metrics["quarantined.missing_file"] == 1
    assert run.data.params["filters.min_blur"] == "5.0"
    assert run.inputs.dataset_inputs[0].dataset.name == "curated-shards"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report", "manifest.json", "config.yaml"}


def test_shard_round_trip_equals_encoder_output(defect_run):
    _, cfg, _, out = defect_run
    rows = {r["source_uri"]: r for r in shard_rows(out)}
    items = {i.source_uri: i for i in list_source(cfg.sources[0])}
    model = LanceConfig.from_preset("tiny")
    for name in ("vid_0.mp4", "edit_0_out.png"):
        uri = next(u for u in rows if u.endswith("/" + name))
        item = {**items[uri].__dict__, "sample_id": rows[uri]["sample_id"]}
        batch = to_batch([PrepareStage(cfg, model.vae.spatial_stride, model.vit.stride).prepare(item)],
                         ["target_vae_in", "source_vae_in", "target_vit_in", "source_vit_in"])
        encoded = VitStage(cfg.model)(VaeStage(cfg.model)(batch))
        fresh = shard_row({k: v[0] for k, v in encoded.items()})
        stored = row_to_sample(rows[uri])
        lat = torch.frombuffer(bytearray(fresh["target_vae_latent"]), dtype=torch.bfloat16)
        assert torch.equal(stored.target.latent, lat.reshape(fresh["target_vae_shape"]).permute(3, 0, 1, 2).float())
        for key in ("target_vae_latent", "source_vae_latent", "source_vit_tokens", "source_vit_grid"):
            assert rows[uri][key] == fresh[key], key
    edit = row_to_sample(rows[next(u for u in rows if u.endswith("/edit_0_out.png"))])
    assert edit.task == "image_edit" and edit.source.vit_tokens.shape == (4, 64)


def write_images(folder, words, start):
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    captions = folder / "captions.jsonl"
    if captions.exists():
        records = [json.loads(line) for line in captions.read_text().splitlines()]
    for i, word in enumerate(words, start):
        name = f"img_{i:02d}.png"
        (folder / name).write_bytes(encode_image(render_text_image(word, 48 + 8 * (i % 3), 64, seed=i)))
        records.append({"path": name, "caption": image_caption(word)})
    captions.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def snapshot(out):
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


class Crash(RuntimeError):
    pass


def test_refresh_killed_midway_then_rerun_equals_uninterrupted(ray_local, tmp_path, folder_config):
    corpus, crashed, clean = tmp_path / "corpus", tmp_path / "crashed", tmp_path / "clean"
    write_images(corpus, ["OPEN", "STOP", "EXIT", "SALE"], 0)
    small_shards = "output.target_shard_bytes=20000"  # about two rows per shard
    assert run_curation(folder_config(corpus, crashed, small_shards), "curate").counts["curated"] == 4
    write_images(corpus, ["CAFE", "GO", "HELLO", "LANCE", "RAY", "DATA"], 4)

    def crash_after_two(entry, seen=[]):  # noqa: B006 - counts shards across calls
        seen.append(entry)
        if len(seen) == 2:
            raise Crash("killed after two shards")

    with pytest.raises(Crash):
        run_curation(folder_config(corpus, crashed, small_shards), "refresh", on_shard=crash_after_two)
    assert len(list((crashed / "shards").glob("run-00001-*.parquet"))) == 2   # written, not committed
    resumed = run_curation(folder_config(corpus, crashed, small_shards), "refresh")
    assert resumed.counts["new"] == 6 and resumed.counts["already_seen"] == 4 and resumed.counts["curated"] == 6
    uninterrupted = run_curation(folder_config(corpus, clean, small_shards), "curate")
    ids = [r["sample_id"] for r in shard_rows(crashed)]
    assert len(ids) == len(set(ids)) == 10
    assert sorted(ids) == sorted(r["sample_id"] for r in shard_rows(clean))
    assert uninterrupted.counts["curated"] == 10
    on_disk = {str(p.relative_to(crashed)) for p in (crashed / "shards").iterdir()}
    assert on_disk == {s["path"] for s in json.loads((crashed / "manifest.json").read_text())["shards"]}

    before = snapshot(crashed)
    again = run_curation(folder_config(corpus, crashed, small_shards), "refresh")
    assert again.run is None and again.counts["new"] == 0 and snapshot(crashed) == before

    shutil.copy(corpus / "img_00.png", corpus / "img_99.png")  # same content under a new name
    records = (corpus / "captions.jsonl").read_text() + json.dumps({"path": "img_99.png",
                                                                    "caption": image_caption("OPEN")}) + "\n"
    (corpus / "captions.jsonl").write_text(records)
    dup = run_curation(folder_config(corpus, crashed, small_shards), "refresh")
    assert dup.counts["new"] == 1 and dup.counts["duplicate"] == {"exact": 1} and dup.counts["curated"] == 0


def test_curate_refuses_existing_dataset_and_other_encoders(defect_run, folder_config):
    corpus, _, _, out = defect_run
    from data_curation.store import DatasetMismatchError
    with pytest.raises(DatasetMismatchError, match="use `refresh`"):
        run_curation(folder_config(corpus.root, out), "curate")
    with pytest.raises(DatasetMismatchError, match="other encoders"):
        run_curation(folder_config(corpus.root, out, "buckets.vae_image_area=9216"), "refresh")

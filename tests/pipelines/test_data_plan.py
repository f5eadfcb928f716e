"""The driver's data checks before Ray Train (`pipelines.trainer.plan_data`): missing shards, the
tokenizer the ids were made with, the mixture against the rows per task, the hold-out. No Ray."""
from __future__ import annotations

import json
import logging

import pytest

from lance_model.tokenizer import SPECIAL_TOKENS, ByteTokenizer, load_tokenizer, tokenizer_record
from lance_platform.config import ConfigError
from lance_platform.schema import TokenizerMismatchError, write_shard
from pipelines import trainer
from pipelines.config import load_stage_config
from pipelines.trainer import plan_data, run_stage, task_counts

BYTE_RECORD = tokenizer_record(ByteTokenizer())


def make_hf_tokenizer(directory) -> str:
    """A small character-level tokenizer.json with the Qwen2 chat special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ?\"\n:.,'"))
    vocab = {c: i for i, c in enumerate(chars)} | {"[UNK]": len(chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    fast.save_pretrained(str(directory))
    return str(directory)


def stage_for(shards, *overrides: str):
    return load_stage_config(None, [f"data.shards={shards}", "mixture.groups={gen: {tasks: [t2i]}, und: {tasks: [i2t]}}",
                                    *overrides])


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if a stage gets as far as starting Ray."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(trainer, "init_ray", refuse)


def test_tokenizer_records_tell_tokenizers_apart(tmp_path):
    hf = load_tokenizer(make_hf_tokenizer(tmp_path / "chars"))
    record = tokenizer_record(hf)
    assert record == tokenizer_record(load_tokenizer(str(tmp_path / "chars")))  # stable across loads
    assert record["name"] == "chars" and record["vocab_size"] == len(hf) == 68
    assert record["fingerprint"] != BYTE_RECORD["fingerprint"]
    assert BYTE_RECORD == {"name": "byte", "vocab_size": 263, "fingerprint": BYTE_RECORD["fingerprint"]}


def test_a_model_tokenizer_other_than_the_shards_fails_naming_both(tmp_path, shard_dir, no_ray):
    hf_dir = make_hf_tokenizer(tmp_path / "chars")
    stage = stage_for(shard_dir, f"model.overrides.tokenizer={hf_dir}")
    with pytest.raises(TokenizerMismatchError) as err:
        run_stage(stage, tmp_path / "work")
    msg = str(err.value)
    assert "'byte' (vocab 263" in msg and "'chars' (vocab 68" in msg and hf_dir in msg
    assert "\n" not in msg
    assert isinstance(err.value, ConfigError)
    # the same shards with the preset's own (byte) tokenizer pass
    assert plan_data(stage_for(shard_dir)).tokenizer == BYTE_RECORD


def test_shards_without_a_tokenizer_record_are_refused(tmp_path, row_factory):
    write_shard(row_factory(4), tmp_path / "old" / "s.parquet")
    with pytest.raises(ConfigError, match=r"does not record the tokenizer.*lance-pipeline curate"):
        plan_data(stage_for(tmp_path / "old"))


def test_missing_shards_say_to_curate_first(tmp_path, no_ray):
    for shards in (tmp_path / "nothing", ""):
        stage = load_stage_config(None, [f"data.shards={shards}"], require_shards=False)
        with pytest.raises(ConfigError, match=r"data\.shards.*run `lance-pipeline curate"):
            run_stage(stage, tmp_path / "work")
    (tmp_path / "empty").mkdir()
    stage = load_stage_config(None, [f"data.shards={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match=r"no Parquet shards there; run `lance-pipeline curate"):
        run_stage(stage, tmp_path / "work")


def test_a_group_without_rows_is_a_config_error_naming_the_group_and_the_tasks_present(shard_dir, tmp_path, no_ray):
    stage = load_stage_config(None, [f"data.shards={shard_dir}",
                                     "mixture.groups={gen: {tasks: [t2i, t2v]}, video: {tasks: [v2t, v2v]}}"])
    with pytest.raises(ConfigError) as err:
        run_stage(stage, tmp_path / "work")
    msg = str(err.value)
    assert msg.startswith("mixture.groups.video: no rows of its tasks ['v2t', 'v2v']")
    assert "{'i2i': 8, 'i2t': 8, 't2i': 8}" in msg
    # a group that is never drawn (weight 0 throughout) may be empty
    stage = load_stage_config(None, [f"data.shards={shard_dir}",
                                     "mixture.groups={gen: {tasks: [t2i]}, video: {tasks: [v2t], weight: 0}}"])
    assert plan_data(stage).holdout == {"gen": 0, "video": 0}


def test_holdout_never_takes_the_rows_the_workers_need(tmp_path, row_factory, caplog):
    rows = row_factory(4)
    # t2i: 4 rows, i2t: 3 rows, i2i: 2 rows
    keep = [r for r in rows if r["task"] == "t2i"] + [r for r in rows if r["task"] == "i2t"][:3] \
        + [r for r in rows if r["task"] == "i2i"][:2]
    write_shard(keep, tmp_path / "d" / "s.parquet", tokenizer=BYTE_RECORD)
    stage = load_stage_config(None, [f"data.shards={tmp_path / 'd'}", "data.holdout_per_group=2",
                                     "scaling.num_workers=2",
                                     "mixture.groups={gen: {tasks: [t2i]}, und: {tasks: [i2t]}, edit: {tasks: [i2i]}}"])
    with caplog.at_level(logging.WARNING, logger="pipelines.trainer"):
        plan = plan_data(stage)
    assert plan.task_counts == {"t2i": 4, "i2t": 3, "i2i": 2}
    assert plan.holdout == {"gen": 2, "und": 1, "edit": 0}
    assert [r.getMessage().split(" has")[0] for r in caplog.records] == ["mixture.groups.und", "mixture.groups.edit"]
    stage.scaling.num_workers = 3
    with pytest.raises(ConfigError, match=r"mixture\.groups\.edit: 2 row\(s\) of \['i2i'\].*num_workers=3"):
        plan_data(stage)


def test_task_counts_come_from_the_manifest_or_the_shards(tmp_path, row_factory):
    rows = row_factory(3)
    root = tmp_path / "curated"
    files = [write_shard(rows[:4], root / "shards" / "a.parquet", tokenizer=BYTE_RECORD),
             write_shard(rows[4:], root / "shards" / "b.parquet", tokenizer=BYTE_RECORD)]
    from_columns = task_counts(root / "shards", [str(f) for f in files])
    assert from_columns == {"t2i": 3, "i2t": 3, "i2i": 3}
    # a manifest's per-task counts are used as they are (here deliberately different to tell them apart)
    (root / "manifest.json").write_text(json.dumps({"shards": [
        {"path": "shards/a.parquet", "rows": 4, "tasks": {"t2i": 2, "i2t": 2}},
        {"path": "shards/b.parquet", "rows": 5, "tasks": {"t2i": 1, "i2i": 4}}]}))
    assert task_counts(root, [str(f) for f in files]) == {"t2i": 3, "i2t": 2, "i2i": 4}
    assert task_counts(root / "shards", [str(f) for f in files]) == {"t2i": 3, "i2t": 2, "i2i": 4}


def test_cli_reports_a_data_error_in_one_line_with_exit_2(tmp_path, shard_dir, capsys):
    from jobs.cli import main

    code = main(["train", "--stage", "pt", "--workdir", str(tmp_path / "work"), f"data.shards={shard_dir}",
                 "mixture.groups={video: {tasks: [v2t]}}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("lance-pipeline: error: mixture.groups.video: no rows")
    code = main(["train", "--stage", "pt", "--workdir", str(tmp_path / "work"), f"data.shards={tmp_path / 'none'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "run `lance-pipeline curate" in err


def test_groups_by_source_are_counted_from_the_shards_source_uris(tmp_path, row_factory, no_ray):
    rows = row_factory(3, seed=0) + row_factory(5, seed=1)
    write_shard(rows, tmp_path / "d" / "s.parquet", tokenizer=BYTE_RECORD)
    groups = ("mixture.groups={a: {tasks: [t2i], uri_prefixes: ['synthetic://0/']}, "
              "b: {tasks: [t2i, i2t], uri_prefixes: ['synthetic://1/'], weight: 0, end_weight: 1}}")
    stage = load_stage_config(None, [f"data.shards={tmp_path / 'd'}", "data.holdout_per_group=1", groups])
    plan = plan_data(stage)
    assert plan.group_rows == {"a": 3, "b": 10}
    assert plan.holdout == {"a": 1, "b": 1}
    # a source with no rows is named with the prefixes it was looked for under
    stage = load_stage_config(None, [f"data.shards={tmp_path / 'd'}",
                                     "mixture.groups={a: {tasks: [t2i], uri_prefixes: ['synthetic://letters/']}}"])
    with pytest.raises(ConfigError, match=r"no rows of its tasks \['t2i'\] from \['synthetic://letters/'\]"):
        plan_data(stage)

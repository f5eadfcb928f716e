import pytest

from lance_platform.files import write_text_atomic


def test_write_text_atomic_makes_the_directory_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert write_text_atomic(target, "one") == target and target.read_text() == "one"
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    from lance_platform.files import atomic_target

    path = tmp_path / "table.parquet"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="half written"), atomic_target(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("half written")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]


def test_write_json_atomic_round_trips_orders_keys_on_request_and_writes_other_values_as_text(tmp_path):
    import json
    from pathlib import Path

    from lance_platform.files import write_json_atomic

    path = write_json_atomic(tmp_path / "j" / "out.json", {"b": 1, "a": [1.5, None], "p": Path("/x")})
    text = path.read_text()
    assert json.loads(text) == {"b": 1, "a": [1.5, None], "p": "/x"}
    assert text.index('"b"') < text.index('"a"') and text.endswith("}\n")
    write_json_atomic(path, {"b": 1, "a": 2}, sort_keys=True)
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]

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

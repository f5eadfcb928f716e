from lance_platform.files import write_text_atomic


def test_write_text_atomic_makes_the_directory_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    assert write_text_atomic(target, "one") == target and target.read_text() == "one"
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]

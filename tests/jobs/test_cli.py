"""The `lance-pipeline` command line: help texts, and user mistakes as one line with a non-zero exit."""
from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest

from jobs.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
CURATION = str(REPO / "configs" / "curation" / "synthetic.yaml")


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    """No cluster from the environment; and `--address` (which exports RAY_ADDRESS) is undone after each test."""
    monkeypatch.setenv("RAY_ADDRESS", "")
    monkeypatch.delenv("RAY_ADDRESS")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("lance-pipeline: error:") and "Traceback" not in err[0]
    return err[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_registered_and_every_option_is_explained():
    commands = subcommands()
    assert set(commands) == {"demo", "curate", "refresh", "train", "pipeline", "rl", "rl-tune", "generate", "submit"}
    for name, parser in commands.items():
        assert parser.description, name
        for action in parser._actions:
            assert action.help, f"{name}: option {action.option_strings or action.dest} has no help"


def test_help_exits_zero_and_names_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["submit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--no-wait" in out and "--working-dir" in out and "MLFLOW_TRACKING_URI" in out


def test_unknown_command_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["curat"])
    assert exc.value.code == 2
    assert "invalid choice: 'curat'" in one_error_line(capsys)


@pytest.mark.parametrize("argv, expected", [
    (["curate", "--config", CURATION, "encode.vea_actors=2"], "vea_actors"),          # unknown field
    (["curate", "--config", CURATION, "output.dir.sub=x"], "output.dir"),             # not a section
    (["train", "--stage", "pt", "steps=0", "data.shards=."], "steps=0"),              # bad value
    (["curate", "--config", "configs/curation/missing.yaml"], "config file not found"),
    (["pipeline", "--config", "nowhere.yaml"], "config file not found"),
    (["rl", "--config", "configs/rl/grpo_ocr.yaml", "rollout.group_size=1"], "rollout.group_size"),
    (["demo", "pt.steps"], "expected <stage>.key=value"),
    (["demo", "rlx.steps=2"], "expected <stage>.key=value"),
    (["demo", "pt.stepz=2"], "stepz"),
    (["generate", "--checkpoint", "no/such/dir", "--prompt", "x", "--task", "t2i"], "checkpoint directory not found"),
])
def test_user_mistakes_are_one_line_exit_2(argv, expected, capsys, tmp_path):
    if argv[0] == "demo":
        argv = [argv[0], "--workdir", str(tmp_path / "demo"), *argv[1:]]
    assert main(argv) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "demo").exists()  # a demo with a bad override touches nothing


def test_unreachable_ray_address_is_one_line_and_quick(capsys, monkeypatch):
    port = free_port()  # nothing listens there
    assert main(["--address", f"127.0.0.1:{port}", "curate", "--config", CURATION]) == 2
    assert f"cannot reach Ray at 127.0.0.1:{port}" in one_error_line(capsys)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # the same through the environment
    assert main(["train", "--stage", "pt", f"data.shards={REPO}"]) == 2
    assert "cannot reach Ray" in one_error_line(capsys)
    assert main(["submit", "--address", f"http://127.0.0.1:{port}", "curate", "--config", CURATION]) == 2
    assert "cannot reach the Ray dashboard" in one_error_line(capsys)


def test_demo_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert "holds no previous demo" in one_error_line(capsys)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_debug_shows_the_traceback():
    with pytest.raises(FileNotFoundError, match="config file not found"):
        main(["--debug", "curate", "--config", "configs/curation/missing.yaml"])


def test_submit_checks_the_command_line_before_submitting(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["submit", "--address", "http://127.0.0.1:1", "curate", "--config", CURATION, "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in one_error_line(capsys)
    assert main(["submit", "submit", "demo"]) == 2
    assert "another command" in one_error_line(capsys)

"""The `lance-pipeline` command line: help texts, and user mistakes as one line with a non-zero exit."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_helpers import free_port

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


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_registered_and_every_option_is_explained():
    commands = subcommands()
    assert set(commands) == {"demo", "curate", "refresh", "train", "pipeline", "rl", "rl-tune", "recipe", "generate",
                             "export", "submit"}
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


# ------------------------------------------------------------------ typed config values, per family
@pytest.fixture
def no_ray(monkeypatch):
    """Config errors come before Ray: starting it fails the test."""
    from lance_platform import runtime

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the config was checked")

    monkeypatch.setattr(runtime, "init_ray", refuse)


BAD_VALUES = [  # (a bad override, the field its one error line names)
    ("optim.lr=abc", "optim.lr='abc'"),
    ("data.max_tokens=lots", "data.max_tokens='lots'"),
    ("scaling.num_workers=two", "scaling.num_workers='two'"),
    ("model.overrides.nonsense=1", "model.overrides.nonsense=1: unknown LanceConfig field"),
    ("model.overrides.text.hidden_size=abc", "model.overrides.text.hidden_size='abc'"),
    ("optim.schedule=linear", "optim.schedule='linear': expected one of"),
    ("ema_decay=1.5", "ema_decay=1.5"),
]


@pytest.mark.parametrize("override, named", BAD_VALUES)
def test_stage_bad_values(override, named, capsys, no_ray):
    assert main(["train", "--stage", "pt", f"data.shards={REPO}", override]) == 2
    assert named in one_error_line(capsys)


@pytest.mark.parametrize("override, named", [
    ("name=5", None),  # accepted: a number where a string is expected is its text
    ("stages=[]", "stages=[]: expected a non-empty list"),
    ("stage_overrides={pt: 3}", "stage_overrides.pt=3: expected a list"),
])
def test_pipeline_bad_values(override, named, capsys, no_ray, monkeypatch):
    import pipelines.trainer

    ran = []
    monkeypatch.setattr(pipelines.trainer, "run_stage", lambda *a, **k: ran.append(a))
    code = main(["pipeline", "--config", "configs/pipelines/default.yaml", override])
    if named is None:
        capsys.readouterr()
        return
    assert code == 2 and named in one_error_line(capsys) and not ran


@pytest.mark.parametrize("override, named", [
    ("encode.vae_actors=two", "encode.vae_actors='two': expected a positive integer"),
    ("encode.num_gpus=some", "encode.num_gpus='some': expected one of ['auto'] or a non-negative number"),
    ("filters.min_script_fraction=2", "filters.min_script_fraction=2"),
    ("sources=[{kind: ftp, name: x}]", "sources.0.kind='ftp'"),
    ("output.store_pixels=maybe", "output.store_pixels='maybe': expected true or false"),
])
def test_curation_bad_values(override, named, capsys, no_ray):
    assert main(["curate", "--config", CURATION, override]) == 2
    assert named in one_error_line(capsys)


@pytest.mark.parametrize("override, named", [
    ("optim.lr=abc", "optim.lr='abc': expected a positive number"),
    ("rollout.group_size=two", "rollout.group_size='two'"),
    ("rollout.kv_cache=perhaps", "rollout.kv_cache='perhaps': expected true or false"),
    ("grpo.clip_range=2", "grpo.clip_range=2: expected a number in (0, 1), or null"),
    ("policy.device=tpu", "policy.device='tpu': expected auto, cpu or cuda[:N]"),
    ("reward.ocr.threads=0", "reward.ocr.threads=0"),
    ("reward.weights={ocr: abc}", "reward.weights.ocr='abc'"),
])
def test_rl_bad_values(override, named, capsys, no_ray):
    assert main(["rl", "--config", "configs/rl/grpo_ocr.yaml", override]) == 2
    assert named in one_error_line(capsys)


@pytest.mark.parametrize("override, named", [
    ("num_samples=lots", "num_samples='lots': expected a positive integer"),
    ("metric=loss", "metric='loss': expected one of"),
    ("search_space={optim.lr: {normal: [1, 2]}}", "search_space.optim.lr="),
    ("search_space={optim.lr: {choice: [abc]}}", "optim.lr='abc': expected a positive number"),
    ("overrides=[rollout.steps=x]", "rollout.steps='x'"),
])
def test_rl_tune_bad_values(override, named, capsys, no_ray):
    assert main(["rl-tune", "--config", "configs/rl/tune_ocr.yaml", override]) == 2
    assert named in one_error_line(capsys)


@pytest.mark.parametrize("override, named", [
    ("pt.optim.lr=abc", "pt.optim.lr='abc'"),
    ("pt.stepz=3", "pt.stepz=3: unknown StageConfig field"),
    ("ct.data.max_tokens=lots", "ct.data.max_tokens='lots'"),
    ("sft.scaling.num_workers=two", "sft.scaling.num_workers='two'"),
    ("sft.model.overrides.nonsense=1", "sft.model.overrides.nonsense=1"),
    ("curate.encode.vit_actors=x", "curate.encode.vit_actors='x'"),
    ("rl.rollout.group_size=1", "rl.rollout.group_size=1"),
    ("pt.optim.min_lr=1", "pt.optim.min_lr=1.0: expected between 0 and optim.lr"),  # a cross-field rule
])
def test_demo_bad_values_name_the_stage(override, named, capsys, tmp_path, no_ray):
    assert main(["demo", "--workdir", str(tmp_path / "demo"), override]) == 2
    assert named in one_error_line(capsys)
    assert not (tmp_path / "demo").exists()


class Reached(Exception):
    """Raised by a stubbed stage with the config it was given (the command got past config loading)."""


def test_lr_written_1e_4_is_a_float(monkeypatch):
    import pipelines.trainer
    import rl.trainer

    def reached(cfg, *args, **kwargs):
        raise Reached(cfg)

    monkeypatch.setattr(pipelines.trainer, "run_stage", reached)
    monkeypatch.setattr(rl.trainer, "train_grpo", reached)
    with pytest.raises(Reached) as stage:
        main(["train", "--stage", "pt", f"data.shards={REPO}", "optim.lr=1e-4", "optim.min_lr=0"])
    with pytest.raises(Reached) as grpo:
        main(["rl", "--config", "configs/rl/grpo_ocr.yaml", "optim.lr=1e-4"])
    for cfg in (stage.value.args[0], grpo.value.args[0]):
        assert cfg.optim.lr == 0.0001 and isinstance(cfg.optim.lr, float)


def test_a_plain_value_error_keeps_its_traceback(monkeypatch, capsys):
    import data_curation.pipeline

    def bug(*args, **kwargs):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(data_curation.pipeline, "run_curation", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["curate", "--config", CURATION])
    assert "lance-pipeline: error" not in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["curat"], ["generate", "--help"]])
def test_parsing_imports_no_heavy_library(argv):
    code = ("import sys\nfrom jobs.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers') if m in sys.modules))" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_generate_task_choices_match_the_model():
    from jobs.generate import TASK_CHOICES
    from lance_model.generation import TASK_ALIASES, TEXT_TASKS, VISUAL_TASKS

    assert TASK_CHOICES == VISUAL_TASKS + TEXT_TASKS + tuple(TASK_ALIASES)


def test_overrides_may_follow_options():
    from jobs.cli import parse

    args = parse(["recipe", "--config", "r.yaml", "workdir=w", "--stages", "pt", "pt.steps=10", "tracking=false"])
    assert args.stages == "pt" and args.overrides == ["workdir=w", "pt.steps=10", "tracking=false"]
    assert parse(["curate", "--config", CURATION, "a=1"]).overrides == ["a=1"]


@pytest.mark.parametrize("argv", [["recipe", "--config", "r.yaml", "--stages", "pt", "--nope"],
                                  ["recipe", "--config", "r.yaml", "a=1", "--stages", "pt", "stray"],
                                  ["generate", "--checkpoint", "c", "--prompt", "x", "steps=3"]])
def test_stray_arguments_are_still_an_error(argv, capsys):
    from jobs.cli import parse

    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2 and "unrecognized arguments" in one_error_line(capsys)

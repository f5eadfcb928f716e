"""The `lance-pipeline` command line: the demo job and user-error handling."""
from __future__ import annotations

import torch

from jobs.cli import main
from lance_model import Lance


def test_demo_trains_and_writes_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--steps", "3", "--images", "3"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and str(tmp_path) in out
    model = Lance.from_pretrained(tmp_path / "checkpoints" / "final")
    assert (tmp_path / "checkpoints" / "final" / "model.safetensors").is_file()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_user_error_is_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--steps", "1", "--images", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lance-pipeline: error:")

"""`lance-pipeline generate` end to end on a tiny random checkpoint: every task writes a valid
PNG / MP4 / text, a prompts file batches requests, and bad inputs fail early with one line."""
from __future__ import annotations

import json

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from jobs.cli import main
from lance_model import Lance, LanceConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    model = Lance(LanceConfig.from_preset("tiny"))
    model.init_weights(std=0.05)
    model.save_pretrained(root / "ckpt")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (28, 56, 3), dtype=np.uint8)).save(root / "image.png")
    with imageio.get_writer(str(root / "video.mp4"), fps=12, codec="libx264", macro_block_size=1) as w:
        for _ in range(5):
            w.append_data(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8))
    (root / "broken.png").write_text("not an image")
    wan = LanceConfig.from_preset("tiny")
    wan.vae.kind, wan.vae.spatial_stride, wan.vae.temporal_stride = "wan2.2", 16, 4
    wan.save(root / "wan_ckpt")  # config only: validation must fail before the weights are needed
    return root


def run(files, tmp_path, *args):
    return main(["generate", "--checkpoint", str(files / "ckpt"), "--out", str(tmp_path), "--steps", "2",
                 "--max-new-tokens", "4", *args])


def mp4_frames(path):
    with imageio.get_reader(str(path), "ffmpeg") as r:
        return [np.asarray(f) for f in r]


@pytest.mark.parametrize("task,args,expect", [
    ("t2i", ["--height", "16", "--width", "24"], ("png", 16, 24, 1)),
    ("t2v", ["--height", "16", "--width", "24", "--frames", "5"], ("mp4", 16, 24, 5)),
    ("i2v", ["--image", "{image}", "--frames", "3"], ("mp4", 28, 56, 3)),
    ("image_edit", ["--image", "{image}", "--cfg-image", "1.5"], ("png", 28, 56, 1)),
    ("video_edit", ["--video", "{video}"], ("mp4", 28, 28, 5)),
    ("i2t", ["--image", "{image}"], ("txt",)),
    ("v2t", ["--video", "{video}"], ("txt",)),
])
def test_every_task_writes_its_output(files, tmp_path, capsys, task, args, expect):
    args = [a.format(image=files / "image.png", video=files / "video.mp4") for a in args]
    assert run(files, tmp_path, "--task", task, "--prompt", "a red sign", *args) == 0
    [entry] = json.loads((tmp_path / "results.json").read_text())
    path = tmp_path / entry["file"]
    assert path.suffix == "." + expect[0] and str(path) in capsys.readouterr().out
    if expect[0] == "png":
        with Image.open(path) as im:
            assert im.size == (expect[2], expect[1]) and im.mode == "RGB"
    elif expect[0] == "mp4":
        frames = mp4_frames(path)
        assert len(frames) == expect[3] and frames[0].shape == (expect[1], expect[2], 3)
    else:
        assert path.read_bytes() == (entry["text"] + "\n").encode() and len(entry["text"].encode()) <= 4 * 4


def test_prompts_file_batches_and_seeds(files, tmp_path):
    prompts = [{"task": "t2i", "prompt": "a", "height": 16, "width": 16},
               {"task": "t2i", "prompt": "b", "height": 16, "width": 16},
               {"task": "t2i", "prompt": "a", "height": 16, "width": 16, "seed": 0},
               {"task": "x2t_image", "prompt": "what?", "image": "image.png"}]
    (files / "prompts.json").write_text(json.dumps(prompts))
    assert run(files, tmp_path, "--prompts", str(files / "prompts.json"), "--seed", "0") == 0
    manifest = json.loads((tmp_path / "results.json").read_text())
    assert [m["seed"] for m in manifest] == [0, 1, 0, 3]
    assert [m["file"] for m in manifest][3].endswith(".txt")
    first, second, third = (np.asarray(Image.open(tmp_path / m["file"])) for m in manifest[:3])
    assert np.array_equal(first, third) and not np.array_equal(first, second)


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "{root}/missing", "--task", "t2i", "--height", "16", "--width", "16"], "missing"),
    (["--task", "t2i", "--height", "18", "--width", "16"], "18x16"),
    (["--task", "i2t", "--image", "{root}/broken.png"], "broken.png"),
    (["--task", "i2v", "--image", "{root}/nowhere.png", "--frames", "3"], "nowhere.png"),
    (["--task", "v2t", "--video", "{root}/broken.png"], "broken.png"),
    (["--task", "image_edit"], "--image"),
    (["--task", "t2v", "--height", "16", "--width", "16", "--frames", "6", "--checkpoint", "{root}/wan_ckpt"],
     "frames=6"),
    (["--task", "t2i", "--height", "16", "--width", "16", "--cfg-renorm-min", "0", "--steps", "0"], "num_steps=0"),
])
def test_bad_inputs_fail_with_one_line(files, tmp_path, capsys, args, message):
    args = [a.format(root=files) for a in args]
    assert run(files, tmp_path, "--prompt", "x", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lance-pipeline: error:") and message in err[0]
    assert not (tmp_path / "results.json").exists()

"""RL fixtures (the local Ray is `ray_local` of tests/conftest.py): a RapidOCR engine,
Pillow-rendered text, and small GRPO configs on the `tiny` preset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from lance_platform.config import load_config
from rl.config import RLConfig

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "rl" / "grpo_ocr.yaml"
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


@pytest.fixture(scope="session")
def rapid_engine():
    from rl.ocr import RapidOcrEngine

    return RapidOcrEngine()


def render_text(lines: list[str], size: int = 512, font_size: int = 44) -> np.ndarray:
    """RGB uint8 [size, size, 3]: black text lines centred on white (a real TTF when installed)."""
    font = ImageFont.truetype(str(FONT), font_size) if FONT.is_file() else ImageFont.load_default(size=font_size)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    step = int(font_size * 1.5)
    y = (size - step * len(lines)) // 2
    for line in lines:
        left, top, right, _ = draw.textbbox((0, 0), line, font=font)
        draw.text(((size - (right - left)) // 2 - left, y - top), line, fill=(0, 0, 0), font=font)
        y += step
    return np.asarray(img)


@pytest.fixture(scope="session")
def render():
    return render_text


@pytest.fixture
def rl_config(tmp_path):
    def make(*overrides: str) -> RLConfig:
        return load_config(RLConfig, CONFIG, [f"workdir={tmp_path / 'rl'}", "rollout.steps=3", "rollout.eval_steps=3",
                                              "prompts.eval_synthetic=2", "reward.num_actors=1", *overrides])
    return make

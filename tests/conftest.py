"""Shared fixtures: tiny random models and synthetic samples (everything offline, CPU)."""
from __future__ import annotations

import random
import sys

import pytest
import torch

from lance_model import Lance, LanceConfig
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_behind():
    """A test module that started a local Ray in this process shuts it down: a lingering instance
    holds Ray's default per-node ports, which a later test's own Ray head needs."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def tiny_config() -> LanceConfig:
    return LanceConfig.from_preset("tiny")


@pytest.fixture
def tiny_model(tiny_config) -> Lance:
    torch.manual_seed(0)
    model = Lance(tiny_config)
    model.init_weights()
    return model


@pytest.fixture
def builder() -> SequenceBuilder:
    return SequenceBuilder(ByteTokenizer())


def make_sample(task: str, hidden: int, seed: int = 0, caption: str | None = None) -> Sample:
    """A random sample of `task` with small latents (48 ch) / ViT tokens of width `hidden`."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    lat = lambda t, h, w: torch.randn(48, t, h, w, generator=g)
    vit = lambda gt, gh, gw: Visual(vit_tokens=torch.randn(gt * (gh // 2) * (gw // 2), hidden, generator=g),
                                    vit_grid=(gt, gh, gw))
    caption = caption if caption is not None else f'sign with "{rng.choice(["OPEN", "STOP", "GO"])}"'
    if task == "t2i":
        return Sample("t2i", caption, target=Visual(latent=lat(1, 3, 4)))
    if task == "t2v":
        return Sample("t2v", caption, target=Visual(latent=lat(2, 3, 3)))
    if task == "i2v":
        return Sample("i2v", caption, target=Visual(latent=lat(3, 2, 3), clean_frames=1))
    if task in ("image_edit", "subject"):
        src = vit(1, 4, 6)
        src.latent = lat(1, 3, 4)
        src.latent_shape = (1, 3, 4)
        return Sample(task, "change the text to GO", source=src, target=Visual(latent=lat(1, 3, 4)))
    if task == "video_edit":
        src = vit(2, 4, 4)
        src.latent = lat(2, 2, 2)
        src.latent_shape = (2, 2, 2)
        return Sample(task, "make it red", source=src, target=Visual(latent=lat(2, 2, 2)))
    if task in ("i2t", "v2t"):
        grid = (1, 4, 4) if task == "i2t" else (2, 4, 4)
        return Sample(task, "What does the sign say?", answer=rng.choice(["OPEN", "STOP"]), source=vit(*grid))
    raise ValueError(task)


@pytest.fixture
def sample_factory():
    return make_sample

"""Shared fixtures: the local Ray of a group of test modules, tiny random models and synthetic
samples (everything offline, CPU)."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

from lance_model import Lance, LanceConfig
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer

TESTS = Path(__file__).resolve().parent
# Test directories whose modules share one local Ray (started by the first test that needs it),
# instead of a start (~6 s) and a shutdown per module. pipelines and rl run one after the other
# and start no Ray of their own (no `ray start`, no CLI subprocess), so they form one group.
RAY_GROUPS = {"data_curation": "data_curation", "pipelines": "train", "rl": "train"}


def _ray_group(item: pytest.Item | None) -> str | None:
    if item is None:
        return None
    path = Path(item.path).resolve()
    top = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else ""
    return RAY_GROUPS.get(top, str(path))  # elsewhere: each module on its own


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """A local Ray started in this process is shut down (after the fixtures' teardown) when the
    next test is in another group (see RAY_GROUPS) or there is none: a lingering instance holds
    Ray's default per-node ports, which a later test's own Ray (a CLI subprocess) needs."""
    try:
        return (yield)
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized() and _ray_group(nextitem) != _ray_group(item):
            ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """The local Ray of this group of test modules (2 CPUs, this machine's), started if none is
    running; never `ray stop` (others use Ray here), never someone else's cluster."""
    import ray

    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    return ray


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

"""The reward actor pool survives a killed actor: it is restarted and the batch still scores."""
from __future__ import annotations

import time

import pytest

from rl.actors import RewardActorPool
from rl.ocr import OcrConfig


def test_killed_reward_actor_is_restarted_and_the_batch_arrives(ray_local, render):
    pool = RewardActorPool(OcrConfig(engine="rapidocr"), num_actors=2)
    try:
        assert [i["engine"] for i in pool.info()] == ["rapidocr", "rapidocr"]  # engines loaded
        words = ["OPEN", "STOP", "EXIT", "SALE", "CAFE", "PARK"]
        images = [render([w]) for w in words]
        prompts = [f'a sign that says "{w}"' for w in words]
        pending = pool.submit(images, prompts)
        time.sleep(0.3)  # actor 0 is now in the middle of its 3 images
        victim = pool.actors[0]
        ray_local.kill(victim, no_restart=True)
        batch = pending.result()
        assert pool.restarts == 1 and pool.actors[0] is not victim
        assert batch.components["ocr"] == pytest.approx([1.0] * 6)
        assert [t.lower() for t in batch.texts] == [w.lower() for w in words]
        assert batch.failures == 0
    finally:
        pool.shutdown()

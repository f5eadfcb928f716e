"""The reward actor pool survives a killed actor: it is restarted and the batch still scores.

No timing: actor 0 is stopped inside `score` by a gate (an async Ray actor) that it calls with its
chunk; the test waits for that explicit signal, then kills it, so the kill always lands mid-chunk.
"""
from __future__ import annotations

import asyncio

import pytest

from rl import actors
from rl.ocr import OcrConfig

WORDS = ["OPEN", "STOP", "EXIT", "SALE", "CAFE", "PARK"]  # two actors: OPEN STOP EXIT | SALE CAFE PARK


@pytest.fixture
def gated_pool(ray_local, monkeypatch):
    """make(max_retries) -> (pool, gate): the first `score` of a chunk starting with "OPEN" blocks
    forever inside the actor after telling the gate; every later call scores normally."""

    @ray_local.remote(num_cpus=0)
    class Gate:
        def __init__(self) -> None:
            self.entered = asyncio.Event()
            self.used = False

        async def enter(self) -> bool:
            first, self.used = not self.used, True
            self.entered.set()
            return first

        async def wait_entered(self) -> bool:
            await self.entered.wait()
            return True

        async def hold(self) -> None:
            await asyncio.Event().wait()

    gate = Gate.remote()

    class GatedOcrRewardActor(actors.OcrRewardActor):
        def score(self, items, prompts):
            import ray

            if prompts and prompts[0].endswith('"OPEN"') and ray.get(gate.enter.remote()):
                ray.get(gate.hold.remote())  # never returns: the test kills this actor here
            return super().score(items, prompts)

    monkeypatch.setattr(actors, "OcrRewardActor", GatedOcrRewardActor)
    pools = []

    def make(max_retries: int) -> tuple[actors.RewardActorPool, object]:
        pools.append(actors.RewardActorPool(OcrConfig(engine="rapidocr"), num_actors=2, max_retries=max_retries))
        return pools[-1], gate

    yield make
    for pool in pools:
        pool.shutdown()
    ray_local.kill(gate, no_restart=True)


def _kill_actor_zero_mid_chunk(ray_local, pool, gate, render):
    images = [render([w]) for w in WORDS]
    prompts = [f'a sign that says "{w}"' for w in WORDS]
    pending = pool.submit(images, prompts)
    assert ray_local.get(gate.wait_entered.remote(), timeout=600)  # actor 0 is inside score, on its chunk
    victim = pool.actors[0]
    ray_local.kill(victim, no_restart=True)
    return pending, victim


def test_killed_reward_actor_is_restarted_and_the_batch_arrives(ray_local, render, gated_pool):
    pool, gate = gated_pool(max_retries=2)
    assert [i["engine"] for i in pool.info()] == ["rapidocr", "rapidocr"]  # engines loaded
    first_pids = [i["pid"] for i in pool.info()]
    pending, victim = _kill_actor_zero_mid_chunk(ray_local, pool, gate, render)
    batch = pending.result()
    assert pool.restarts == 1 and pool.actors[0] is not victim
    pids = [i["pid"] for i in pool.info()]
    assert pids[0] != first_pids[0] and pids[1] == first_pids[1]  # only the killed actor was replaced
    # every image scored, in submission order, the killed actor's chunk by its replacement
    assert batch.components["ocr"] == pytest.approx([1.0] * 6)
    assert [t.lower() for t in batch.texts] == [w.lower() for w in WORDS]
    assert batch.failures == 0


def test_a_chunk_past_its_retry_budget_fails_naming_the_actor(ray_local, render, gated_pool):
    pool, gate = gated_pool(max_retries=0)
    pending, _ = _kill_actor_zero_mid_chunk(ray_local, pool, gate, render)
    with pytest.raises(actors.RewardActorsFailed, match=r"reward actor 0 died 1 times on a chunk of 3 images"):
        pending.result()
    assert pool.restarts == 0

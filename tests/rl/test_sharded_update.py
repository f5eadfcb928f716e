"""The sharded GRPO update (`grpo.train_workers`) over gloo, with rollout actors: 2 rollout actors
+ 2 FSDP2 training workers reproduce the single-process run for the same seed (rewards,
updated weights and optimizer state within 1e-5 after 2 steps; the advantages follow from the
rewards). Rewards are the
images' mean brightness, scored in the driver, so they differ per sample and every group trains."""
from __future__ import annotations

import time

import pytest
import torch
from grpo_helpers import BASE, BrightnessPool, state

from rl.grpo import group_advantages
from rl.trainer import GrpoTrainer

TOL = 1e-5


def run(trainer: GrpoTrainer, steps: int = 2) -> list[list[dict]]:
    out = []
    try:
        for _ in range(steps):
            _, _, records = trainer.iteration()
            out.append(records)
    finally:
        trainer.close()
    return out


@pytest.mark.parametrize("extra", [(), ("lora.enabled=true", "lora.rank=4", "lora.alpha=8")], ids=["full", "lora"])
def test_two_rollout_actors_and_two_training_workers_reproduce_the_single_process_run(ray_local, rl_config, extra):
    single = GrpoTrainer(rl_config(*BASE, *extra), reward_pool=BrightnessPool())
    start = state(single)
    want = run(single)
    want_state, want_optim = state(single), single.optimizer_state()

    t0 = time.perf_counter()
    sharded = GrpoTrainer(rl_config(*BASE, *extra, "rollout.num_workers=2", "rollout.num_cpus=0.25",
                                    "grpo.train_workers=2", "grpo.train_num_cpus=0.25"),
                          reward_pool=BrightnessPool())
    assert sharded.group is not None and sharded.rollouts is not None
    got = []
    try:
        for _ in range(2):
            metrics, _, records = sharded.iteration()
            got.append(records)
            assert metrics["rollout/stale"] == 0 and metrics["optimizer_steps"] == 2
        got_optim = sharded.optimizer_state()
        assert [i["version"] for i in sharded.rollouts.info()] == [2, 2]
    finally:
        sharded.close()
    print(f"sharded run: {time.perf_counter() - t0:.1f}s")

    for w, g in zip(want, got):
        assert [r["seed"] for r in g] == [r["seed"] for r in w]
        assert [r["reward"] for r in g] == pytest.approx([r["reward"] for r in w], abs=TOL)
        # the advantages are the group advantages of these rewards (how close they come to the
        # single-process ones depends on each group's spread: (r - mean) / (std + 1e-4))
        adv, _ = group_advantages(torch.tensor([r["reward"] for r in g], dtype=torch.float64), 2)
        assert [r["advantage"] for r in g] == pytest.approx(adv.tolist(), abs=1e-7)
        assert [r["advantage"] for r in g] == pytest.approx([r["advantage"] for r in w], abs=1e-2)
        assert any(abs(r["advantage"]) > 0.1 for r in w)  # groups trained
    got_state = state(sharded)
    assert got_state.keys() == want_state.keys()
    moved = max(float((want_state[k].float() - start[k].float()).abs().max()) for k in want_state)
    assert moved > 1e-4  # the update did something
    for k in want_state:
        torch.testing.assert_close(got_state[k], want_state[k], atol=TOL, rtol=0, msg=k)
    assert got_optim["state"].keys() == want_optim["state"].keys()
    for name, entry in want_optim["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(got_optim["state"][name][key], value, atol=TOL, rtol=0, msg=f"{name}/{key}")

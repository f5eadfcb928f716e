"""The sharded GRPO update (`grpo.train_workers`) over gloo, with rollout actors: 2 rollout actors
+ 2 FSDP2 training workers reproduce the single-process run for the same seed (rewards,
advantages, updated weights and optimizer state within 1e-5 after 2 steps), and so do fresh
training workers resumed from the sharded run's step-1 checkpoint. Rewards are the
images' mean brightness plus 1.0 on every second sample, scored in the driver: every group trains,
and its spread keeps the advantages as close as the rewards."""
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


@pytest.mark.parametrize("extra", [(), ("lora.enabled=true", "lora.rank=4", "lora.alpha=8"), ("grpo.train_shard_size=1",)],
                         ids=["full", "lora", "hsdp"])
def test_two_rollout_actors_and_two_training_workers_reproduce_the_single_process_run(ray_local, rl_config, extra):
    single = GrpoTrainer(rl_config(*BASE, *extra), reward_pool=BrightnessPool(spread=1.0))
    start = state(single)
    want = run(single)
    want_state, want_optim = state(single), single.optimizer_state()

    t0 = time.perf_counter()
    sharded = GrpoTrainer(rl_config(*BASE, *extra, "rollout.num_workers=2", "rollout.num_cpus=0.25",
                                    "grpo.train_workers=2", "grpo.train_num_cpus=0.25"),
                          reward_pool=BrightnessPool(spread=1.0))
    assert sharded.group is not None and sharded.rollouts is not None
    import ray

    layouts = ray.get([w.layout.remote() for w in sharded.group.workers])
    hsdp = "grpo.train_shard_size=1" in extra  # 2 replicas of 1 shard each: every parameter whole on each rank
    for layout in layouts:
        assert (layout["mesh_dims"], layout["mesh_shape"]) == ((("replicate", "shard"), (2, 1)) if hsdp else ((), (2,)))
        assert layout["placements"] == (["(Replicate(), Shard(dim=0))"] if hsdp else ["(Shard(dim=0),)"])
    got = []
    try:
        for _ in range(2):
            metrics, _, records = sharded.iteration()
            got.append(records)
            assert metrics["rollout/stale"] == 0 and metrics["optimizer_steps"] == 2
            if sharded.step == 1:
                middle = sharded.save()  # gathered from the training workers
        got_optim = sharded.optimizer_state()
        assert [i["version"] for i in sharded.rollouts.info()] == [2, 2]
    finally:
        sharded.close()
    print(f"sharded run: {time.perf_counter() - t0:.1f}s")

    for w, g in zip(want, got):
        assert [r["seed"] for r in g] == [r["seed"] for r in w]
        assert [r["reward"] for r in g] == pytest.approx([r["reward"] for r in w], abs=TOL)
        # the advantages are the group advantages of these rewards, and those of the single process
        adv, _ = group_advantages(torch.tensor([r["reward"] for r in g], dtype=torch.float64), 2)
        assert [r["advantage"] for r in g] == pytest.approx(adv.tolist(), abs=1e-7)
        assert [r["advantage"] for r in g] == pytest.approx([r["advantage"] for r in w], abs=TOL)
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
    if extra:
        return
    # resume: fresh workers restored from the step-1 checkpoint take step 2 as the uninterrupted runs did
    resumed = GrpoTrainer(rl_config(*BASE, "grpo.train_workers=2", "grpo.train_num_cpus=0.25"),
                          reward_pool=BrightnessPool(spread=1.0))
    try:
        resumed.restore(middle)
        assert resumed.step == 1
        _, _, records = resumed.iteration()
        resumed_optim = resumed.optimizer_state()
    finally:
        resumed.close()
    assert [r["reward"] for r in records] == pytest.approx([r["reward"] for r in want[1]], abs=TOL)
    resumed_state = state(resumed)
    for k in want_state:
        torch.testing.assert_close(resumed_state[k], want_state[k], atol=TOL, rtol=0, msg=f"resumed {k}")
    for name, entry in want_optim["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(resumed_optim["state"][name][key], value, atol=TOL, rtol=0,
                                       msg=f"resumed {name}/{key}")


def test_a_shard_size_that_does_not_divide_the_training_workers_is_refused(rl_config):
    from lance_model.configio import ConfigError

    assert rl_config("grpo.train_workers=4", "grpo.train_shard_size=2").grpo.train_shard_size == 2
    for bad in (3, 8):
        with pytest.raises(ConfigError, match=r"grpo\.train_shard_size.*divisor of grpo\.train_workers \(4\)"):
            rl_config("grpo.train_workers=4", f"grpo.train_shard_size={bad}")

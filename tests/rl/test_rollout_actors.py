"""Rollout workers as Ray actors (`rollout.num_workers`): two actors sample what the driver samples
for the same seeds (trajectories and log-probs within 1e-5, rewards and weights after 2 steps), a
killed actor is replaced and its micro-batch sampled again with the same seeds, and a rollout
made with a stale weight version is an error, or counted when within `rollout.max_lag`."""
from __future__ import annotations

import pytest
import torch
from grpo_helpers import BASE, BrightnessPool, state

from rl.policy import weights_to_push
from rl.rollout_actors import StaleRolloutError, check_version, deal
from rl.trainer import GrpoTrainer

TOL = 1e-5


def captured(trainer: GrpoTrainer) -> list:
    """Records the trajectories of every `rollout_and_score` call of `trainer`."""
    seen = []
    real = trainer.rollout_and_score

    def wrapped(*args):
        out = real(*args)
        seen.append(out[0])
        return out

    trainer.rollout_and_score = wrapped
    return seen


def test_versions_behind_by_more_than_the_lag_or_ahead_are_errors():
    assert check_version(3, 3, 0, "x") is False
    assert check_version(2, 3, 1, "x") is True
    with pytest.raises(StaleRolloutError, match="version 2, but the current version is 3"):
        check_version(2, 3, 0, "x")
    with pytest.raises(StaleRolloutError, match="version 4"):
        check_version(4, 3, 5, "x")
    five = deal(5, 2)  # contiguous runs, sizes differing by at most one
    assert five == sorted(five) and sorted([five.count(0), five.count(1)]) == [2, 3]
    assert deal(4, 4) == [0, 1, 2, 3] and len(deal(1, 2)) == 1


def test_two_rollout_actors_sample_what_the_driver_samples_even_after_one_is_killed(ray_local, rl_config):
    local = GrpoTrainer(rl_config(*BASE), reward_pool=BrightnessPool())
    want_trajs = captured(local)
    want = [local.iteration()[2] for _ in range(2)]
    want_state = state(local)
    local.close()

    remote = GrpoTrainer(rl_config(*BASE, "rollout.num_workers=2", "rollout.num_cpus=0.5"),
                         reward_pool=BrightnessPool())
    try:
        got_trajs = captured(remote)
        metrics, _, first = remote.iteration()
        assert metrics["rollout/stale"] == 0 and metrics["rollout/actor_restarts"] == 0
        ray_local.kill(remote.rollouts.actors[0], no_restart=True)
        metrics, _, second = remote.iteration()
        assert metrics["rollout/actor_restarts"] == 1
        assert [i["version"] for i in remote.rollouts.info()] == [2, 2]
    finally:
        remote.close()

    assert len(got_trajs) == len(want_trajs) == 2
    for w_step, g_step in zip(want_trajs, got_trajs):
        assert [t.seeds for t in g_step] == [t.seeds for t in w_step] and len(g_step) == 2
        for w, g in zip(w_step, g_step):
            assert g.prompts == w.prompts and g.sde_steps == w.sde_steps
            torch.testing.assert_close(g.latents, w.latents, atol=TOL, rtol=0)
            torch.testing.assert_close(g.log_probs, w.log_probs, atol=TOL, rtol=0)
            assert bool((w.log_probs != 0).all())
    for w, g in zip(want, [first, second]):
        assert [r["reward"] for r in g] == pytest.approx([r["reward"] for r in w], abs=TOL)
    got_state = state(remote)
    for k, v in want_state.items():
        torch.testing.assert_close(got_state[k], v, atol=TOL, rtol=0, msg=k)


def test_a_rollout_made_with_stale_weights_is_detected(ray_local, rl_config):
    trainer = GrpoTrainer(rl_config(*BASE, "rollout.num_workers=2", "rollout.num_cpus=0.5"),
                          reward_pool=BrightnessPool())
    try:
        old = weights_to_push(trainer.policy, lora_enabled=False)
        trainer.iteration()  # pushes version 1 to both actors
        ray_local.get(trainer.rollouts.actors[1].load_weights.remote(old, 0))  # actor 1 "missed" the push
        with pytest.raises(StaleRolloutError, match=r"actor 1\) was made with weights version 0, but the current "
                                                    r"version is 1"):
            trainer.iteration()
        assert trainer.step == 1  # nothing was trained on it
        trainer.rollouts.max_lag = 1  # accepted when one version behind, and counted
        metrics, _, _ = trainer.iteration()
        assert metrics["rollout/stale"] == 1 and trainer.step == 2
        assert [i["version"] for i in trainer.rollouts.info()] == [2, 2]
    finally:
        trainer.close()

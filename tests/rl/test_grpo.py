"""GRPO math on hand-made numbers, and the update on a `tiny` policy (no Ray needed)."""
from __future__ import annotations

import math

import pytest
import torch

from rl.grpo import group_advantages, kl_penalty, policy_loss
from rl.rollout import transition_log_prob
from rl.trainer import GrpoTrainer


def test_group_advantages_match_hand_computed_values():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5,   # mean .5, population std sqrt(.125)
                            0.2, 0.2, 0.2, 0.2,   # all equal: skipped
                            0.0, 0.0, 0.0, 1.0])  # mean .25, std sqrt(3)/4
    adv, keep = group_advantages(rewards, group_size=4)
    s1, s3 = math.sqrt(0.125) + 1e-4, math.sqrt(3) / 4 + 1e-4
    expected = [0.5 / s1, -0.5 / s1, 0, 0, 0, 0, 0, 0, -0.25 / s3, -0.25 / s3, -0.25 / s3, 0.75 / s3]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    # global std: one std over all 12 rewards; large advantages are clipped to +-5
    adv_g, _ = group_advantages(rewards, group_size=4, global_std=True)
    g = rewards.double().std(unbiased=False).item() + 1e-4
    assert adv_g[0].item() == pytest.approx(0.5 / g, rel=1e-6)
    adv_c, _ = group_advantages(torch.tensor([0.0] * 63 + [1.0]), group_size=64)  # 7.9 before the clip
    assert adv_c[-1].item() == 5.0 and adv_c[0].item() == pytest.approx(-1 / 64 / (math.sqrt(63) / 64 + 1e-4))


def test_loss_gradient_moves_log_probs_of_positive_advantage_samples_up():
    logp = torch.tensor([-1.0, -1.0, -2.0], requires_grad=True)
    old = logp.detach().clone()
    adv = torch.tensor([2.0, -1.0, 0.5])
    loss, stats = policy_loss(logp, old, adv, clip_range=1e-4)
    assert stats.ratio_min == stats.ratio_max == 1.0 and stats.clip_frac == 0.0
    loss.backward()
    new = logp.detach() - 0.01 * logp.grad  # one gradient-descent step
    assert new[0] > old[0] and new[2] > old[2] and new[1] < old[1]


def test_kl_penalty_matches_hand_computed_values():
    # Two samples of three latent elements, step s.d. 0.5 (2 std^2 = 0.5):
    # sample 0: squared gaps 1, 4, 9 -> (2 + 8 + 18) / 3 = 28/3; sample 1: 0, .25, .25 -> 1/3.
    mean = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    mean_ref = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 1.0]])
    assert kl_penalty(mean, mean_ref, torch.tensor(0.5)).item() == pytest.approx(29 / 6, rel=1e-6)
    # twice the s.d. -> a quarter of the KL; the same means -> exactly 0
    assert kl_penalty(mean, mean_ref, torch.tensor(1.0)).item() == pytest.approx(29 / 24, rel=1e-6)
    assert kl_penalty(mean, mean.clone(), torch.tensor(0.5)).item() == 0.0
    # no gradient flows into the reference
    policy = mean.clone().requires_grad_(True)
    ref = mean_ref.clone().requires_grad_(True)
    kl_penalty(policy, ref, torch.tensor(0.5)).backward()
    assert ref.grad is None and policy.grad is not None
    # d/dmu of mean_b mean_e (mu - mu_ref)^2 / (2 std^2) = (mu - mu_ref) / (B E std^2)
    torch.testing.assert_close(policy.grad, (mean - mean_ref) / (2 * 3 * 0.25))


@pytest.fixture
def trainer(rl_config):
    class NoRewards:  # the update needs no reward actors
        restarts = 0

        def shutdown(self):
            pass

    cfg = rl_config("rollout.microbatch=4", "rollout.group_size=4", "optim.lr=1e-3", "grpo.beta=0.04")
    return GrpoTrainer(cfg, reward_pool=NoRewards())


def _recompute(trainer, traj):
    with torch.no_grad():
        session = trainer.worker.session(trainer.policy, traj.samples, use_cache=False)
        return torch.stack([transition_log_prob(session, traj.latents[j], traj.latents[j + 1],
                                                float(traj.timesteps[j]), float(traj.timesteps[j + 1]),
                                                trainer.options.noise_level)[0] for j in traj.sde_steps], 1)


def _kl_by_hand(trainer, traj) -> float:
    """Mean over the trained steps and samples of mean_e |mu - mu_ref|^2 / (2 std^2), in float64."""
    per_step = []
    with torch.no_grad():
        policy = trainer.worker.session(trainer.policy, traj.samples, use_cache=False)
        reference = trainer.worker.session(trainer.reference, traj.samples, use_cache=False)
        for j in traj.sde_steps:
            args = (traj.latents[j], traj.latents[j + 1], float(traj.timesteps[j]), float(traj.timesteps[j + 1]),
                    trainer.options.noise_level)
            _, mu, std = transition_log_prob(policy, *args)
            _, mu_ref, _ = transition_log_prob(reference, *args)
            gap = (mu.double() - mu_ref.double()) ** 2 / (2 * torch.as_tensor(std).double() ** 2)
            per_step.append(gap.flatten(1).mean(1).mean().item())
    return sum(per_step) / len(per_step)


def test_ratio_is_exactly_one_on_the_first_inner_step_and_positive_samples_go_up(trainer):
    prompts, seeds, steps = trainer.pick()
    traj = trainer.worker.rollout(prompts[:4], seeds[:4], steps)
    assert torch.equal(_recompute(trainer, traj), traj.log_probs)  # bit-identical to the rollout's
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    stats = trainer.update([traj], adv, torch.ones(4, dtype=torch.bool))
    assert stats.optimizer_steps == 1
    assert stats.first_ratio_max_dev == 0.0 and stats.ratio_min == stats.ratio_max == 1.0
    assert stats.kl == 0.0  # policy == reference before the step
    delta = (_recompute(trainer, traj) - traj.log_probs).mean(1)
    assert (delta[adv > 0] > 0).all() and (delta[adv < 0] < 0).all()

    # The policy has moved away from the frozen reference: the next update's KL is positive and is
    # the value computed by hand from the two models' step means.
    expected = _kl_by_hand(trainer, traj)
    stats = trainer.update([traj], adv, torch.ones(4, dtype=torch.bool))
    assert expected > 0 and stats.kl > 0
    assert stats.kl == pytest.approx(expected, rel=1e-4)

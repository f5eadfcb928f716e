"""The flow sampler, CFG and the SDE step as pure tensor functions (no model)."""
from __future__ import annotations

import math

import pytest
import torch

from lance_model.sampling import (
    cfg_active,
    cfg_velocity,
    euler_step,
    flow_timesteps,
    kl_to_reference,
    sde_log_prob,
    sde_step,
)


def test_flow_timesteps_are_the_shifted_linspace():
    ts = flow_timesteps(30, 3.5)
    assert ts.shape == (31,) and ts[0] == 1.0 and ts[-1] == 0.0
    assert torch.all(ts[1:] < ts[:-1])
    t = torch.linspace(1, 0, 31, dtype=torch.float64)
    torch.testing.assert_close(ts, (3.5 * t / (1 + 2.5 * t)).float())
    torch.testing.assert_close(flow_timesteps(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="num_steps=0"):
        flow_timesteps(0, 3.0)


def test_euler_step_moves_against_the_velocity():
    x, v = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    torch.testing.assert_close(euler_step(x, v, 0.8, 0.6), x - 0.2 * v)
    per_sample = euler_step(x, v, torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(per_sample[1], x[1] - 0.1 * v[1])


@pytest.mark.parametrize("renorm", ["none", "global", "channel"])
def test_cfg_scale_one_is_the_conditional_branch(renorm):
    g = torch.Generator().manual_seed(0)
    vc, vu, va = (torch.randn(2, 6, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(cfg_velocity(vc, vu, text_scale=1.0, renorm=renorm), vc)
    torch.testing.assert_close(cfg_velocity(vc, vu, va, text_scale=1.0, image_scale=1.0, renorm=renorm), vc)


def test_cfg_formulas():
    g = torch.Generator().manual_seed(1)
    vc, vu, va = (torch.randn(6, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(cfg_velocity(vc, vu, text_scale=4.0), vu + 4.0 * (vc - vu))
    torch.testing.assert_close(cfg_velocity(vc, vu, va, text_scale=4.0, image_scale=1.5),
                               va + 4.0 * (vc - vu) + 1.5 * (vu - va))
    # image guidance at scale 1 reduces to text-only CFG
    torch.testing.assert_close(cfg_velocity(vc, vu, va, text_scale=3.0, image_scale=1.0),
                               cfg_velocity(vc, vu, text_scale=3.0))


def test_renorm_caps_the_norm_at_the_conditional_one():
    g = torch.Generator().manual_seed(2)
    vc, vu = torch.randn(3, 8, 4, generator=g), torch.randn(3, 8, 4, generator=g)
    raw = cfg_velocity(vc, vu, text_scale=6.0)
    glob = cfg_velocity(vc, vu, text_scale=6.0, renorm="global")
    for b in range(3):  # per sample: scale = min(|v_c| / |v|, 1) over the whole latent
        scale = min(float(vc[b].norm() / (raw[b].norm() + 1e-8)), 1.0)
        torch.testing.assert_close(glob[b], raw[b] * scale)
    chan = cfg_velocity(vc, vu, text_scale=6.0, renorm="channel")
    assert torch.all(chan.norm(dim=-1) <= vc.norm(dim=-1) + 1e-5)
    floor = cfg_velocity(vc, vu, text_scale=6.0, renorm="global", renorm_min=1.0)
    torch.testing.assert_close(floor, raw)  # min clamp 1 -> never rescaled
    with pytest.raises(ValueError, match="renorm='l2'"):
        cfg_velocity(vc, vu, renorm="l2")


def test_cfg_interval_is_open_below_and_closed_above():
    assert not cfg_active(0.4, (0.4, 1.0))
    assert cfg_active(math.nextafter(0.4, 1.0), (0.4, 1.0))
    assert cfg_active(1.0, (0.4, 1.0))
    assert not cfg_active(math.nextafter(0.7, 1.0), (0.2, 0.7))
    assert cfg_active(0.7, (0.2, 0.7))
    assert cfg_active(0.0, None)


def _float64_step(x, v, sigma, sigma_next, a):
    x, v = x.double(), v.double()
    dt = sigma_next - sigma
    std_t = a * math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma)))
    mean = x * (1 + std_t ** 2 * dt / (2 * sigma)) + v * (1 + std_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_t * math.sqrt(-dt)


def _float64_log_density(x_next, mean, std):
    z = (x_next.double() - mean) / std
    return (-0.5 * z ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2))


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.7, 0.55), (0.2, 0.0)])
def test_sde_log_prob_matches_an_independent_float64_gaussian(sigma, sigma_next):
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(3, 10, 4, generator=g), torch.randn(3, 10, 4, generator=g)
    x_next, logp, mean, std = sde_step(x, v, sigma, sigma_next, noise_level=0.7, generator=g)
    mean64, std64 = _float64_step(x, v, sigma, sigma_next, 0.7)
    assert math.isfinite(std64) and std64 > 0
    assert logp.shape == (3,) and logp.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mean64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(float(std), std64, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logp.double(), _float64_log_density(x_next, mean64, std64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sde_log_prob(x_next, mean, std), logp)


def test_sde_step_with_given_noise_and_per_sample_sigmas():
    g = torch.Generator().manual_seed(4)
    x, v, eps = (torch.randn(2, 6, 3, generator=g) for _ in range(3))
    x_next, _, mean, std = sde_step(x, v, torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.3]), 0.5, noise=eps)
    torch.testing.assert_close(x_next, mean + std * eps)
    single, _, _, _ = sde_step(x[1:], v[1:], 0.5, 0.3, 0.5, noise=eps[1:])
    torch.testing.assert_close(x_next[1:], single)


def test_noise_level_zero_is_the_euler_step():
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(2, 7, 3, generator=g), torch.randn(2, 7, 3, generator=g)
    for sigma, nxt in ((1.0, 0.8), (0.5, 0.25)):
        x_next, logp, _, _ = sde_step(x, v, sigma, nxt, noise_level=0.0)
        torch.testing.assert_close(x_next, euler_step(x, v, sigma, nxt))
        assert torch.all(logp == 0)


def test_kl_to_reference():
    g = torch.Generator().manual_seed(6)
    mu, mu_ref = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    kl = kl_to_reference(mu, mu_ref, torch.tensor(0.3))
    expected = ((mu.double() - mu_ref.double()) ** 2 / (2 * 0.3 ** 2)).mean(dim=(1, 2))
    torch.testing.assert_close(kl.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.all(kl_to_reference(mu, mu, torch.tensor(0.3)) == 0)

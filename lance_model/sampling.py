"""Flow-matching samplers as small pure functions over tensors (MODEL.md §7, RL.md §1).

Conventions (the released model's): time runs from t = 1 (pure noise) to t = 0 (data),
x_t = (1 - t) * x0 + t * noise, and the model predicts the velocity v = noise - x0, so an Euler
step is x <- x - v * (t - t_next). Latents are [..., N, C] with any leading per-sample dims
(usually [B, N, C]); "per sample" reductions run over the last two dims.

- `flow_timesteps`: linspace(1, 0, N + 1) shifted by s*t / (1 + (s-1)*t).
- `cfg_velocity`: text CFG, plus image guidance for edits (the InstructPix2Pix form the official
  code meant: v_uncond_all + s_text (v_cond - v_text_uncond) + s_img (v_text_uncond - v_uncond_all)),
  and the optional renormalisation that caps the guided norm at the conditional one.
- `sde_step`: the Flow-GRPO SDE with the same marginals as the ODE, returning the per-sample
  log-probability (averaged over latent elements) that RL optimises; `sde_log_prob` and
  `kl_to_reference` recompute the density/KL of a stored transition under new means.
All SDE math runs in float32. These functions are the single implementation; `rl/` reuses them.
"""
from __future__ import annotations

import math

import torch

from .model import shift_timesteps

RENORM_TYPES = ("none", "global", "channel")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def flow_timesteps(num_steps: int, shift: float = 3.5) -> torch.Tensor:
    """[num_steps + 1] float32, from 1 down to 0, shifted: s*t / (1 + (s-1)*t)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: expected a positive integer")
    if shift <= 0:
        raise ValueError(f"shift={shift}: expected a positive number")
    return shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def euler_step(x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor) -> torch.Tensor:
    """ODE update from t to t_next (< t): x - v * (t - t_next)."""
    return x + v * (_per_sample(t_next, x) - _per_sample(t, x))


def cfg_active(t: float | torch.Tensor, interval: tuple[float, float] | None) -> bool:
    """Guidance applies when lo < t <= hi (official `cfg_interval`); `None` = always."""
    if interval is None:
        return True
    lo, hi = interval
    return bool(lo < float(t) <= hi)


def cfg_velocity(v_cond: torch.Tensor, v_text_uncond: torch.Tensor, v_uncond_all: torch.Tensor | None = None, *,
                 text_scale: float = 4.0, image_scale: float = 1.0, renorm: str = "none",
                 renorm_min: float = 0.0) -> torch.Tensor:
    """Guided velocity.

    Text only: v = v_tu + s_t * (v_c - v_tu). With `v_uncond_all` (no caption, no visual condition):
    v = v_ua + s_t * (v_c - v_tu) + s_i * (v_tu - v_ua). Renorm scales v by
    clamp(|v_c| / (|v| + 1e-8), renorm_min, 1): "global" over each sample's whole latent
    (last two dims), "channel" per token (last dim)."""
    if renorm not in RENORM_TYPES:
        raise ValueError(f"renorm={renorm!r}: expected one of {RENORM_TYPES}")
    if v_uncond_all is None:
        v = v_text_uncond + text_scale * (v_cond - v_text_uncond)
    else:
        v = v_uncond_all + text_scale * (v_cond - v_text_uncond) + image_scale * (v_text_uncond - v_uncond_all)
    if renorm == "none":
        return v
    dims = (-2, -1) if renorm == "global" else (-1,)
    v_norm = torch.linalg.vector_norm(v.float(), dim=dims, keepdim=True)
    c_norm = torch.linalg.vector_norm(v_cond.float(), dim=dims, keepdim=True)
    scale = (c_norm / (v_norm + 1e-8)).clamp(min=renorm_min, max=1.0)
    return (v * scale).to(v.dtype)


# ------------------------------------------------------------------------------------------ SDE
def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A Python number stays one (no host-to-device copy on the sampling loop's hot path); a 0-d or
    [B] tensor becomes float32 broadcastable against `like` [B, ...]."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    value = value.to(dtype=torch.float32, device=like.device)
    if value.dim() == 0:
        return value
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def _sqrt(x: float | torch.Tensor) -> float | torch.Tensor:
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else math.sqrt(x)


def _log(x: float | torch.Tensor) -> float | torch.Tensor:
    return torch.log(x) if isinstance(x, torch.Tensor) else math.log(x)


def _mean_over_sample(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x


def _as_std(std: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return std.to(dtype=torch.float32, device=like.device) if isinstance(std, torch.Tensor) else float(std)


def sde_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """Gaussian log-density of x_next around `mean` with s.d. `std`, averaged over each sample's
    latent elements -> [B] (float32). `std` broadcasts against the latents."""
    x_next, mean = x_next.float(), mean.float()
    std = _as_std(std, mean)
    logp = -((x_next - mean) ** 2) / (2 * std ** 2) - _log(std) - _HALF_LOG_2PI
    return _mean_over_sample(logp)


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor,
             noise_level: float = 0.7, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | torch.Tensor]:
    """One SDE step (RL.md §1) from sigma to sigma_next < sigma. Returns (x_next, log_prob [B],
    mean, std) in float32, where std = std_t * sqrt(-dt) is the transition's s.d. (broadcastable; a
    Python float when the sigmas are numbers).

    std_t = a * sqrt(sigma / (1 - sigma)), with sigma_next in the denominator at sigma = 1;
    mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt;
    x_next = mean + std * noise. With noise_level 0 this is the Euler step and the log-probability
    (a point mass) is reported as 0."""
    x, v = x.float(), v.float()
    s, s_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = s_next - s
    if isinstance(s, torch.Tensor) or isinstance(s_next, torch.Tensor):
        denom = torch.where(torch.as_tensor(s) >= 1.0, 1.0 - torch.as_tensor(s_next), 1.0 - torch.as_tensor(s))
    else:
        denom = 1.0 - s_next if s >= 1.0 else 1.0 - s
    std_t = noise_level * _sqrt(s / denom)
    mean = x * (1 + std_t ** 2 * dt / (2 * s)) + v * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt
    std = std_t * _sqrt(-dt)
    if noise_level == 0:
        return mean, torch.zeros(x.shape[0], device=x.device), mean, std
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else x.device).to(x.device)
    x_next = mean + std * noise.float()
    return x_next, sde_log_prob(x_next, mean, std), mean, std


def kl_to_reference(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between the policy's and the reference's step Gaussians (same s.d.), per sample:
    |mu - mu_ref|^2 / (2 std^2), averaged over the latent elements -> [B] (float32)."""
    std = _as_std(std, mean)
    return _mean_over_sample((mean.float() - mean_ref.float()) ** 2 / (2 * std ** 2))

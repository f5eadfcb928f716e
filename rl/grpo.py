"""GRPO math (RL.md §2) as pure functions over tensors: advantages, the clipped-ratio loss, the KL
penalty and the windowed ("fast") step choice. No model, no Ray: everything here is unit-tested on
hand-made numbers. The per-step Gaussian densities and the KL come from `lance_model.sampling`.

- `group_advantages`: (r - group mean) / (std + 1e-4), std per group or over the whole batch
  (`global_std`), clipped to +-5; groups whose rewards are all equal carry no signal and are
  marked not to train (`keep` False, advantage 0).
- `policy_loss`: mean of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(logp - logp_old).
  The ratio is computed exactly as exp(0) = 1 when the log-probs agree bit for bit, which the
  trainer guarantees on the first inner step of an on-policy update.
- `kl_penalty`: the mean of `kl_to_reference` over the trained samples.
- `window_steps`: the steps that get noise (and are trained) in the windowed variant.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lance_model.sampling import kl_to_reference

ADV_EPS = 1e-4
CLIP_RANGE = 1e-4
FAST_CLIP_RANGE = 1e-5


def group_advantages(rewards: torch.Tensor, group_size: int, global_std: bool = False,
                     clip: float = 5.0, eps: float = ADV_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [N] in group order (N = groups x group_size) -> (advantages [N] float32, keep [N] bool)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    if global_std:
        std = rewards.std(unbiased=False).expand_as(mean)
    else:
        std = groups.std(dim=1, unbiased=False, keepdim=True)
    keep = (groups.max(dim=1).values != groups.min(dim=1).values)[:, None].expand_as(groups)
    adv = ((groups - mean) / (std + eps)).clamp(-clip, clip)
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    return adv.flatten().float(), keep.flatten()


@dataclass
class LossStats:
    ratio_mean: float
    ratio_min: float
    ratio_max: float
    clip_frac: float  # share of samples whose ratio left [1 - eps, 1 + eps]


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, LossStats]:
    """Clipped-ratio GRPO loss over samples [n] (one trained step); gradients flow through `log_prob`."""
    ratio = torch.exp(log_prob - old_log_prob.detach())
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    r = ratio.detach()
    stats = LossStats(float(r.mean()), float(r.min()), float(r.max()),
                      float(((r - 1.0).abs() > clip_range).float().mean()))
    return loss, stats


def kl_penalty(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the per-sample step KL to the reference (same s.d.)."""
    return kl_to_reference(mean, mean_ref.detach(), std).mean()


def default_clip_range(windowed: bool) -> float:
    return FAST_CLIP_RANGE if windowed else CLIP_RANGE


def window_steps(num_steps: int, window: tuple[int, int], rng: random.Random) -> list[int]:
    """A random run of `window[0]..window[1]` consecutive steps in [0, num_steps)."""
    lo, hi = window
    if not 1 <= lo <= hi:
        raise ValueError(f"window={window}: expected 1 <= min <= max")
    length = min(rng.randint(lo, hi), num_steps)
    start = rng.randint(0, num_steps - length)
    return list(range(start, start + length))

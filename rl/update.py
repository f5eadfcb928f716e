"""The GRPO policy update over one rollout, for one process or for one rank of a sharded group.

`run_update` is the only implementation of the update; the in-process trainer calls it with the
whole batch (`shard=(0, 1)`), each training worker of a sharded group (`rl.train_workers`) with its
rank. The optimizer steps follow the rollout's micro-batches; the order of micro-batches and of
SDE steps inside each is drawn from `random.Random(seed * 7919 + step)`, the same on every rank.

Split by sample: rank r of W takes a contiguous share of every micro-batch's samples (with their
latents, old log-probs and advantages). Each rank sums its kept samples' losses and divides by the
micro-batch's *global* kept count; FSDP2 averages gradients over the W ranks, so the local loss is
scaled by W and the summed gradient is exactly the single-process mean's. Every rank runs the same
forwards and backwards even when its share is empty or has nothing kept (it then computes on one
sample with weight 0), because FSDP2's gathers and reduce-scatters are collective. The logged
statistics are reduced over the ranks (sums, min, max), so they describe the whole batch.

With a sharded model the velocity runs inside the root module's forward (`root_forward`), so the
root's parameters (embeddings, heads) are gathered and their gradients reduced like the layers'.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from lance_model.sampling import kl_to_reference
from lance_platform import lora, parallel

from .config import RLConfig
from .rollout import Trajectories, transition_log_prob


@dataclass
class UpdateStats:
    loss: float = 0.0
    policy_loss: float = 0.0
    kl: float = 0.0
    clip_frac: float = 0.0
    ratio_mean: float = 1.0
    ratio_min: float = 1.0
    ratio_max: float = 1.0
    first_ratio_max_dev: float = 0.0  # max |ratio - 1| on the first optimizer step (exactly 0 on-policy)
    grad_norm: float = 0.0
    optimizer_steps: int = 0  # AdamW steps taken (a micro-batch whose groups are all skipped takes none)
    trained_samples: int = 0  # samples whose log-probs entered a loss, summed over optimizer steps
    trained_transitions: int = 0  # (sample, SDE step) log-probs that entered a loss
    terms: list[dict] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if k != "terms"}


def share(n: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s contiguous share of n samples (near-equal; may be empty when n < world)."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return list(range(int(bounds[rank]), int(bounds[rank + 1])))


def _reduce(values: list[float], op: dist.ReduceOp, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if parallel.world()[1] > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


@dataclass
class UpdateContext:
    """What the update needs besides the rollout: the model(s), the optimizer and how to score."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None  # None: no KL; the policy itself: LoRA (adapters disabled)
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    session: Callable  # (model, samples) -> DenoisingSession (uncached)
    device: torch.device
    lora: bool = False
    sharded: bool = False  # FSDP2-wrapped: run velocities inside the root forward
    log_prob: Callable = transition_log_prob


def run_update(ctx: UpdateContext, cfg: RLConfig, step: int, trajs: list[Trajectories], advantages: torch.Tensor,
               keep: torch.Tensor, shard: tuple[int, int] = (0, 1)) -> UpdateStats:
    """Inner epochs of clipped-ratio updates over the rollout's micro-batches (this rank's share)."""
    rank, world = shard
    g = cfg.grpo
    clip_range = g.resolved_clip_range(cfg.rollout.windowed)
    noise = cfg.rollout.noise_level
    offsets = np.cumsum([0] + [len(t.prompts) for t in trajs])
    rng = random.Random(cfg.seed * 7919 + step)
    stats = UpdateStats()
    policy, reference = ctx.policy, ctx.reference
    ref_mode = (lambda: lora.adapters_disabled(policy)) if ctx.lora else contextlib.nullcontext
    forward = (lambda model, fn: parallel.root_forward(model, fn)) if ctx.sharded else (lambda model, fn: fn())
    dropout = lora.lora_dropout_active(policy) if ctx.lora and cfg.lora.dropout > 0 else contextlib.nullcontext()
    dev = ctx.device
    with dropout:
        for _ in range(g.inner_epochs):
            for m in rng.sample(range(len(trajs)), len(trajs)):
                traj = trajs[m]
                sl = slice(int(offsets[m]), int(offsets[m + 1]))
                kept_all = keep[sl]
                n_kept = int(kept_all.sum())
                if n_kept == 0:
                    continue
                local = share(len(traj.prompts), rank, world)
                weight = 1.0
                if not local:  # nothing here: compute on one sample with weight 0 (collectives must match)
                    local, weight = [0], 0.0
                idx = torch.tensor(local)
                adv = advantages[sl][idx].to(dev)
                kept = kept_all[idx].to(dev) & (weight > 0)
                mask = kept.float()
                samples = [traj.samples[i] for i in local]
                session = ctx.session(policy, samples)
                ref_session = None if reference is None else session if reference is policy \
                    else ctx.session(reference, samples)
                ctx.optimizer.zero_grad(set_to_none=True)
                steps = rng.sample(traj.sde_steps, len(traj.sde_steps))
                for j in steps:
                    t, t_next = float(traj.timesteps[j]), float(traj.timesteps[j + 1])
                    x, x_next = traj.latents[j][idx].to(dev), traj.latents[j + 1][idx].to(dev)
                    mean_ref = None
                    if ref_session is not None:  # first: LoRA's reference toggles the adapters
                        ref_model = policy if reference is policy else reference
                        with torch.no_grad(), ref_mode():
                            _, mean_ref, _ = forward(ref_model, partial(ctx.log_prob, ref_session, x, x_next, t,
                                                                        t_next, noise))
                    logp, mean, std = forward(policy, partial(ctx.log_prob, session, x, x_next, t, t_next, noise))
                    old = traj.log_probs[:, j][idx].to(dev)
                    ratio = torch.exp(logp - old.detach())
                    a = adv.detach().to(ratio.dtype)
                    terms = torch.maximum(-a * ratio, -a * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
                    pg_sum = (terms * mask).sum()
                    kl_sum = torch.zeros((), device=dev)
                    if mean_ref is not None:
                        kl_sum = (kl_to_reference(mean, mean_ref.detach(), std) * mask).sum()
                    loss = (pg_sum + g.beta * kl_sum) / n_kept
                    (loss * (world / len(steps))).backward()
                    r = ratio.detach()[kept]
                    sums = _reduce([float(pg_sum.detach()), float(kl_sum.detach()), float(r.sum()),
                                    float(((r - 1.0).abs() > clip_range).sum())], dist.ReduceOp.SUM, dev)
                    lo = _reduce([float(r.min()) if r.numel() else float("inf")], dist.ReduceOp.MIN, dev)[0]
                    hi = _reduce([float(r.max()) if r.numel() else float("-inf")], dist.ReduceOp.MAX, dev)[0]
                    pg_v, kl_v = sums[0] / n_kept, sums[1] / n_kept
                    if stats.optimizer_steps == 0:
                        stats.first_ratio_max_dev = max(stats.first_ratio_max_dev, abs(lo - 1), abs(hi - 1))
                    stats.terms.append({"loss": pg_v + g.beta * kl_v, "policy_loss": pg_v, "kl": kl_v,
                                        "clip_frac": sums[3] / n_kept, "ratio_mean": sums[2] / n_kept,
                                        "ratio_min": lo, "ratio_max": hi})
                norm = torch.nn.utils.clip_grad_norm_(ctx.params, cfg.optim.grad_clip)
                stats.grad_norm = float(parallel.full_tensor(norm))
                ctx.optimizer.step()
                stats.optimizer_steps += 1
                stats.trained_samples += n_kept
                stats.trained_transitions += n_kept * len(steps)
    if stats.terms:
        for key in ("loss", "policy_loss", "kl", "clip_frac", "ratio_mean"):
            setattr(stats, key, float(np.mean([t[key] for t in stats.terms])))
        stats.ratio_min = min(t["ratio_min"] for t in stats.terms)
        stats.ratio_max = max(t["ratio_max"] for t in stats.terms)
    return stats

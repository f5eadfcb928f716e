"""Rollouts for GRPO: groups of t2i samples from the SDE sampler, with everything the update needs.

A rollout micro-batch keeps the latent before every step and after the last one, the per-step
log-probabilities and the timesteps (`Trajectories`). The sampler loop is `lance_model`'s
(`run_sampler`, the one `generate` and validation use); this module only decides which steps get
noise (all steps, or a random window for the "fast" variant, where the other steps follow the ODE
and are not trained).

`transition_log_prob` is the single function that scores a stored transition under a model, used
by the rollout itself and by the update. With the uncached velocity path (`kv_cache: false`) and
the same micro-batch, the update's first recomputation repeats the rollout's arithmetic exactly,
so the importance ratio of a fresh on-policy update is exactly 1.

`RolloutWorker` owns a policy (shared with the trainer in-process, or its own copy inside a
`rl.rollout_actors.RolloutActor`), samples, decodes to RGB uint8, and runs the deterministic ODE
sampler for held-out evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lance_model.generation import (
    DenoisingSession,
    LanceGenerator,
    Request,
    SamplerOptions,
    run_sampler,
    sample_latents,
)
from lance_model.model import Lance
from lance_model.sampling import sde_log_prob, sde_step
from lance_model.sequence import Sample


@dataclass
class Trajectories:
    """One rollout micro-batch of P samples over S steps."""

    samples: list[Sample]
    prompts: list[str]
    seeds: list[int]
    latents: torch.Tensor  # [S + 1, P, N, C] float32: x before each step, then the final x
    log_probs: torch.Tensor  # [P, S] float32 (0 at ODE steps)
    timesteps: torch.Tensor  # [S + 1]
    sde_steps: list[int]  # steps that got noise: the ones the update trains
    latent_shape: tuple[int, int, int]  # (T, h, w)

    def final_latents(self) -> torch.Tensor:
        """[P, C, T, h, w], the layout the VAE decodes."""
        x = self.latents[-1]
        return x.view(x.shape[0], *self.latent_shape, x.shape[-1]).permute(0, 4, 1, 2, 3).contiguous()


def transition_log_prob(session: DenoisingSession, x: torch.Tensor, x_next: torch.Tensor, t: float, t_next: float,
                        noise_level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(x_next | x) under the session's model -> (log_prob [P], mean, std); differentiable."""
    v = session.velocity(x, t)
    _, _, mean, std = sde_step(x, v, t, t_next, noise_level, noise=torch.zeros_like(x))
    return sde_log_prob(x_next, mean, std), mean, std


class RolloutWorker:
    """Samples GRPO groups with its policy; `load_weights` receives the trainer's new weights."""

    def __init__(self, model: Lance, options: SamplerOptions, height: int, width: int,
                 use_cache: bool = False) -> None:
        self.generator = LanceGenerator(model)
        self.options, self.height, self.width, self.use_cache = options.validate(), height, width, use_cache
        self.weights_version = 0

    @property
    def model(self) -> Lance:
        return self.generator.model

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.model.load_state_dict(state, strict=False)
        self.weights_version = version

    def samples(self, prompts: list[str]) -> list[Sample]:
        return [self.generator.prepare(Request("t2i", p, self.height, self.width)) for p in prompts]

    def session(self, model: Lance, samples: list[Sample], use_cache: bool | None = None) -> DenoisingSession:
        return DenoisingSession(model, self.generator.builder, samples, self.options,
                                self.use_cache if use_cache is None else use_cache)

    def rollout(self, prompts: list[str], seeds: list[int], sde_steps: list[int]) -> Trajectories:
        samples = self.samples(prompts)
        with torch.no_grad():
            session = self.session(self.model, samples)
            result = run_sampler(session, seeds, noise_steps=sde_steps, return_trajectory=True)
        log_probs = result.log_probs if result.log_probs is not None else \
            torch.zeros(len(seeds), self.options.num_steps)
        return Trajectories(samples, list(prompts), list(seeds), torch.stack(result.trajectory).cpu(),
                            log_probs.cpu(), result.timesteps, result.noise_steps, session.latent_shape)

    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """[P, C, T, h, w] -> RGB uint8 [H, W, 3] per sample (first frame)."""
        return [f[0].numpy() for f in self.generator.decode(latents)]

    @torch.no_grad()
    def evaluate(self, prompts: list[str], seeds: list[int], steps: int, cfg_scale: float) -> list[np.ndarray]:
        """Deterministic ODE samples (KV cache on: no gradients needed here)."""
        o = self.options
        ode = SamplerOptions(steps, o.shift, cfg_scale, o.image_scale, o.interval, o.renorm, o.renorm_min, None)
        result = sample_latents(self.model, self.generator.builder, self.samples(prompts), seeds, ode, use_cache=True)
        return self.decode(result.latents)

"""Building a GRPO policy the same way everywhere it is needed: the driver, every rollout actor and
every training worker build it from the same config and seed, so a random `tiny` start or a
checkpoint start is identical in all of them before any weights are pushed."""
from __future__ import annotations

import copy

import torch

from lance_model.generation import SamplerOptions
from lance_model.model import Lance
from lance_platform import checkpoint as ckpt
from lance_platform import lora

from .config import PolicyConfig, RLConfig


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def build_policy(cfg: PolicyConfig, seed: int, device: torch.device) -> Lance:
    """The starting policy: a checkpoint directory, or a random init of the preset (demos/tests),
    reproducible from `seed` so that a resumed run rebuilds the same frozen reference."""
    if cfg.checkpoint:
        ckpt.verify_if_managed(cfg.checkpoint)
        return Lance.from_pretrained(cfg.checkpoint, weights=cfg.weights, device=device)
    from lance_model.config import LanceConfig

    config = LanceConfig.from_preset(cfg.preset)
    model = Lance(config)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model.to(device)


def build_run_policy(cfg: RLConfig, device: torch.device, with_reference: bool = True) -> tuple[Lance, Lance | None]:
    """(policy in eval mode, frozen reference or None) of a run: LoRA adapters added when enabled
    (the reference is then the policy itself with adapters disabled, so None here), else a frozen
    copy when `grpo.beta > 0` (and `with_reference`: a rollout copy needs none). Adapter initialisation draws from torch's global generator, which
    is seeded with `cfg.seed` first, as the driver does."""
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg.policy, cfg.seed, device).eval()
    if cfg.lora.enabled:
        lora.add_adapters(policy, cfg.lora)
        return policy, None
    keep = with_reference and cfg.grpo.beta > 0
    reference = copy.deepcopy(policy).requires_grad_(False) if keep else None
    return policy, reference


def sampler_options(cfg: RLConfig) -> SamplerOptions:
    r = cfg.rollout
    return SamplerOptions(num_steps=r.steps, shift=r.shift, text_scale=r.cfg_scale, noise_level=r.noise_level).validate()


def weights_to_push(policy: Lance, lora_enabled: bool) -> dict[str, torch.Tensor]:
    """What a rollout copy needs after an update, as CPU tensors: the adapter tensors alone with
    LoRA (the base never changes), else the full state dict."""
    state = lora.adapter_state(policy) if lora_enabled else policy.state_dict()
    return {k: v.detach().cpu() for k, v in state.items()}


def load_pushed(policy: Lance, state: dict[str, torch.Tensor], lora_enabled: bool, source: str) -> None:
    """Load `weights_to_push` output strictly into a copy of the policy."""
    if lora_enabled:
        lora.load_adapter_state(policy, state, source)
    else:
        ckpt.load_model_state(policy, state, source)


def move_training_state(modules: list[torch.nn.Module | None], optimizer: torch.optim.Optimizer | None,
                        device: torch.device) -> None:
    """Move models and the optimizer's state tensors to `device` (offload to host memory and back,
    for the colocated layout on CUDA). Parameters keep their identity, so the optimizer stays valid."""
    for module in modules:
        if module is not None:
            module.to(device)
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":
                    state[key] = value.to(device)
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()

"""LoRA adapters on a Lance backbone, through `peft` (shared by GRPO and, later, the SFT stage).

`peft.inject_adapter_in_model` replaces each targeted `nn.Linear` in place by a `peft` LoRA layer
(`base_layer` + `lora_A`/`lora_B`); the rest of the model is untouched and keeps working, because
the backbone only ever *calls* its projections. `lora_B` starts at zero, so a freshly wrapped model
computes bit for bit what the base computes. Only the adapter parameters stay trainable.

- targets: module-name suffixes (peft's rule: a module matches when its dotted name equals a
  target or ends with `.` + target). The default is the generation expert's attention and MLP
  projections (`*_moe_gen` in `lance_model.backbone`). Every target must match at least one
  `nn.Linear`, or `LoraError` names it before anything is wrapped.
- `adapters_disabled(model)`: the base model, for the GRPO reference policy, without a second
  copy of the weights.
- `adapter_state` / `load_adapter_state`: the adapter tensors alone, keyed
  `<module>.lora_A.weight` / `<module>.lora_B.weight` (peft's saved-adapter names), loaded
  strictly (a missing, unexpected or wrongly shaped tensor is a `CheckpointError` naming it).
- `merged_state(model)`: the full state dict in the official key layout with every adapter folded
  into its base weight (W + scale * B @ A); the model itself is not changed.
- `lora_dropout_active(model)`: LoRA dropout is a training-time op; callers that keep the model in
  `eval()` turn it on around their update only.

`peft` (and with it `transformers`) is imported only when adapters are added, and torch only when
a function runs, so loading a config with a `lora` section stays light.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import field
from typing import TYPE_CHECKING

from lance_model.configio import PositiveFloat, PositiveInt, Probability, check_types, configclass, require

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name; stripped from saved keys
BASE_LAYER = ".base_layer"
DEFAULT_TARGETS: tuple[str, ...] = (
    "self_attn.q_proj_moe_gen", "self_attn.k_proj_moe_gen", "self_attn.v_proj_moe_gen", "self_attn.o_proj_moe_gen",
    "mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj", "mlp_moe_gen.down_proj",
)


class LoraError(ValueError):
    """Adapters cannot be added as configured (a target matching no Linear layer, adapters twice)."""


@configclass
class LoraConfig:
    """`lora: {enabled, rank, alpha, dropout, targets}`; scale = alpha / rank (Flow-GRPO: 32 / 64)."""

    enabled: bool = False
    rank: PositiveInt = 32
    alpha: PositiveFloat = 64.0
    dropout: Probability = 0.0  # > 0: the first inner step's ratio is no longer exactly 1
    targets: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)

    def validate(self, prefix: str = "lora") -> LoraConfig:
        check_types(self, prefix + ".")
        require(len(self.targets) > 0 and all(t.strip() for t in self.targets), f"{prefix}.targets",
                self.targets, "a non-empty list of module-name suffixes")
        return self

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def target_modules(model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the `nn.Linear` modules the targets select; `LoraError` naming any target that
    selects none (or selects a module that is not a Linear)."""
    from torch import nn

    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    names = [n for n, _ in model.named_modules()]
    chosen: list[str] = []
    for target in targets:
        hits = [n for n in names if _matches(n, target)]
        if not hits:
            raise LoraError(f"lora.targets: {target!r} matches no module of the model "
                            f"(e.g. {sorted(linears)[:3]})")
        bad = [n for n in hits if n not in linears]
        if bad:
            raise LoraError(f"lora.targets: {target!r} matches {bad[0]!r}, which is not an nn.Linear")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> peft LoRA layer, for every wrapped module (empty for a plain model)."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def has_adapters(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def add_adapters(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the targeted Linear layers of `model` in place; freeze everything but the adapters.
    Returns the wrapped module names."""
    import peft

    cfg.validate()
    if has_adapters(model):
        raise LoraError("the model already has LoRA adapters")
    names = target_modules(model, cfg.targets)
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                             target_modules=names, init_lora_weights=True)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g dropout=%g on %d modules: %d trainable parameters of %d", cfg.rank, cfg.alpha,
             cfg.dropout, len(names), trained, sum(p.numel() for p in model.parameters()))
    return names


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `model` computes its base (adapters bypassed); re-enabled on exit."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise LoraError("the model has no LoRA adapters to disable")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def lora_dropout_active(model: nn.Module) -> Iterator[None]:
    """Put the adapters' dropout modules in training mode for the block (the rest keeps its mode)."""
    modules = [d for layer in lora_layers(model).values() for d in layer.lora_dropout.values()]
    modes = [d.training for d in modules]
    for d in modules:
        d.train(True)
    try:
        yield
    finally:
        for d, mode in zip(modules, modes):
            d.train(mode)


def _saved_key(name: str) -> str:
    return name.replace(f".{ADAPTER}.", ".")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone (detached, on their device), keyed `<module>.lora_{A,B}.weight`."""
    state = {_saved_key(n): p.detach() for n, p in model.named_parameters() if ".lora_" in n}
    if not state:
        raise LoraError("the model has no LoRA adapters")
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved adapter tensors into the model's adapters; strict on keys and shapes."""
    import torch

    from lance_model.checkpoint import CheckpointError

    params = {_saved_key(n): p for n, p in model.named_parameters() if ".lora_" in n}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    wrong = [f"{k} (saved {tuple(state[k].shape)}, model {tuple(params[k].shape)})"
             for k in sorted(set(params) & set(state)) if state[k].shape != params[k].shape]
    problems = ([f"{len(missing)} missing adapter tensor(s): {', '.join(missing[:5])}"] if missing else []) + \
               ([f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:5])}"] if unexpected else []) + \
               ([f"{len(wrong)} shape mismatch(es): {', '.join(wrong[:5])}"] if wrong else [])
    if problems:
        raise CheckpointError(f"{source} does not fit the model's adapters: " + "; ".join(problems))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(device=p.device, dtype=p.dtype))


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict in the base model's key layout, each adapter folded into its weight."""
    import torch

    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        deltas = {f"{name}.weight": layer.get_delta_weight(ADAPTER) for name, layer in lora_layers(model).items()}
        for key, value in model.state_dict().items():
            if ".lora_" in key:
                continue
            plain = key.replace(BASE_LAYER, "")
            value = value.detach()
            if plain in deltas:
                value = (value.float() + deltas[plain].float()).to(value.dtype)
            out[plain] = value
    return out

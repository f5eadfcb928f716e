"""How a Lance model is distributed: FSDP2 per decoder layer, mixed precision, activation checkpointing.

The model definition (`lance_model`) knows nothing of this; `apply_fsdp` wraps an existing model,
the torchtitan way. On CPU the same code runs with gloo and full precision.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from lance_model import Lance


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    if distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def apply_activation_checkpointing(model: Lance) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.language_model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def apply_fsdp(model: Lance, device: torch.device, bf16: bool) -> None:
    """`fully_shard` each decoder layer, then the root (embeddings, heads, ViT, final norms)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.language_model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_finite(value: torch.Tensor) -> bool:
    """True only if `value` is finite on every rank (so all ranks skip a bad step together)."""
    flag = torch.tensor([1.0 if torch.isfinite(value).all() else 0.0], device=value.device)
    if world()[1] > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t

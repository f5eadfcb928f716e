"""How a Lance model is distributed: FSDP2 per decoder layer, mixed precision, activation checkpointing.

The model definition (`lance_model`) knows nothing of this; `apply_fsdp` wraps an existing model,
the torchtitan way, also one still on the meta device: after `to_empty`, `fill_local` gives every
rank's shards their values one tensor at a time (`local_part` says which rows a rank holds). On CPU
the same code runs with gloo and full precision.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

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


# ---------------------------------------------------------------------------------------- shard by shard
def local_part(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's local tensor, its first row, its end row) of a model tensor: a DTensor sharded
    on dim 0 (FSDP2, also inside an HSDP mesh whose other dims replicate) or a plain tensor (all rows).
    Rows follow `torch.chunk`, as FSDP2 shards them; 0-dim tensors are whole on every rank."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return t, 0, (t.shape[0] if t.dim() else 0)
    local = t.to_local()
    n = t.shape[0] if t.dim() else 0
    sharded = [i for i, p in enumerate(t.placements) if not isinstance(p, Replicate)]
    if not sharded or t.dim() == 0:
        return local, 0, n
    if len(sharded) != 1 or not isinstance(t.placements[sharded[0]], Shard) or t.placements[sharded[0]].dim != 0:
        raise ValueError(f"tensor placements {t.placements}: only dim-0 sharding (FSDP2/HSDP) is supported")
    mesh_dim = sharded[0]
    parts, rank = t.device_mesh.size(mesh_dim), t.device_mesh.get_local_rank(mesh_dim)
    chunk = -(-n // parts)
    start = min(rank * chunk, n)
    stop = min(start + chunk, n)
    if local.shape[0] != stop - start:
        raise RuntimeError(f"local shard of {tuple(t.shape)} has {local.shape[0]} rows, expected {stop - start}")
    return local, start, stop


@torch.no_grad()
def fill_local(tensors: Iterable[tuple[str, torch.Tensor]],
               value: Callable[[str, tuple[int, ...], int, int], torch.Tensor]) -> None:
    """Fill each tensor's local part, one tensor at a time, with `value(name, global shape, start,
    stop)`: rows [start, stop) of the named tensor (cast and moved to the tensor's dtype/device), so
    a rank holds its shards plus one tensor's rows at most."""
    for name, t in tensors:
        local, start, stop = local_part(t)
        src = value(name, tuple(t.shape), start, stop)
        if tuple(src.shape) != tuple(local.shape):
            raise ValueError(f"{name}: got a block of shape {tuple(src.shape)} for the local part {tuple(local.shape)}")
        local.copy_(src)

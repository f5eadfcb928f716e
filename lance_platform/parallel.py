"""How a Lance model is distributed: FSDP2 per decoder layer (or HSDP: sharded within groups of
`shard_size` ranks, replicated across them), mixed precision, activation checkpointing, and the
small collective helpers the training stages and the sharded GRPO update share.

The model definition (`lance_model`) knows nothing of this; `apply_fsdp` wraps an existing model,
the torchtitan way, also one still on the meta device: after `to_empty`, `fill_local` gives every
rank's shards their values one tensor at a time (`local_part` says which rows a rank holds). On CPU
the same code runs with gloo and full precision. `init_group` joins a process group from explicit
(address, port, rank, world) for workers that are plain Ray actors rather than Ray Train workers;
`free_port` picks the rendezvous port on the rank-0 host; `root_forward` runs any computation of a
model inside its root module's forward, so FSDP2's hooks gather the root's (non-layer) parameters
for code that calls submodules directly (the denoising session does).
"""
from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lance_model import Lance
from lance_model.configio import shard_size_fits

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    if distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def free_port() -> int:
    """A TCP port free on this host right now (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def init_group(address: str, port: int, rank: int, world_size: int, backend: str = "gloo") -> None:
    """Join the `world_size` process group rendezvousing at tcp://address:port as `rank`."""
    if rank < 0 or rank >= world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world_size)


def root_forward(model: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    """`fn()` run as `model`'s forward: its forward pre/post hooks (FSDP2's unshard, reshard and
    backward hooks of the root's parameters) wrap the computation. A plain model just runs `fn`."""
    model.forward = lambda: fn()  # an instance attribute shadows the class's forward for this call
    try:
        return model()
    finally:
        del model.forward


def apply_activation_checkpointing(model: Lance, every: int = 1) -> list[int]:
    """Recompute the activations of every `every`-th decoder layer in the backward (layers 0,
    every, 2 * every, ...: 1 = all of them; 2 = half, trading less memory saved for less recompute).
    Returns the wrapped layer indexes."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if every < 1:
        raise ValueError(f"every={every}: expected a positive layer stride")
    layers = model.language_model.model.layers
    wrapped = list(range(0, len(layers), every))
    for i in wrapped:
        layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)
    return wrapped


def fsdp_mesh(device: torch.device, shard_size: int = 0) -> DeviceMesh | None:
    """The device mesh `apply_fsdp` shards over: None (FSDP2's default, every rank of the world shards)
    for `shard_size` 0 or the world size; otherwise HSDP's 2-D mesh ("replicate", "shard") of
    world // shard_size replicas, each sharding the parameters over `shard_size` consecutive ranks
    (a node's GPUs: the reduce-scatter and all-gather stay inside it, only the gradient all-reduce
    of the shards crosses replicas). Collective: every rank calls it."""
    _, world_size = world()
    if not shard_size_fits(shard_size, world_size):
        raise ValueError(f"shard_size={shard_size}: expected 0 or a divisor of the world size ({world_size})")
    if shard_size in (0, world_size):
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def apply_fsdp(model: Lance, device: torch.device, bf16: bool, shard_size: int = 0,
               mesh: DeviceMesh | None = None) -> None:
    """`fully_shard` each decoder layer, then the root (embeddings, heads, ViT, final norms): over
    all ranks (FSDP), or with `shard_size` a divisor of the world size below it, HSDP (`fsdp_mesh`:
    parameters are DTensors placed (Replicate(), Shard(0))); or over a `mesh` the caller built (a
    subgroup of the world, say), which then takes the place of `shard_size`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    mesh = mesh if mesh is not None else fsdp_mesh(device, shard_size)
    for layer in model.language_model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sums over all ranks of host numbers (one rank: the numbers, with no trip to the device)."""
    if world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


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

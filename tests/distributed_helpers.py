"""Multi-process helpers for tests: a free loopback port, and `spawn_gloo`, which runs a test's
worker function on N spawned ranks inside one gloo process group (CPU, loopback)."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, worker: Callable[..., None], args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
        dist.barrier()  # no rank leaves while another still needs the group
    finally:
        dist.destroy_process_group()


def spawn_gloo(worker: Callable[..., None], world: int, *args: Any) -> None:
    """`worker(rank, world, *args)` on `world` spawned processes, each in one gloo process group;
    `worker` must be a module-level function (the spawned processes import it). A rank that
    raises fails the call with that rank's traceback."""
    import torch.multiprocessing

    torch.multiprocessing.spawn(_gloo_rank, args=(world, free_port(), worker, args), nprocs=world, join=True)

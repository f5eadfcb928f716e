"""The distribution helpers of the training stages; they live in `lance_platform.parallel` (the RL
update shards its policy with the same `apply_fsdp`) and are re-exported here under their old names."""
from __future__ import annotations

from lance_platform.parallel import (
    all_reduce_sum,
    apply_activation_checkpointing,
    apply_fsdp,
    distributed,
    fill_local,
    free_port,
    full_tensor,
    init_group,
    local_part,
    root_forward,
    world,
)

__all__ = ["all_reduce_sum", "apply_activation_checkpointing", "apply_fsdp", "distributed",
           "fill_local", "free_port", "full_tensor", "init_group", "local_part", "root_forward", "world"]

"""A single GPU trains under FSDP2 too (fp32 master weights, bf16 compute), so its parameters are
DTensors on a mesh of one rank. Their full state must be plain tensors that safetensors can write:
a DTensor has no storage of its own, and writing one failed the first checkpoint of a one-GPU stage."""
from __future__ import annotations

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from lance_model.checkpoint import save_state
from pipelines import parallel
from pipelines.train_loop import full_model_state, sharded


def test_one_rank_fsdp_state_is_written_and_equals_the_weights(tiny_model, tmp_path):
    expected = {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        parallel.apply_fsdp(tiny_model, torch.device("cpu"), bf16=False)
        assert sharded(tiny_model) and parallel.world() == (0, 1)
        state = full_model_state(tiny_model)
        assert all(type(v) is torch.Tensor for v in state.values())
        path = save_state(tiny_model.config, state, tmp_path / "ckpt")
    finally:
        dist.destroy_process_group()
    written = load_file(str(path))
    missing = [k for k in expected if k not in written]
    assert len(missing) <= 1, missing  # the position table is not stored
    for name in written.keys() & expected.keys():
        assert torch.equal(written[name], expected[name]), name

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


def test_ema_update_on_fsdp_shards_equals_the_per_parameter_formula(tiny_model, tmp_path):
    """`Ema.update` lerps the local shards in one foreach call: the same numbers as
    shadow + (1 - decay) * (param - shadow) per parameter, and the shadows stay DTensors."""
    from pipelines.train_loop import Ema

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        parallel.apply_fsdp(tiny_model, torch.device("cpu"), bf16=False)
        ema = Ema(tiny_model, 0.9)
        start = {k: parallel.full_tensor(v).clone() for k, v in ema.shadow.items()}
        params = {n: p for n, p in tiny_model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for i, p in enumerate(params.values()):
                p.add_(0.01 * (i + 1))
        ema.update(tiny_model)
        for n, p in params.items():
            want = start[n] + 0.1 * (parallel.full_tensor(p.detach()) - start[n])
            torch.testing.assert_close(parallel.full_tensor(ema.shadow[n]), want, atol=1e-7, rtol=0, msg=n)
        assert all(hasattr(v, "to_local") for v in ema.shadow.values())
        assert len(params) > 10
    finally:
        dist.destroy_process_group()

"""HSDP (`scaling.shard_size`, `lance_platform.parallel.apply_fsdp`): 4 gloo ranks on the CPU as 2
replicas x 2 shards. The parameters are DTensors placed (Replicate(), Shard(0)) whose local rows are
`local_part`'s; one training step (different data per rank, clipped) equals plain FSDP over the 4
ranks and the unsharded step over the 4 ranks' data; a sharded checkpoint written under HSDP (each
shard once) restores exactly under HSDP, on 2 FSDP ranks and on 1, and a full (gathered) one under
HSDP; the config refuses a shard size that does not divide the workers. One spawn runs every
distributed part."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from distributed_helpers import spawn_gloo
from safetensors.torch import load_file, save_file

from lance_platform import checkpoint as ckpt
from lance_platform.config import ConfigError, from_dict
from lance_platform.parallel import full_tensor
from pipelines.config import StageConfig

WORLD, SHARD = 4, 2
CLIP = 0.05  # below the step's gradient norm: the step is clipped


def stage(**kw) -> StageConfig:
    return from_dict(StageConfig, {"seed": 5, "ema_decay": 0.5, "optim": {"lr": 0.01, "grad_clip": CLIP}, **kw})


def parts(model):
    from pipelines.train_loop import Ema

    cfg = stage()
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                            foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return params, opt, sched, Ema(model, cfg.ema_decay)


def rank_batch(rank: int):
    """Rank `rank`'s own pack (a t2i and an i2t sample: both losses) and its generator seed."""
    from lance_model import LanceConfig
    from lance_model.packing import pack_rendered
    from lance_model.sequence import Sample, SequenceBuilder, Visual
    from lance_model.tokenizer import ByteTokenizer

    config = LanceConfig.from_preset("tiny")
    g = torch.Generator().manual_seed(100 + rank)
    builder = SequenceBuilder(ByteTokenizer())
    hidden = config.text.hidden_size
    samples = [Sample("t2i", f"a sign that says {'OPEN' if rank % 2 else 'STOP'} {rank}",
                      target=Visual(latent=torch.randn(48, 1, 2 + rank % 2, 4, generator=g))),
               Sample("i2t", "What does the sign say?", answer=["OPEN", "STOP", "GO", "WAIT"][rank],
                      source=Visual(vit_tokens=torch.randn(4, hidden, generator=g), vit_grid=(1, 4, 4)))]
    return pack_rendered([builder.render(s) for s in samples], config), len(builder.tok), 7_000 + rank


def counts(batch) -> list[int]:
    return [batch.ce_index.numel(), int(batch.vae_noisy.sum())]


def step_loss(model, rank: int, world: int, distributed: bool):
    """Rank `rank`'s loss as the train loop makes it: its share of the global mean (token counts
    summed over every rank; unsharded, over the packs of all `world` ranks)."""
    from pipelines import parallel

    batch, vocab, seed = rank_batch(rank)
    if distributed:
        ce_n, mse_n = parallel.all_reduce_sum(counts(batch), torch.device("cpu"))
    else:
        ce_n, mse_n = (sum(c) for c in zip(*(counts(rank_batch(r)[0]) for r in range(world))))
    out = model(batch, generator=torch.Generator().manual_seed(seed), ce_count=int(ce_n), mse_count=int(mse_n),
                text_vocab=vocab)
    return out.loss


def gathered(model, opt, ema) -> dict[str, torch.Tensor]:
    """Every model, EMA and optimizer tensor in full (collective over the tensors' own mesh)."""
    from lance_platform.checkpoint import plain_name

    names = {id(p): plain_name(n) for n, p in model.named_parameters()}
    tensors = {f"model/{plain_name(k)}": full_tensor(v) for k, v in model.state_dict().items()}
    if ema is not None:
        tensors |= {f"ema/{k}": full_tensor(v) for k, v in ema.shadow.items()}
    if opt is not None:
        tensors |= {f"optim/{names[id(p)]}/{k}": full_tensor(v) for p, e in opt.state.items() for k, v in e.items()}
    return {k: v.detach().contiguous().clone() for k, v in tensors.items()}


def _worker(rank: int, world: int, root: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    from lance_platform import sharded_checkpoint as sc
    from lance_platform.checkpoint import plain_name
    from pipelines import parallel
    from pipelines.train_loop import (
        build_model,
        full_model_state,
        full_optimizer_state,
        optimizer_step,
        restore_checkpoint,
        save_checkpoint,
        save_sharded_checkpoint,
    )

    root = Path(root)
    cpu = torch.device("cpu")
    hsdp = lambda m: parallel.apply_fsdp(m, cpu, bf16=False, shard_size=SHARD)

    def write(name: str, tensors: dict[str, torch.Tensor]) -> None:
        if rank == 0:
            save_file(tensors, str(root / f"{name}.safetensors"))

    # (a) placements and local rows under HSDP 2 x 2
    model = build_model(stage(), device=cpu, prepare=hsdp)
    layout = {}
    for n, p in model.named_parameters():
        assert isinstance(p, DTensor), n
        local, start, stop = parallel.local_part(p)
        layout[plain_name(n)] = {"placements": [repr(x) for x in p.placements], "mesh": list(p.device_mesh.shape),
                                 "dims": list(p.device_mesh.mesh_dim_names), "rows": [start, stop],
                                 "local_rows": local.shape[0] if local.dim() else 0,
                                 "match": bool(torch.equal(local, full_tensor(p)[start:stop] if p.dim() else full_tensor(p)))}
    (root / f"layout_rank{rank}.json").write_text(json.dumps(layout))
    write("hsdp_init", gathered(model, None, None))

    # (b) one clipped step under HSDP, with this rank's own data
    params, opt, sched, ema = parts(model)
    norms = {}
    norms["hsdp"], skipped = optimizer_step(step_loss(model, rank, world, True) * world, params, opt, CLIP,
                                            lambda: ema.update(model))
    assert not skipped
    sched.step()
    write("hsdp_step", gathered(model, opt, ema))

    # (c) its sharded checkpoint: every shard once (replica 1 writes no tensor)
    writer = sc.AsyncCheckpointWriter(root / "checkpoints", rank, world, keep=2, attempt="hsdp")
    save_sharded_checkpoint(writer, 0, model, model.config, opt, sched, ema, {"streams": {"world": world}}, rank)
    writer.wait()
    # the gathered state (validation samples, a LoRA stage's full checkpoints) and a full checkpoint
    state = full_model_state(model)
    named = full_optimizer_state(model, opt)
    write("hsdp_gathered", {f"model/{k}": v.contiguous() for k, v in state.items()}
          | {f"optim/{n}/{k}": v for n, e in named.get("state", {}).items() for k, v in e.items()})
    save_checkpoint(root / ("full" if rank == 0 else f"full_rank{rank}"), 0, model, model.config, opt, sched, ema,
                    None, rank, world)
    del model, opt, ema, params
    dist.barrier()  # rank 0 has committed the sharded checkpoint, every rank its part of the full one
    if rank == 0:  # Ray Train merges every rank's share into one directory; do the same here
        for r in range(1, world):
            shutil.copy(root / f"full_rank{r}" / f"manifest.rank{r}.json", root / "full" / f"manifest.rank{r}.json")

    # (b) the same step under plain FSDP over the 4 ranks
    model = build_model(stage(), device=cpu, prepare=lambda m: parallel.apply_fsdp(m, cpu, bf16=False))
    assert all(len(p.placements) == 1 for p in model.parameters())
    params, opt, sched, ema = parts(model)
    norms["fsdp"], _ = optimizer_step(step_loss(model, rank, world, True) * world, params, opt, CLIP,
                                      lambda: ema.update(model))
    write("fsdp_step", gathered(model, opt, ema))
    (root / f"norms_rank{rank}.json").write_text(json.dumps(norms))
    del model, opt, ema, params

    # (c) restored under HSDP 2 x 2
    directory = root / "checkpoints" / sc.step_name(1)
    model = build_model(stage(), device=cpu, prepare=hsdp)
    _, opt, sched, ema = parts(model)
    assert restore_checkpoint(directory, model, opt, sched, ema, None, rank) == 1
    write("restored_hsdp", gathered(model, opt, ema))
    dist.barrier()  # the full checkpoint is merged
    model = build_model(stage(), device=cpu, prepare=hsdp)
    _, opt, sched, ema = parts(model)
    assert restore_checkpoint(root / "full", model, opt, sched, ema, None, rank) == 1
    write("restored_hsdp_full", gathered(model, opt, ema))
    del model, opt, ema

    # (c) restored on 2 FSDP ranks (ranks 0 and 1 of the 4)
    pair = dist.new_group([0, 1])
    if rank < 2:
        mesh = DeviceMesh.from_group(pair, "cpu")

        model = build_model(stage(), device=cpu, prepare=lambda m: parallel.apply_fsdp(m, cpu, bf16=False, mesh=mesh))
        _, opt, sched, ema = parts(model)
        assert restore_checkpoint(directory, model, opt, sched, ema, None, rank) == 1
        write("restored_on_2", gathered(model, opt, ema))


@pytest.fixture(scope="module")
def hsdp_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hsdp")
    spawn_gloo(_worker, WORLD, str(root))
    return root


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float) -> None:
    assert got.keys() == want.keys() and want
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------------------------------- (a) layout
def test_parameters_are_replicated_over_replicas_and_sharded_by_rows_within_them(hsdp_run):
    from pipelines.train_loop import build_model

    layouts = [json.loads((hsdp_run / f"layout_rank{r}.json").read_text()) for r in range(WORLD)]
    reference = build_model(stage()).state_dict()
    for name in layouts[0]:
        shape = tuple(reference[name].shape)
        for r, layout in enumerate(layouts):
            got = layout[name]
            assert got["placements"] == ["Replicate()", "Shard(dim=0)"] and got["mesh"] == [2, 2], name
            assert got["dims"] == ["replicate", "shard"] and got["match"], name
            chunk = -(-shape[0] // SHARD)
            want = [min(r % SHARD * chunk, shape[0]), min((r % SHARD + 1) * chunk, shape[0])]
            assert got["rows"] == want and got["local_rows"] == want[1] - want[0], (name, r)
    # the values filled shard by shard are the unsharded model's
    init = load_file(str(hsdp_run / "hsdp_init.safetensors"))
    assert_close(init, {f"model/{k}": v for k, v in reference.items()}, atol=0)


# ---------------------------------------------------------------------------------------- (b) one step
def test_one_step_equals_fsdp_and_the_unsharded_step_with_the_same_clipped_norm(hsdp_run):
    from pipelines.train_loop import build_model, optimizer_step

    norms = [json.loads((hsdp_run / f"norms_rank{r}.json").read_text()) for r in range(WORLD)]
    assert len({n["hsdp"] for n in norms}) == 1 and len({n["fsdp"] for n in norms}) == 1  # every rank agrees
    hsdp_norm, fsdp_norm = norms[0]["hsdp"], norms[0]["fsdp"]
    assert hsdp_norm == pytest.approx(fsdp_norm, rel=1e-5) and hsdp_norm > CLIP

    # unsharded: the sum of the 4 ranks' shares of the global mean, one step
    model = build_model(stage())
    params, opt, _, ema = parts(model)
    loss = sum(step_loss(model, r, WORLD, False) for r in range(WORLD))
    norm, _ = optimizer_step(loss, params, opt, CLIP, lambda: ema.update(model))
    assert hsdp_norm == pytest.approx(norm, rel=1e-5)
    names = {id(p): ckpt.plain_name(n) for n, p in model.named_parameters()}
    plain = {f"model/{k}": v for k, v in model.state_dict().items()} | {f"ema/{k}": v for k, v in ema.shadow.items()}
    plain |= {f"optim/{names[id(p)]}/{k}": v for p, e in opt.state.items() for k, v in e.items()}

    hsdp = load_file(str(hsdp_run / "hsdp_step.safetensors"))
    fsdp = load_file(str(hsdp_run / "fsdp_step.safetensors"))
    assert_close(hsdp, fsdp, atol=1e-5)
    assert_close(hsdp, plain, atol=1e-5)
    init = load_file(str(hsdp_run / "hsdp_init.safetensors"))
    key = "model/language_model.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(hsdp[key], init[key])  # the step moved the weights


# ---------------------------------------------------------------------------------------- (c) checkpoint
def test_hsdp_checkpoint_stores_each_shard_once_and_restores_on_hsdp_two_and_one_ranks(hsdp_run):
    from pipelines.train_loop import build_model, restore_checkpoint

    d = hsdp_run / "checkpoints" / "step-000001"
    manifest = ckpt.verify(d)
    assert manifest["layout"] == "sharded" and manifest["world"] == WORLD
    indexes = [json.loads((d / f"index.rank{r}.json").read_text())["groups"] for r in range(WORLD)]
    assert set(indexes[0]) == set(indexes[1]) == {"model", "ema", "optim"}
    assert indexes[2] == indexes[3] == {}  # the second replica's shards are the first's: not written again
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    rows = indexes[0]["model"]["tensors"][key]["shape"][0]
    assert indexes[0]["model"]["tensors"][key]["rows"] == [0, rows // 2]
    assert indexes[1]["model"]["tensors"][key]["rows"] == [rows // 2, rows]

    saved = load_file(str(hsdp_run / "hsdp_step.safetensors"))
    assert_close(load_file(str(hsdp_run / "restored_hsdp.safetensors")), saved, atol=0)
    gathered_state = load_file(str(hsdp_run / "hsdp_gathered.safetensors"))
    assert_close(gathered_state, {k: v for k, v in saved.items() if not k.startswith("ema/")}, atol=0)
    # the full layout (gathered by get_model/optimizer_state_dict) restores onto HSDP too
    assert_close(load_file(str(hsdp_run / "restored_hsdp_full.safetensors")), saved, atol=0)
    assert_close(load_file(str(hsdp_run / "restored_on_2.safetensors")), saved, atol=0)
    model = build_model(stage())
    _, opt, sched, ema = parts(model)
    assert restore_checkpoint(d, model, opt, sched, ema, None, 0) == 1
    assert_close(gathered(model, opt, ema), saved, atol=0)


# ---------------------------------------------------------------------------------------- (d) config
@pytest.mark.parametrize("shard_size", [3, 8])
def test_a_shard_size_that_does_not_divide_the_workers_is_refused(shard_size):
    cfg = stage(scaling={"num_workers": 4, "shard_size": shard_size})
    with pytest.raises(ConfigError, match=rf"scaling\.shard_size={shard_size}: expected .*divisor of "
                                          r"scaling\.num_workers \(4\)") as err:
        cfg.validate(require_shards=False)
    assert err.value.field == "scaling.shard_size"


@pytest.mark.parametrize("shard_size", [0, 1, 2, 4])
def test_shard_sizes_dividing_the_workers_are_accepted(shard_size):
    assert stage(scaling={"num_workers": 4, "shard_size": shard_size}).validate(require_shards=False)


def test_a_negative_shard_size_is_refused_when_loaded():
    with pytest.raises(ConfigError, match=r"scaling\.shard_size"):
        stage(scaling={"num_workers": 4, "shard_size": -2})


def test_the_mesh_is_plain_fsdp_for_zero_or_the_world_and_refuses_a_non_divisor():
    from lance_platform import parallel

    cpu = torch.device("cpu")
    assert parallel.fsdp_mesh(cpu, 0) is None and parallel.fsdp_mesh(cpu, 1) is None  # one process: world 1
    with pytest.raises(ValueError, match="shard_size=2"):
        parallel.fsdp_mesh(cpu, 2)

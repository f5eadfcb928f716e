"""Sharded, asynchronous checkpoints (lance_platform.sharded_checkpoint, pipelines.train_loop): a
2-rank FSDP2 save restored on 1 and 3 ranks (gloo, CPU) bit for bit, the step going on while a
save is written, commit only when every rank's files are there, fallback from a damaged newest
checkpoint, strict keys, and the export to the full layout (also through the CLI)."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from distributed_helpers import spawn_gloo
from safetensors.torch import load_file, save_file

from lance_model.checkpoint import CheckpointError
from lance_platform import checkpoint as ckpt
from lance_platform import sharded_checkpoint as sc
from lance_platform.config import from_dict
from lance_platform.parallel import full_tensor
from pipelines.config import StageConfig


def stage() -> StageConfig:
    return from_dict(StageConfig, {"seed": 3, "ema_decay": 0.5, "optim": {"lr": 0.01}})


def parts(model):
    from pipelines.train_loop import Ema, lr_factor

    cfg = stage()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return params, opt, sched, Ema(model, cfg.ema_decay)


def train_step(model, params, opt, sched, ema) -> None:
    """A loss over every parameter element, each rank over its own shards (no collective)."""
    loss = sum((p.to_local() if hasattr(p, "to_local") else p).pow(2).sum() * 1e-2 for p in params)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    ema.update(model)


def dump(model, opt, ema, path: Path, rank: int) -> None:
    """Every model, EMA and optimizer tensor, gathered full over the tensors' own mesh (collective),
    written by rank 0."""
    from lance_platform.checkpoint import plain_name

    names = {id(p): plain_name(n) for n, p in model.named_parameters()}
    tensors = {f"model/{plain_name(k)}": full_tensor(v) for k, v in model.state_dict().items()}
    tensors |= {f"ema/{k}": full_tensor(v) for k, v in ema.shadow.items()}
    tensors |= {f"optim/{names[id(p)]}/{k}": full_tensor(v) for p, e in opt.state.items() for k, v in e.items()}
    if rank == 0:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def _worker(rank: int, world: int, root: str) -> None:
    """Ranks 0 and 1 train FSDP2-sharded over a 2-rank mesh and save at steps 1 and 2 (async);
    then all three ranks restore step 2 sharded over 3."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from pipelines import parallel
    from pipelines.train_loop import build_model, restore_checkpoint, save_sharded_checkpoint

    root = Path(root)
    cpu = torch.device("cpu")
    pair = dist.new_group([0, 1])
    if rank < 2:
        mesh = DeviceMesh.from_group(pair, "cpu")

        model = build_model(stage(), device=cpu, prepare=lambda m: parallel.apply_fsdp(m, cpu, bf16=False, mesh=mesh))
        params, opt, sched, ema = parts(model)
        writer = sc.AsyncCheckpointWriter(root / "checkpoints", rank, 2, keep=3, attempt="run")
        for step in range(2):
            train_step(model, params, opt, sched, ema)
            save_sharded_checkpoint(writer, step, model, model.config, opt, sched, ema,
                                    {"streams": {"world": 2}, "rank": rank}, rank)
        dump(model, opt, ema, root / "saved_by_2.safetensors", rank)
        writer.wait()
        del model, opt, ema
    dist.barrier()
    model = build_model(stage(), device=cpu, prepare=lambda m: parallel.apply_fsdp(m, cpu, bf16=False))
    params, opt, sched, ema = parts(model)
    step = restore_checkpoint(root / "checkpoints" / "step-000002", model, opt, sched, ema, None, rank)
    assert step == 2 and sched.last_epoch == 2
    dump(model, opt, ema, root / "restored_on_3.safetensors", rank)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded_ckpt")
    spawn_gloo(_worker, 3, str(root))
    return root


def restore_on_one(directory: Path):
    from pipelines.train_loop import build_model, restore_checkpoint

    model = build_model(stage())
    _, opt, sched, ema = parts(model)
    step = restore_checkpoint(directory, model, opt, sched, ema, None, 0)
    return step, model, opt, sched, ema


def assert_equal_to(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert got.keys() == reference.keys() and reference
    for k, v in reference.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# ---------------------------------------------------------------------------------------- N -> M
def test_two_rank_save_restores_bitwise_on_one_and_three_ranks(two_rank_run, tmp_path):
    root = two_rank_run
    d = root / "checkpoints" / "step-000002"
    manifest = ckpt.verify(d)
    assert manifest["layout"] == "sharded" and manifest["world"] == 2 and manifest["parts"] == ["manifest.rank1.json"]
    assert {f"{g}.rank{r}.safetensors" for g in ("model", "ema", "optim") for r in (0, 1)} <= set(
        manifest["files"]) | set(json.loads((d / "manifest.rank1.json").read_text())["files"])
    assert not list(d.rglob("*.pt")) and not (root / "checkpoints" / "step-000002.tmp").exists()
    # each rank's file holds only its rows: half of a 2-D tensor each
    idx0 = json.loads((d / "index.rank0.json").read_text())["groups"]["model"]["tensors"]
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert idx0[key]["rows"] == [0, idx0[key]["shape"][0] // 2]

    reference = load_file(str(root / "saved_by_2.safetensors"))
    assert_equal_to(reference, load_file(str(root / "restored_on_3.safetensors")))

    step, model, opt, sched, ema = restore_on_one(d)
    assert step == 2 and sched.last_epoch == 2
    got = {f"model/{k}": v for k, v in model.state_dict().items()} | {f"ema/{k}": v for k, v in ema.shadow.items()}
    got |= {f"optim/{n}/{k}": v for n, e in ckpt.optimizer_state_by_name(model, opt)["state"].items()
            for k, v in e.items()}
    assert_equal_to(reference, got)
    # the restored optimizer goes on from its step count
    params = [p for p in model.parameters() if p.requires_grad]
    train_step(model, params, opt, sched, ema)
    assert {float(opt.state[p]["step"]) for p in params} == {3.0}


# ---------------------------------------------------------------------------------------- async
def tiny_model():
    from pipelines.train_loop import build_model

    model = build_model(stage())
    return (model, *parts(model))


def test_the_step_goes_on_while_the_save_is_written_and_it_is_visible_only_when_complete(tmp_path):
    from pipelines.train_loop import save_sharded_checkpoint

    model, params, opt, sched, ema = tiny_model()
    train_step(model, params, opt, sched, ema)
    release = threading.Event()
    writer = sc.AsyncCheckpointWriter(tmp_path, before_write=lambda tmp: release.wait(10))
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    at_save = model.state_dict()[key].clone()
    t0 = time.perf_counter()
    target = save_sharded_checkpoint(writer, 0, model, model.config, opt, sched, ema, None, 0)
    assert time.perf_counter() - t0 < 5 and writer.busy()
    train_step(model, params, opt, sched, ema)  # runs while the writer is held
    assert not torch.equal(model.state_dict()[key], at_save)
    assert not target.exists() and sc.latest_valid(tmp_path) == (None, [])

    # the next save waits for the one in flight
    second = threading.Thread(target=save_sharded_checkpoint,
                              args=(writer, 1, model, model.config, opt, sched, ema, None, 0))
    second.start()
    time.sleep(0.3)
    assert second.is_alive() and not target.exists()
    release.set()
    second.join(30)
    assert writer.wait() == tmp_path / "step-000002"
    assert [d.name for d in sorted(tmp_path.iterdir())] == ["step-000001", "step-000002"]
    # the first checkpoint holds the weights of the moment it was taken, not the later ones
    chosen, _ = sc.latest_valid(tmp_path, "step-000001")
    with sc.ShardedCheckpoint(chosen) as read:
        assert torch.equal(read.rows("model", key), at_save)
        assert torch.equal(read.rows("model", key, 3, 7), at_save[3:7])
    # the host buffers hold one copy of what a save writes: every tensor of the checkpoint's files
    with sc.ShardedCheckpoint(chosen) as read:
        stored = sum(read.rows(g, n).numel() * read.rows(g, n).element_size()
                     for g in ("model", "ema", "optim") for n in read.names(g))
    assert writer.host_bytes() == stored > 0


def test_the_checkpoint_commits_only_when_every_rank_wrote_its_files(tmp_path):
    t = torch.arange(12.0).reshape(6, 2)
    stale = tmp_path / "step-000005.tmp"
    stale.mkdir()
    (stale / "manifest.rank1.json").write_text(json.dumps({"token": "old-attempt/5", "files": {}}))
    (stale / "model.rank2.safetensors").write_bytes(b"left by an attempt with 3 ranks")
    hold = threading.Event()
    w0 = sc.AsyncCheckpointWriter(tmp_path, 0, 2, attempt="a", commit_timeout_s=30)
    w1 = sc.AsyncCheckpointWriter(tmp_path, 1, 2, attempt="a", before_write=lambda tmp: hold.wait(10))
    w0.save(5, {"model": [sc.Piece("w", t[:3], 0, (6, 2))]}, {ckpt.TRAINER_STATE: {"format": ckpt.FORMAT, "step": 5}})
    w1.save(5, {"model": [sc.Piece("w", t[3:], 3, (6, 2))]})
    time.sleep(0.5)
    assert w0.busy() and not (tmp_path / "step-000005").exists()  # rank 1's files are not there yet
    hold.set()
    w1.wait()
    d = w0.wait()
    assert ckpt.verify(d)["parts"] == ["manifest.rank1.json"] and not (d / "model.rank2.safetensors").exists()
    with sc.ShardedCheckpoint(d) as read:
        assert torch.equal(read.rows("model", "w"), t) and torch.equal(read.rows("model", "w", 2, 5), t[2:5])
    # a rank that never writes: rank 0 gives up after its timeout and the checkpoint stays invisible
    lone = sc.AsyncCheckpointWriter(tmp_path, 0, 2, attempt="b", commit_timeout_s=0.3)
    lone.save(6, {"model": [sc.Piece("w", t[:3], 0, (6, 2))]})
    with pytest.raises(CheckpointError, match=r"manifest\.rank1\.json: not written within"):
        lone.wait()
    assert not (tmp_path / "step-000006").exists()


# ---------------------------------------------------------------------------------------- damage
def test_a_truncated_shard_in_the_newest_checkpoint_falls_back_to_the_previous_one(two_rank_run, tmp_path):
    from pipelines.train_loop import resume_sharded

    root = tmp_path / "checkpoints"
    shutil.copytree(two_rank_run / "checkpoints", root)
    bad = root / "step-000002" / "model.rank1.safetensors"
    bad.write_bytes(bad.read_bytes()[:-100])
    model, _, opt, sched, ema = tiny_model()
    start, note = resume_sharded(root, model, opt, sched, ema, None, 0, torch.device("cpu"))
    assert start == 1 and sched.last_epoch == 1
    assert "skipped step-000002" in note and "model.rank1.safetensors" in note and note.endswith("step-000001")
    reference = sc.ShardedCheckpoint(root / "step-000001")
    key = "language_model.model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[key], reference.rows("model", key))
    reference.close()


def drop_key(directory: Path, key: str) -> None:
    """Remove `key` from every rank's model file and index, and make the manifests match again."""
    for r in range(2):
        f = directory / f"model.rank{r}.safetensors"
        save_file({k: v for k, v in load_file(str(f)).items() if k != key}, str(f))
        index = json.loads((directory / f"index.rank{r}.json").read_text())
        del index["groups"]["model"]["tensors"][key]
        (directory / f"index.rank{r}.json").write_text(json.dumps(index))
        manifest_path = directory / ckpt.part_manifest(r)
        manifest = json.loads(manifest_path.read_text())
        manifest["files"] = {n: ckpt._describe(directory / n) for n in manifest["files"]}
        manifest_path.write_text(json.dumps(manifest))


def test_a_missing_key_fails_naming_it_and_resume_falls_back(two_rank_run, tmp_path):
    from pipelines.train_loop import resume_sharded

    root = tmp_path / "checkpoints"
    shutil.copytree(two_rank_run / "checkpoints", root)
    key = "language_model.model.layers.1.mlp_moe_gen.down_proj.weight"
    drop_key(root / "step-000002", key)
    ckpt.verify(root / "step-000002")  # the files are whole: only the strict load notices
    with pytest.raises(CheckpointError, match=rf"missing key\(s\): {key.replace('.', '[.]')}"):
        restore_on_one(root / "step-000002")
    model, _, opt, sched, ema = tiny_model()
    start, note = resume_sharded(root, model, opt, sched, ema, None, 0, torch.device("cpu"))
    assert start == 1 and key in note and "step-000002" in note


# ---------------------------------------------------------------------------------------- export
def test_export_round_trip_equals_the_model_state(two_rank_run, tmp_path, capsys):
    from jobs.cli import main
    from lance_model import Lance

    d = two_rank_run / "checkpoints" / "step-000002"
    reference = load_file(str(two_rank_run / "saved_by_2.safetensors"))
    out = sc.export(d, tmp_path / "lance")
    assert ckpt.verify(out)["step"] == 2
    loaded = Lance.from_pretrained(out).state_dict()
    model_ref = {k[len("model/"):]: v for k, v in reference.items() if k.startswith("model/")}
    assert loaded.keys() == model_ref.keys()
    for k, v in model_ref.items():
        assert torch.equal(loaded[k], v), k
    ema_file = load_file(str(out / ckpt.EMA_FILE))
    for k, v in reference.items():
        if k.startswith("ema/"):
            assert torch.equal(ema_file[k[4:]], v), k
    optim = ckpt.read_optimizer_state(out)
    for k, v in reference.items():
        if k.startswith("optim/"):
            name, _, sub = k[len("optim/"):].rpartition("/")
            assert torch.equal(optim["state"][name][sub], v), k
    # the full export restores like the sharded checkpoint (model, EMA, optimizer, scheduler)
    step, model, *_ = restore_on_one(out)
    assert step == 2 and all(torch.equal(model.state_dict()[k], v) for k, v in model_ref.items())

    # the CLI: the newest complete checkpoint of a directory, official layout; bad paths in one line
    assert main(["export", "--checkpoint", str(d.parent), "--out", str(tmp_path / "official"),
                 "--layout", "official"]) == 0
    official = tmp_path / "official"
    assert sorted(p.name for p in official.iterdir()) == ["ema.safetensors", "lance_config.json", "llm_config.json",
                                                          "model.safetensors"]
    assert load_file(str(official / "model.safetensors")).keys() == load_file(str(out / "model.safetensors")).keys()
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    with pytest.raises(ckpt.InvalidCheckpointError, match="not a sharded checkpoint"):
        sc.export(out, tmp_path / "again")

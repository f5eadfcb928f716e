"""LoRA in a training stage (`lora.*`), on the tiny preset and CPU, without a Ray cluster.

The stage's own worker loop (`train_loop.train_loop`) runs in this process: the two Ray Train
session calls it makes (`get_checkpoint`, `report`) are answered by `Session`, which keeps a copy
of every reported checkpoint directory as Ray Train's storage would. Shown: only adapter tensors
change (the base stays bitwise equal), the loss falls on a repeated batch, checkpoints hold the
adapters alone and are far smaller than the model, a resumed run equals the uninterrupted one,
validation runs with the adapters on, and the merged final checkpoint computes what the adapter
model computes."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from lance_model import Lance
from lance_model.checkpoint import read_tensors
from lance_model.packing import pack_rendered
from lance_model.sequence import SequenceBuilder
from lance_model.tokenizer import load_tokenizer
from lance_platform import checkpoint as ckpt
from lance_platform import lora
from lance_platform.config import ConfigError, to_dict
from lance_platform.schema import row_to_sample
from pipelines import adapters, parallel
from pipelines import train_loop as tl
from pipelines.batching import GroupStreams, Packer, ShardRows
from pipelines.config import load_stage_config
from pipelines.trainer import check_lora, finish_lora_stage, plan_data, split_block

RANK = 4
MIXTURE = "mixture.groups={gen: {tasks: [t2i]}, und: {tasks: [i2t]}}"


def lora_stage(shards, *extra: str):
    return load_stage_config(None, [
        f"data.shards={shards}", "steps=6", "checkpoint_every=2", "data.max_tokens=900", "optim.lr=0.01",
        MIXTURE, "ema_decay=0.9", "data.holdout_per_group=1", "validation.samples=1", "lora.enabled=true",
        f"lora.rank={RANK}", "lora.alpha=8", *extra])


class Session:
    """Ray Train's session for a worker loop run in this process: resumes from `resume` (or not)
    and keeps a copy of each reported checkpoint under `storage` with its metrics."""

    def __init__(self, storage: Path, resume: Path | None = None) -> None:
        self.storage, self.resume, self.reports = storage, resume, []

    def get_checkpoint(self):
        from ray.train import Checkpoint

        return Checkpoint.from_directory(str(self.resume)) if self.resume is not None else None

    def report(self, metrics: dict, checkpoint=None) -> None:
        target = self.storage / f"checkpoint_{len(self.reports):06d}"
        shutil.copytree(checkpoint.path, target)
        self.reports.append((dict(metrics), target))


def run_worker(monkeypatch, stage, storage: Path, resume: Path | None = None) -> tuple[Session, Lance]:
    """One worker of the stage, start to end; returns the session and the trained model."""
    import ray.train

    session = Session(storage, resume)
    built: list[Lance] = []
    build = tl.build_model
    monkeypatch.setattr(ray.train, "get_checkpoint", session.get_checkpoint)
    monkeypatch.setattr(ray.train, "report", session.report)
    monkeypatch.setattr(tl, "build_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    plan = plan_data(stage)
    tl.train_loop({"stage": to_dict(stage), "init_path": None, "files": plan.files, "holdout": plan.holdout,
                   "split_block": split_block(stage, plan)})
    return session, built[0]


def batch_of(model: Lance, rows: list[dict]):
    builder = SequenceBuilder(load_tokenizer(model.config.tokenizer))
    return pack_rendered([builder.render(row_to_sample(r)) for r in rows], model.config), len(builder.tok)


def heads(model: Lance, batch, vocab: int) -> dict[str, torch.Tensor]:
    """The two heads' outputs (text logits, velocity) of one training forward with fixed noise."""
    out: dict[str, torch.Tensor] = {}
    hooks = [model.language_model.lm_head.register_forward_hook(lambda m, i, o: out.__setitem__("logits", o)),
             model.llm2vae.register_forward_hook(lambda m, i, o: out.__setitem__("velocity", o))]
    with torch.no_grad():
        out["loss"] = model(batch, generator=torch.Generator().manual_seed(3), text_vocab=vocab).loss
    for h in hooks:
        h.remove()
    return out


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {adapters.base_key(k): v.detach().clone() for k, v in model.state_dict().items() if not adapters.is_adapter(k)}


def test_lora_config_targets_and_build(tmp_path, shard_dir, caplog):
    stage = lora_stage(shard_dir)
    assert stage.lora_enabled and stage.lora.rank == RANK and stage.lora.scale == 2.0
    assert not load_stage_config(None, [f"data.shards={shard_dir}"]).lora_enabled
    with pytest.raises(ConfigError, match=r"lora\.rank=0: expected a positive integer"):
        lora_stage(shard_dir, "lora.rank=0")
    with pytest.raises(ConfigError, match=r"lora\.rnk"):
        lora_stage(shard_dir, "lora.rnk=3")

    # targets are checked in the driver, before Ray starts, on a meta model (no weight read)
    with pytest.raises(ConfigError, match=r"lora\.targets: 'q_proj_gen' matches no module"):
        check_lora(lora_stage(shard_dir, "lora.targets=[q_proj_gen]"), None)
    with caplog.at_level(logging.WARNING, logger="pipelines.adapters"):
        check_lora(stage, None)
    assert "no pretrained weights" in caplog.text and "random" in caplog.text

    # the base of a LoRA build is exactly the plain build; only the adapters train, B starts at 0
    model, plain = tl.build_model(stage), tl.build_model(lora_stage(shard_dir, "lora.enabled=false"))
    base, reference = base_state(model), plain.state_dict()
    assert base.keys() == reference.keys() and all(torch.equal(base[k], reference[k]) for k in base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(adapters.is_adapter(n) for n in trainable)
    assert len(trainable) == 2 * 7 * model.config.text.num_hidden_layers
    items = dict(adapters.adapter_items(model))
    assert all(float(t.detach().abs().max()) == 0 for k, t in items.items() if ".lora_B." in k)
    assert all(float(t.detach().abs().max()) > 0 for k, t in items.items() if ".lora_A." in k)
    # the adapter init is seeded per tensor; names do not depend on activation checkpointing's wrapper
    wrapped = tl.build_model(stage, prepare=parallel.apply_activation_checkpointing)
    assert any(ckpt.WRAPPER_PREFIX in n for n, _ in wrapped.named_parameters())
    again = dict(adapters.adapter_items(wrapped))
    assert again.keys() == items.keys() and all(torch.equal(again[k], t) for k, t in items.items())

    # the state-dict fold used for validation samples is peft's merge
    with torch.no_grad():
        for k, t in items.items():
            t.normal_(0, 0.1)
    folded = adapters.fold_state(tl.full_model_state(model), stage.lora.scale)
    merged = lora.merged_state(model)
    assert folded.keys() == merged.keys()
    for k in merged:
        torch.testing.assert_close(folded[k], merged[k], rtol=1e-6, atol=1e-6)


def test_lora_loss_falls_on_a_repeated_batch_and_only_adapters_move(shard_dir, row_factory):
    model = tl.build_model(lora_stage(shard_dir)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.03)
    before = base_state(model)
    batch, vocab = batch_of(model, row_factory(1))
    losses, mses = [], []
    for _ in range(8):
        out = model(batch, generator=torch.Generator().manual_seed(0), text_vocab=vocab)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        mses.append(float(out.mse))
    # the generation expert's adapters fit the flow target (its head and the base are frozen)
    assert losses[-1] < losses[0] - 0.05 and mses[-1] < 0.97 * mses[0], (losses, mses)
    after = base_state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_lora_stage_checkpoints_resumes_and_merges(tmp_path, shard_dir, row_factory, monkeypatch):
    stage = lora_stage(shard_dir)
    full_run, model = run_worker(monkeypatch, stage, tmp_path / "a")
    metrics = [m for m, _ in full_run.reports]
    assert [m["step"] for m in metrics] == [1, 3, 5]

    # the run moved the adapters alone: the base is bitwise the stage's starting base
    start = tl.build_model(stage)
    base, reference = base_state(model), base_state(start)
    assert all(torch.equal(base[k], reference[k]) for k in reference)
    moved = [k for k, t in adapters.adapter_items(model) if ".lora_B." in k and float(t.detach().abs().max()) > 0]
    assert len(moved) == 7 * model.config.text.num_hidden_layers

    # checkpoints hold the adapters, their EMA and optimizer state, the scheduler, data position, record
    last = full_run.reports[-1][1]
    manifest = ckpt.verify(last)
    saved = read_tensors(last / ckpt.MODEL_FILE)
    assert saved.keys() == dict(adapters.adapter_items(model)).keys()
    for k, t in adapters.adapter_items(model):
        assert torch.equal(saved[k], t.detach())
    assert read_tensors(last / ckpt.EMA_FILE).keys() == saved.keys()
    optim = ckpt.read_optimizer_state(last)
    assert optim["state"] and all(adapters.is_adapter(n) for n in optim["state"])
    state = ckpt.read_trainer_state(last)
    assert state["step"] == 6 and state["lora"]["rank"] == RANK and state["lora"]["base"]["kind"] == "preset"
    assert (last / "data_state_rank0.json").is_file() and "data_state_rank0.json" in manifest["files"]

    # validation ran with the adapters on
    plan = plan_data(stage)
    streams = GroupStreams(ShardRows(plan.files), {n: g.tasks for n, g in stage.mixture.groups.items()},
                           holdout=plan.holdout)
    packer = Packer(streams, stage.mixture, SequenceBuilder(load_tokenizer(model.config.tokenizer)), model.config,
                    stage.data.max_tokens)
    rows = streams.holdout_rows()
    on = tl.validate(model, packer, rows, torch.device("cpu"), stage.validation.seed)
    with lora.adapters_disabled(model):
        off = tl.validate(model, packer, rows, torch.device("cpu"), stage.validation.seed)
    assert on == {k: pytest.approx(metrics[-1][k], rel=1e-6) for k in on} and on != off

    # resumed from the step-2 checkpoint, the run continues exactly as the uninterrupted one
    resume = tmp_path / "resume" / "checkpoint_000000"
    shutil.copytree(full_run.reports[0][1], resume)
    resumed, _ = run_worker(monkeypatch, stage, tmp_path / "b", resume=resume)
    assert [m["step"] for m, _ in resumed.reports] == [3, 5]
    for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE, ckpt.OPTIMIZER_TENSORS):
        a, b = read_tensors(last / name), read_tensors(resumed.reports[-1][1] / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert metrics[-1]["loss"] == resumed.reports[-1][0]["loss"]

    # end of stage: <stage>/adapters and the merged <stage>/final, which computes the adapter model
    final = finish_lora_stage(stage, last, tmp_path / "stage", None)
    assert final == tmp_path / "stage" / "final" and ckpt.verify(final)["step"] == 6
    exported = tmp_path / "stage" / adapters.ADAPTERS_DIR
    assert read_tensors(exported / ckpt.MODEL_FILE).keys() == saved.keys()
    merged = Lance.from_pretrained(final, weights="model").eval()
    assert not any(adapters.is_adapter(k) or ".base_layer." in k for k in merged.state_dict())
    batch, vocab = batch_of(model, row_factory(1, seed=5))
    want, got, plain = heads(model.eval(), batch, vocab), heads(merged, batch, vocab), heads(start.eval(), batch, vocab)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
    assert (plain["velocity"] - want["velocity"]).abs().max() > 1e-3  # the adapters changed the model
    ema_merged = Lance.from_pretrained(final, weights="ema").state_dict()
    assert ema_merged.keys() == merged.state_dict().keys()
    # the unsharded copy made for validation samples is the merged model too
    copy = tl.unsharded_copy(model, model.config, torch.device("cpu"))
    for k, v in heads(copy, batch, vocab).items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-5)

    # the adapter checkpoint is a small fraction of a full one: its weights file ~3% of the model's
    # (rank 4 on the tiny preset), the whole directory (EMA, optimizer, JSON) under a fifth of the
    # full model file alone (a full checkpoint adds the EMA and twice the model for the optimizer)
    full_model = (final / ckpt.MODEL_FILE).stat().st_size
    assert (last / ckpt.MODEL_FILE).stat().st_size < 0.05 * full_model
    assert sum(p.stat().st_size for p in last.iterdir() if p.is_file()) < 0.2 * full_model

    # the next stage reads the merged final as it reads any final checkpoint
    nxt = load_stage_config(None, [f"data.shards={shard_dir}", "init.kind=previous"])
    source = tl.model_source(nxt, str(final))
    assert not source.fresh_ok and set(source.refs) >= {k for k in merged.state_dict() if k != "latent_pos_embed.pos_embed"}

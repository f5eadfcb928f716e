"""Meta-device construction and sharded loading under FSDP2 (2 ranks, gloo, CPU), and resuming a
checkpoint on another number of workers (2 -> 1 and 1 -> 2): model, optimizer and EMA reshard."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from distributed_helpers import spawn_gloo
from safetensors.torch import load_file, save_file

from lance_platform.config import ConfigError, from_dict
from pipelines.config import StageConfig
from pipelines.profiling import peak_host_rss_mib, reset_peak_host_rss

WIDE = {"text": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
                 "head_dim": 64, "intermediate_size": 2048, "mrope_section": [8, 12, 12]},
        "vit": {"out_hidden_size": 512}}
TINY_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 320, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
TINY_VISION = {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "window_size": 56,
               "fullatt_block_indexes": [1], "out_hidden_size": 64}


def stage(**kw) -> StageConfig:
    return from_dict(StageConfig, {"seed": 7, "ema_decay": 0.5, "optim": {"lr": 0.01}, **kw})


def stages(root: Path) -> dict[str, StageConfig]:
    return {"preset": stage(model={"overrides": WIDE}),
            "lance": stage(init={"kind": "lance", "path": str(root / "lance")}),
            "qwen": stage(init={"kind": "qwen25vl", "path": str(root / "qwen")},
                          model={"overrides": {"ce_weight": 0.25}})}


def trainer_parts(model, stage_cfg):
    from pipelines.train_loop import Ema, lr_factor

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage_cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, stage_cfg))
    return params, opt, sched, Ema(model, stage_cfg.ema_decay)


def train_step(model, params, opt, sched, ema, world: int) -> None:
    """A deterministic loss over every parameter (each rank over its own shards: no collective,
    the same gradient for every element however the model is sharded)."""
    loss = sum((p.to_local() if hasattr(p, "to_local") else p).pow(2).sum() * 1e-3 for p in params)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    ema.update(model)


def dump_full(model, opt, ema, path: Path, rank: int) -> None:
    from pipelines.train_loop import full_model_state, full_optimizer_state

    full = full_model_state(model)
    ema_full = ema.full_state()
    optim = full_optimizer_state(model, opt)
    if rank == 0:
        tensors = {f"model/{k}": v for k, v in full.items()}
        tensors |= {f"ema/{k}": v for k, v in ema_full.items()}
        tensors |= {f"optim/{n}/{k}": v for n, e in optim["state"].items() for k, v in e.items()
                    if torch.is_tensor(v)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _worker(rank: int, world: int, root: str) -> None:
    from pipelines import parallel
    from pipelines.train_loop import build_model, full_model_state, restore_checkpoint, save_checkpoint

    root = Path(root)
    cpu = torch.device("cpu")
    shard = lambda m: parallel.apply_fsdp(m, cpu, bf16=False)
    import lance_model.encoders.vit  # noqa: F401  (its import is not part of a load)

    rss = {}
    for name, cfg in stages(root).items():
        before = reset_peak_host_rss()  # freed memory handed back, so the next load starts low
        model = build_model(cfg, device=cpu, prepare=shard)
        rss[name] = peak_host_rss_mib() - before
        full = full_model_state(model)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full.items()}, str(root / f"sharded_{name}.safetensors"))
        del model, full
    (root / f"rss_rank{rank}.json").write_text(json.dumps(rss))

    # 1 -> 2: restore the one-worker checkpoint onto two ranks, then train a step and save (2 -> 1)
    cfg = stages(root)["preset"]
    model = build_model(cfg, device=cpu, prepare=shard)
    params, opt, sched, ema = trainer_parts(model, cfg)
    step = restore_checkpoint(root / "ckpt_world1", model, opt, sched, ema, None, rank)
    dump_full(model, opt, ema, root / "restored_on_2.safetensors", rank)
    train_step(model, params, opt, sched, ema, world)
    target = root / ("ckpt_world2" if rank == 0 else f"ckpt_world2_rank{rank}")
    save_checkpoint(target, step, model, model.config, opt, sched, ema, None, rank, world)


def make_qwen_dir(directory: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2_5_VLConfig(
        text_config={**TINY_TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        vision_config=TINY_VISION, tie_word_embeddings=True)
    torch.manual_seed(1)
    transformers.Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(directory)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """Unsharded references built here; the 2-rank FSDP2 run in spawned processes."""
    from pipelines.train_loop import build_model, save_checkpoint

    root = tmp_path_factory.mktemp("sharded")
    make_qwen_dir(root / "qwen")
    build_model(stage(model={"overrides": {**WIDE, "ce_weight": 3.0}}, seed=11)).save_pretrained(root / "lance")
    refs = {}
    for name, cfg in stages(root).items():
        model = build_model(cfg)
        refs[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = stages(root)["preset"]
    model = build_model(cfg)
    params, opt, sched, ema = trainer_parts(model, cfg)
    train_step(model, params, opt, sched, ema, 1)
    save_checkpoint(root / "ckpt_world1", 0, model, model.config, opt, sched, ema, None, 0, 1)
    del model, opt, ema
    spawn_gloo(_worker, 2, str(root))
    # Ray Train merges every rank's share into one checkpoint directory; do the same here
    shutil.copy(root / "ckpt_world2_rank1" / "manifest.rank1.json", root / "ckpt_world2" / "manifest.rank1.json")
    return root, refs


@pytest.mark.parametrize("name", ["preset", "lance", "qwen"])
def test_sharded_load_equals_the_full_load(sharded_run, name):
    root, refs = sharded_run
    sharded = load_file(str(root / f"sharded_{name}.safetensors"))
    full = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in refs[name].items()}
    assert sharded.keys() == full.keys()
    for k in full:
        assert torch.equal(sharded[k], full[k]), k


def test_full_load_matches_its_sources(sharded_run):
    from lance_model import Lance
    from lance_model.checkpoint import read_tensors
    from lance_model.heads import sincos_3d_table
    from pipelines.train_loop import position_table_rows

    root, refs = sharded_run
    stored = read_tensors(root / "lance" / "model.safetensors")
    assert all(torch.equal(refs["lance"][k], v) for k, v in stored.items())
    # Qwen2.5-VL: every tensor the checkpoint provides (gen expert from its und twin, head from the
    # tied embedding) equals Lance.from_qwen25vl's; only the fresh ones differ (their own seeds)
    official = Lance.from_qwen25vl(root / "qwen")
    report = official.qwen_init_report
    provided = [k for k in official.state_dict() if k not in report.missing and k != "latent_pos_embed.pos_embed"]
    assert len(provided) > 60 and "language_model.model.layers.1.mlp_moe_gen.up_proj.weight" in provided
    for k in provided:
        assert torch.equal(refs["qwen"][k], official.state_dict()[k]), k
    assert "vae2llm.weight" in report.missing
    table = sincos_3d_table(17, 32, 512)
    assert torch.equal(refs["preset"]["latent_pos_embed.pos_embed"], table)
    assert torch.equal(position_table_rows(17, 32, 512, 5000, 9001, chunk=1000), table[5000:9001])
    # the preset is initialised per tensor: normal(0, 0.02) matrices, ones for norms, zeros for biases
    w = refs["preset"]["language_model.model.layers.3.mlp.up_proj.weight"]
    assert w.shape == (2048, 512) and abs(float(w.std()) - 0.02) < 1e-3
    assert torch.equal(refs["preset"]["language_model.model.layers.3.input_layernorm.weight"], torch.ones(512))


def test_host_memory_per_rank_is_bounded_by_its_shard(sharded_run):
    root, refs = sharded_run
    assert refs["preset"].keys() == refs["lance"].keys()  # the same architecture, from a file this time
    full_mb = sum(v.numel() * v.element_size() for v in refs["preset"].values()) / 2 ** 20
    largest_mb = max(v.numel() * v.element_size() for v in refs["preset"].values()) / 2 ** 20
    for rank in range(2):
        rss = json.loads((root / f"rss_rank{rank}.json").read_text())
        print(f"rank {rank}: model {full_mb:.0f} MiB, largest tensor {largest_mb:.0f} MiB, peak RSS growth "
              f"preset {rss['preset']:.0f} MiB, from checkpoint {rss['lance']:.0f} MiB")
        # its half of the model plus one tensor (and allocator slack), never the whole model
        assert 0.8 * full_mb / 2 < rss["preset"] < full_mb / 2 + largest_mb + 40, rss
        assert 0.8 * full_mb / 2 < rss["lance"] < full_mb / 2 + largest_mb + 40, rss


def test_resume_on_another_world_size_reshards_model_optimizer_and_ema(sharded_run):
    from lance_model.checkpoint import read_tensors
    from lance_platform.checkpoint import read_optimizer_state, verify
    from pipelines.train_loop import build_model, restore_checkpoint

    root, _ = sharded_run
    # 1 -> 2: the two ranks restored exactly what one worker saved
    saved = root / "ckpt_world1"
    restored = load_file(str(root / "restored_on_2.safetensors"))
    model_file, ema_file = read_tensors(saved / "model.safetensors"), read_tensors(saved / "ema.safetensors")
    optim = read_optimizer_state(saved)["state"]
    for k, v in model_file.items():
        assert torch.equal(restored[f"model/{k}"], v), k
    ema_keys = [k for k in restored if k.startswith("ema/")]
    assert ema_keys and all(torch.equal(restored[k], ema_file[k[4:]]) for k in ema_keys)
    exp = [(n, k) for n, e in optim.items() for k, v in e.items() if torch.is_tensor(v) and v.dim()]
    assert exp and all(torch.equal(restored[f"optim/{n}/{k}"], optim[n][k]) for n, k in exp)

    # 2 -> 1: one worker restores the two-rank checkpoint; its state equals the files, and one more
    # step from it equals the step the single worker takes from the same state
    two = root / "ckpt_world2"
    assert verify(two)["parts"] == ["manifest.rank1.json"]
    cfg = stages(root)["preset"]
    model = build_model(cfg)
    params, opt, sched, ema = trainer_parts(model, cfg)
    step = restore_checkpoint(two, model, opt, sched, ema, None, 0)
    assert step == 2 and sched.last_epoch == 2  # one step before the save, one after
    sd = model.state_dict()
    for k, v in read_tensors(two / "model.safetensors").items():
        assert torch.equal(sd[k], v), k
    named = read_optimizer_state(two)["state"]
    for n, entry in named.items():
        state = opt.state[dict(model.named_parameters())[n]]
        for key, v in entry.items():
            assert torch.equal(state[key], v), (n, key)
    ema_two = read_tensors(two / "ema.safetensors")
    assert all(torch.equal(ema.shadow[n], ema_two[n]) for n in ema.shadow)
    # the two-rank step moved the weights by what a single worker's step does from the same state
    one = build_model(cfg)
    p1, o1, s1, e1 = trainer_parts(one, cfg)
    restore_checkpoint(saved, one, o1, s1, e1, None, 0)
    train_step(one, p1, o1, s1, e1, 1)
    for k, v in one.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def test_qwen25vl_init_applies_compatible_overrides_and_refuses_architecture_ones(sharded_run, tmp_path):
    from pipelines.train_loop import build_model, model_source

    root, refs = sharded_run
    source = model_source(stages(root)["qwen"])
    assert source.config.ce_weight == 0.25 and source.config.text.hidden_size == 64  # shape from the checkpoint
    bad = stage(init={"kind": "qwen25vl", "path": str(root / "qwen")},
                model={"overrides": {"ce_weight": 0.5, "text": {"hidden_size": 128}, "vit": {"depth": 3}}})
    with pytest.raises(ConfigError, match=r"^model\.overrides=.*no override of text, vit for init\.kind='qwen25vl'"):
        bad.validate(require_shards=False)
    with pytest.raises(ConfigError, match=r"text, vit cannot be overridden for init\.kind='qwen25vl'"):
        build_model(bad)
    with pytest.raises(ConfigError, match=r"model\.overrides\.ce_weight"):
        model_source(stage(init={"kind": "qwen25vl", "path": str(root / "qwen")},
                           model={"overrides": {"ce_weight": "much"}}))

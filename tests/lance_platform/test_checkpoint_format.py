"""The one training-state checkpoint format (lance_platform.checkpoint): round trips, training <->
RL both ways, verification with fallback, strict loading, and no code run from crafted files.
Tiny model on CPU, no Ray."""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lance_model import Lance, LanceConfig
from lance_model.checkpoint import CheckpointError
from lance_platform import checkpoint as ckpt
from lance_platform.config import load_config


def tiny(seed: int) -> Lance:
    model = Lance(LanceConfig.from_preset("tiny"))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


def adamw(model: torch.nn.Module, lr: float = 1e-3, reverse: bool = False) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params[::-1] if reverse else params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)


def take_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def write(directory: Path, model: Lance, optimizer, step: int, **kw) -> Path:
    return ckpt.save(directory, step, config=model.config, model_state=model.state_dict(),
                     optimizer_state=ckpt.optimizer_state_by_name(model, optimizer), **kw)


def rewrite_manifest(directory: Path) -> None:
    """What an attacker with write access would do after altering a file: make the manifest match."""
    manifest = json.loads((directory / ckpt.MANIFEST).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = ckpt._describe(directory / name)
    (directory / ckpt.MANIFEST).write_text(json.dumps(manifest))


def by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    return ckpt.optimizer_state_by_name(model, optimizer)["state"]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


def assert_same_optimizer(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert a.keys() == b.keys() and a
    for name, entry in a.items():
        assert entry.keys() == b[name].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in entry.items():
            torch.testing.assert_close(b[name][key], value, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- round trip
def test_round_trip_model_ema_optimizer_and_trainer_state(tmp_path):
    model = tiny(0)
    optimizer = adamw(model)
    take_steps(model, optimizer, 3, seed=1)
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    d = write(tmp_path / "step-000003", model, optimizer, 3, ema_state=ema,
              trainer_state={"scheduler": {"last_epoch": 3, "base_lrs": [1e-3]}})

    manifest = ckpt.verify(d)
    assert manifest["step"] == 3 and manifest["parts"] == []
    for name, entry in manifest["files"].items():  # every file, its real size
        assert (d / name).stat().st_size == entry["size"] > 0
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json",
            "trainer_state.json", "lance_config.json", "llm_config.json"} == set(manifest["files"])
    assert not list(tmp_path.glob("*.tmp"))
    stored = load_file(str(d / ckpt.OPTIMIZER_TENSORS))  # keyed by parameter name
    assert "language_model.model.layers.0.mlp.up_proj.weight/exp_avg" in stored

    fresh = tiny(7)
    fresh_opt = adamw(fresh, lr=5.0)
    state = ckpt.restore(d, fresh, fresh_opt)
    assert state["step"] == 3 and state["scheduler"] == {"last_epoch": 3, "base_lrs": [1e-3]}
    assert_same_weights(model, fresh)
    assert_same_optimizer(by_name(model, optimizer), by_name(fresh, fresh_opt))
    assert fresh_opt.param_groups[0]["lr"] == 1e-3 and list(fresh_opt.param_groups[0]["betas"]) == [0.9, 0.95]
    ema_back = ckpt.read_model_state(d, ckpt.EMA_FILE)
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(ema_back[key], ema[key], rtol=0, atol=0)

    # The restored pair continues exactly as the original would.
    take_steps(model, optimizer, 2, seed=9)
    take_steps(fresh, fresh_opt, 2, seed=9)
    assert_same_weights(model, fresh)
    # ...and the directory is still a plain Lance checkpoint of the weights it holds.
    loaded = Lance.from_pretrained(d, weights="model")
    saved = ckpt.read_model_state(d)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())


def test_optimizer_state_maps_by_name_not_position(tmp_path):
    model = tiny(0)
    optimizer = adamw(model)
    take_steps(model, optimizer, 2, seed=3)
    d = write(tmp_path / "c", model, optimizer, 2)
    other = tiny(0)
    reordered = adamw(other, reverse=True)  # the same parameters, in the opposite order
    ckpt.restore(d, other, reordered)
    assert_same_optimizer(by_name(model, optimizer), by_name(other, reordered))
    first = reordered.param_groups[0]["params"][0]
    name = next(n for n, p in other.named_parameters() if p is first)
    torch.testing.assert_close(reordered.state[first]["exp_avg"], by_name(model, optimizer)[name]["exp_avg"])


# ---------------------------------------------------------------------------------------- training <-> RL
def rl_trainer(tmp_path: Path, *overrides: str):
    from rl.config import RLConfig
    from rl.trainer import GrpoTrainer

    config = Path(__file__).resolve().parents[2] / "configs" / "rl" / "grpo_ocr.yaml"
    cfg = load_config(RLConfig, config, [f"workdir={tmp_path / 'rl'}", "rollout.steps=3", "rollout.eval_steps=3",
                                         "prompts.eval_synthetic=0", "rollout.height=32", "rollout.width=32",
                                         "policy.device=cpu", *overrides])
    return GrpoTrainer(cfg, reward_pool=object())  # no rewards are scored here: no Ray


def training_checkpoint(tmp_path: Path) -> tuple[Path, Lance, torch.optim.Optimizer]:
    from pipelines.config import load_stage_config
    from pipelines.train_loop import Ema, build_model, lr_factor, save_checkpoint

    stage = load_stage_config(None, ["steps=4", "ema_decay=0.5"], require_shards=False)
    model = build_model(stage, None)
    optimizer = adamw(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, stage))
    ema = Ema(model, stage.ema_decay)
    for i in range(2):
        take_steps(model, optimizer, 1, seed=i)
        ema.update(model)
        scheduler.step()
    d = save_checkpoint(tmp_path / "pt" / "checkpoint", 1, model, model.config, optimizer, scheduler, ema, None, 0, 1)
    return d, model, optimizer


def test_a_training_checkpoint_starts_and_resumes_an_rl_run(tmp_path):
    d, model, optimizer = training_checkpoint(tmp_path)
    assert ckpt.read_trainer_state(d)["step"] == 2
    trainer = rl_trainer(tmp_path, f"policy.checkpoint={d}", "policy.weights=model")
    assert_same_weights(model, trainer.policy)
    ema = ckpt.read_model_state(d, ckpt.EMA_FILE)
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ema[key], model.state_dict()[key])  # the EMA file is the averaged copy
    # RL resume semantics on a training checkpoint: the optimizer maps by name, the step carries over.
    trainer.restore(d)
    assert trainer.step == 2
    assert_same_optimizer(by_name(model, optimizer), by_name(trainer.policy, trainer.optimizer))


def test_an_rl_checkpoint_starts_a_training_stage(tmp_path):
    from pipelines.config import load_stage_config
    from pipelines.train_loop import build_model, lr_factor, restore_checkpoint

    trainer = rl_trainer(tmp_path)
    take_steps(trainer.policy, trainer.optimizer, 2, seed=5)
    trainer.step = 2
    d = trainer.save()
    assert d.name == "step-000002" and ckpt.verify(d)["step"] == 2

    stage = load_stage_config(None, ["init.kind=lance", f"init.path={d}", "init.weights=model"], require_shards=False)
    model = build_model(stage, None)
    assert_same_weights(trainer.policy, model)
    # Its optimizer state maps onto a training optimizer too; the missing scheduler is named.
    optimizer = adamw(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, stage))
    with pytest.raises(ckpt.InvalidCheckpointError, match="trainer_state.json.*scheduler"):
        restore_checkpoint(d, model, optimizer, scheduler, None, None, 0)
    assert_same_optimizer(by_name(trainer.policy, trainer.optimizer), by_name(model, optimizer))


# ---------------------------------------------------------------------------------------- verify + fallback
def test_truncated_newest_falls_back_to_the_previous_one_named_in_the_log(tmp_path, caplog):
    model = tiny(0)
    optimizer = adamw(model)
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        take_steps(model, optimizer, 1, seed=step)
        write(root / f"step-{step:06d}", model, optimizer, step)
    newest = root / "step-000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    (root / "step-000003.tmp").mkdir()  # an interrupted write is no candidate

    with pytest.raises(ckpt.InvalidCheckpointError, match="model.safetensors: size 1000 bytes") as err:
        ckpt.verify(root / "step-000002")
    assert err.value.path == newest
    with caplog.at_level(logging.WARNING, logger="lance_platform.checkpoint"):
        chosen, skipped = ckpt.latest_valid(root, "step-*")
    assert chosen == root / "step-000001"
    assert [s.path.name for s in skipped] == ["step-000002"]
    assert "step-000002" in caplog.text and str(newest) in caplog.text and "truncated" in caplog.text
    note = ckpt.fallback_note(chosen, skipped)
    assert "skipped step-000002" in note and note.endswith("resumed from step-000001")


@pytest.mark.parametrize("damage, bad, message", [
    ("no_manifest", "manifest.json", "not completely written"),
    ("header", "model.safetensors", "safetensors header"),
    ("flip", "optimizer.safetensors", "sha256 differs"),
    ("missing", "optimizer.json", "is missing"),
    ("part", "manifest.rank1.json", "not completely written"),
])
def test_verify_names_the_bad_file(tmp_path, damage, bad, message):
    model = tiny(0)
    optimizer = adamw(model)
    take_steps(model, optimizer, 1, seed=0)
    d = write(tmp_path / "c", model, optimizer, 1, parts=2 if damage == "part" else 1)
    target = d / bad
    if damage == "no_manifest":
        target.unlink()
    elif damage == "header":  # same size, the header's length field destroyed
        raw = bytearray(target.read_bytes())
        raw[:8] = b"\xff" * 8
        target.write_bytes(bytes(raw))
    elif damage == "flip":  # same size, one data byte changed
        raw = bytearray(target.read_bytes())
        raw[-1] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "missing":
        target.unlink()
    with pytest.raises(ckpt.InvalidCheckpointError, match=message) as err:
        ckpt.verify(d)
    assert err.value.path == target


def test_a_written_rank_part_completes_the_checkpoint(tmp_path):
    model = tiny(0)
    optimizer = adamw(model)
    d = write(tmp_path / "c", model, optimizer, 1, parts=2)
    other = ckpt.save(tmp_path / "rank1" / "c", 1, part=1, parts=2,
                      write_extra=lambda t: (t / "data_state_rank1.json").write_text("{}"))
    for f in other.iterdir():  # what Ray Train does: every rank's files land in one directory
        f.rename(d / f.name)
    assert ckpt.verify(d)["parts"] == ["manifest.rank1.json"]
    (d / "data_state_rank1.json").write_text("{} ")
    with pytest.raises(ckpt.InvalidCheckpointError, match="data_state_rank1.json"):
        ckpt.verify(d)


# ---------------------------------------------------------------------------------------- strict loading
def test_a_missing_key_is_an_error_naming_it(tmp_path):
    model = tiny(0)
    optimizer = adamw(model)
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    state = {k: v for k, v in model.state_dict().items() if k != key}
    d = ckpt.save(tmp_path / "c", 1, config=model.config, model_state=state,
                  optimizer_state=ckpt.optimizer_state_by_name(model, optimizer))
    ckpt.verify(d)  # complete as written: only the key check can catch it
    with pytest.raises(CheckpointError, match=rf"1 missing key\(s\): {key}"):
        ckpt.restore(d, tiny(1), None)


def test_unexpected_keys_and_wrong_shapes_are_errors_naming_them():
    model = tiny(0)
    state = dict(model.state_dict())
    state["language_model.model.layers.9.extra.weight"] = torch.zeros(2)
    key = "llm2vae.weight"
    state[key] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): language_model\.model\.layers\.9\.extra\.weight"
                                              r".*shape mismatch\(es\): llm2vae\.weight \(checkpoint \(3, 3\)"):
        ckpt.load_model_state(tiny(1), state, "src")


def test_an_optimizer_of_other_parameters_is_refused_naming_them(tmp_path):
    model = tiny(0)
    optimizer = adamw(model)
    take_steps(model, optimizer, 1, seed=0)
    d = write(tmp_path / "c", model, optimizer, 1)
    other = tiny(0)
    frozen = "language_model.model.layers.0.mlp.up_proj.weight"
    params = [p for n, p in other.named_parameters() if p.requires_grad and n != frozen]
    with pytest.raises(CheckpointError, match=rf"1 unexpected parameter\(s\): {frozen}"):
        ckpt.restore(d, other, torch.optim.AdamW(params))


# ---------------------------------------------------------------------------------------- no pickle
class _Payload:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_pickles_run_no_code_on_resume(tmp_path):
    marker = tmp_path / "code_ran"
    payload = pickle.dumps(_Payload(marker))
    model = tiny(0)
    optimizer = adamw(model)
    take_steps(model, optimizer, 1, seed=0)
    d = write(tmp_path / "c", model, optimizer, 1)
    # Where the old formats kept pickles: torch.distributed.checkpoint's metadata and torch.save'd state.
    (d / "optim").mkdir()
    (d / "optim" / ".metadata").write_bytes(payload)
    (d / "trainer_state.pt").write_bytes(payload)
    fresh = tiny(3)
    fresh_opt = adamw(fresh)
    assert ckpt.restore(d, fresh, fresh_opt)["step"] == 1  # loads, never opening them
    assert_same_weights(model, fresh)
    assert not marker.exists()

    # A tampered optimizer file, manifest rewritten to match, fails to load instead of running code.
    for name, match in ((ckpt.OPTIMIZER_JSON, "optimizer.json: not valid JSON"),
                        (ckpt.OPTIMIZER_TENSORS, "optimizer.safetensors: safetensors header")):
        saved = (d / name).read_bytes()
        (d / name).write_bytes(payload)
        rewrite_manifest(d)
        with pytest.raises(ckpt.InvalidCheckpointError, match=match):
            ckpt.restore(d, tiny(3), adamw(tiny(3)))
        (d / name).write_bytes(saved)
    rewrite_manifest(d)
    # A well-formed JSON that smuggles an object where plain values belong is refused too.
    meta = json.loads((d / ckpt.OPTIMIZER_JSON).read_text())
    meta["param_groups"][0]["lr"] = {"py/reduce": [{"py/function": "builtins.open"}, [str(marker), "w"]]}
    (d / ckpt.OPTIMIZER_JSON).write_text(json.dumps(meta))
    rewrite_manifest(d)
    with pytest.raises(ckpt.InvalidCheckpointError, match="param group 0: unsupported value"):
        ckpt.restore(d, tiny(3), adamw(tiny(3)))
    assert not marker.exists()


def test_manifest_entries_cannot_point_outside_the_checkpoint(tmp_path):
    model = tiny(0)
    d = ckpt.save(tmp_path / "c", 0, config=model.config, model_state=model.state_dict())
    manifest = json.loads((d / ckpt.MANIFEST).read_text())
    manifest["files"]["../outside.bin"] = {"size": 1, "sha256": "0" * 64}
    (d / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.InvalidCheckpointError, match="bad manifest entry '../outside.bin'"):
        ckpt.verify(d)


def test_load_paths_never_unpickle():
    """Every torch.load in the packages passes weights_only=True; no pickle or dcp.load in load paths."""
    root = Path(__file__).resolve().parents[2]
    offenders = []
    for package in ("lance_model", "lance_platform", "pipelines", "rl", "data_curation", "jobs"):
        for path in (root / package).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if ("torch.load(" in code and "weights_only=True" not in code) or "import pickle" in code \
                        or "pickle.load" in code or "dcp.load" in code:
                    offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert offenders == []


def test_non_json_trainer_state_is_refused_at_write(tmp_path):
    model = tiny(0)
    with pytest.raises(CheckpointError, match="trainer_state.json: state is not JSON-able"):
        ckpt.save(tmp_path / "c", 0, config=model.config, model_state=model.state_dict(),
                  trainer_state={"rng": torch.get_rng_state()})
    save_file({}, str(tmp_path / "empty.safetensors"))
    ckpt.check_safetensors_header(tmp_path / "empty.safetensors")  # an empty optimizer state is valid


def test_a_training_worker_resumes_from_the_newest_valid_checkpoint_of_its_run(tmp_path, caplog):
    from types import SimpleNamespace

    from pipelines.train_loop import resume_directory

    model = tiny(0)
    optimizer = adamw(model)
    run = tmp_path / "ray" / "pt"
    older = write(run / "checkpoint_2026-01-01_00-00-01.000001", model, optimizer, 2)
    newest = write(run / "checkpoint_2026-01-01_00-00-02.000001", model, optimizer, 4, parts=2)  # rank 1 never landed
    local = SimpleNamespace(type_name="local")
    assert resume_directory(SimpleNamespace(path=str(older), filesystem=local)) == (older, None)

    with caplog.at_level(logging.WARNING):
        chosen, note = resume_directory(SimpleNamespace(path=str(newest), filesystem=local))
    assert chosen == older
    assert f"skipped {newest.name}" in note and "manifest.rank1.json" in note and note.endswith(older.name)
    assert "manifest.rank1.json" in caplog.text

    (older / ckpt.MODEL_FILE).write_bytes(b"")
    chosen, note = resume_directory(SimpleNamespace(path=str(newest), filesystem=local))
    assert chosen is None and note.endswith("no valid checkpoint: started from the initial weights")
    # Remote storage: no siblings to fall back to; the caller verifies the downloaded copy.
    assert resume_directory(SimpleNamespace(path="bucket/pt/checkpoint_x", filesystem=SimpleNamespace(type_name="s3"))) \
        == (None, None)

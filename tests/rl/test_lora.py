"""GRPO with LoRA adapters (peft) on a `tiny` policy, no Ray: only the adapters train, the
reference is the base with adapters disabled (no second copy), the first inner step's ratio is
exactly 1, KL > 0 after an update and 0 with adapters disabled; adapter-only checkpoints resume;
merged weights give the velocity of base + adapters."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch import nn

from lance_model import Lance
from lance_model.checkpoint import CheckpointError, read_tensors
from lance_model.config import LanceConfig
from lance_platform import checkpoint as ckpt
from lance_platform import lora
from lance_platform.config import load_config
from rl.config import PolicyConfig, RLConfig
from rl.rollout import transition_log_prob
from rl.trainer import GrpoTrainer, build_policy, merge_lora_checkpoint

RANK = 4
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "rl" / "grpo_ocr.yaml"


class NoRewards:
    restarts = 0

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A LoRA trainer, one rollout micro-batch, and the first update's stats (shared: builds are slow)."""
    workdir = tmp_path_factory.mktemp("lora")

    def make(*extra: str) -> GrpoTrainer:
        cfg = load_config(RLConfig, CONFIG, [f"workdir={workdir}", "rollout.steps=2", "reward.num_actors=1",
                                                     "rollout.microbatch=4", "rollout.group_size=4", "optim.lr=1e-2",
                                                     "policy.device=cpu", "lora.enabled=true", f"lora.rank={RANK}",
                                                     "lora.alpha=8", "grpo.beta=0.04", *extra])
        return GrpoTrainer(cfg, reward_pool=NoRewards())

    trainer = make()
    base_before = {k: v.clone() for k, v in trainer.policy.state_dict().items() if ".lora_" not in k}
    prompts, seeds, steps = trainer.pick()
    traj = trainer.worker.rollout(prompts[:4], seeds[:4], steps)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    first = trainer.update([traj], adv, torch.ones(4, dtype=torch.bool))
    return {"trainer": trainer, "traj": traj, "adv": adv, "first": first, "base_before": base_before, "make": make,
            "workdir": workdir}


def _means(trainer, model, traj, disabled: bool = False) -> list[torch.Tensor]:
    """The SDE step means of every trained transition under `model` (adapters off if `disabled`)."""
    out = []
    with torch.no_grad(), (lora.adapters_disabled(model) if disabled else contextlib.nullcontext()):
        session = trainer.worker.session(model, traj.samples, use_cache=False)
        for j in traj.sde_steps:
            _, mean, _ = transition_log_prob(session, traj.latents[j], traj.latents[j + 1], float(traj.timesteps[j]),
                                             float(traj.timesteps[j + 1]), trainer.options.noise_level)
            out.append(mean)
    return out


def test_adapters_wrap_the_generation_expert_only_and_bad_targets_are_named():
    model = Lance(LanceConfig.from_preset("tiny"))
    layers = model.config.text.num_hidden_layers
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = lora.add_adapters(model, lora.LoraConfig(enabled=True, rank=RANK, alpha=8))
    assert len(names) == 7 * layers and all("_moe_gen" in n for n in names)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == sum(RANK * (i + o) for i, o in (shapes[n] for n in names))
    assert all(float(layer.lora_B["default"].weight.detach().abs().max()) == 0 for layer in lora.lora_layers(model).values())
    with pytest.raises(lora.LoraError, match="already has LoRA"):
        lora.add_adapters(model, lora.LoraConfig(enabled=True))

    fresh = Lance(LanceConfig.from_preset("tiny"))
    with pytest.raises(lora.LoraError, match="'nope_proj' matches no module"):
        lora.add_adapters(fresh, lora.LoraConfig(enabled=True, targets=("q_proj_moe_gen", "nope_proj")))
    with pytest.raises(lora.LoraError, match="input_layernorm_moe_gen.*not an nn.Linear"):
        lora.add_adapters(fresh, lora.LoraConfig(enabled=True, targets=("input_layernorm_moe_gen",)))
    assert not lora.has_adapters(fresh)  # nothing wrapped when a target is wrong


def test_only_adapters_train_against_the_base_with_no_second_copy(lora_setup):
    trainer, first = lora_setup["trainer"], lora_setup["first"]
    assert trainer.reference is None and trainer.reference_model is trainer.policy
    # one copy of the weights: the trainer and its rollout worker hold the one policy module
    modules = [v for v in vars(trainer).values() if isinstance(v, nn.Module)] + [trainer.worker.model]
    assert modules and all(m is trainer.policy for m in modules)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in trainer.policy.named_parameters() if ".lora_" in n}

    assert first.optimizer_steps == 1 and first.first_ratio_max_dev == 0.0
    assert first.ratio_min == first.ratio_max == 1.0 and first.kl == 0.0
    after = trainer.policy.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in lora_setup["base_before"].items())  # the base is untouched
    moved = [float(layer.lora_B["default"].weight.detach().abs().max()) for layer in lora.lora_layers(trainer.policy).values()]
    assert max(moved) > 0


def test_kl_is_positive_after_an_update_and_zero_with_adapters_disabled(lora_setup):
    trainer, traj = lora_setup["trainer"], lora_setup["traj"]
    # adapters disabled == an independently built base, bit for bit: the reference KL is exactly 0
    base = build_policy(PolicyConfig(preset="tiny", device="cpu"), trainer.cfg.seed, torch.device("cpu")).eval()
    for off, ref in zip(_means(trainer, trainer.policy, traj, disabled=True), _means(trainer, base, traj)):
        assert torch.equal(off, ref)
    # with adapters on, the policy has moved: the next update's KL is the hand-computed one, > 0
    std = [transition_log_prob(trainer.worker.session(base, traj.samples, use_cache=False), traj.latents[j],
                               traj.latents[j + 1], float(traj.timesteps[j]), float(traj.timesteps[j + 1]),
                               trainer.options.noise_level)[2] for j in traj.sde_steps]
    gaps = [((mu.double() - ref.double()) ** 2 / (2 * torch.as_tensor(s).double() ** 2)).flatten(1).mean(1).mean().item()
            for mu, ref, s in zip(_means(trainer, trainer.policy, traj), _means(trainer, base, traj), std)]
    expected = sum(gaps) / len(gaps)
    stats = trainer.update([traj], lora_setup["adv"], torch.ones(4, dtype=torch.bool))
    assert expected > 0 and stats.kl == pytest.approx(expected, rel=1e-4)
    assert lora.has_adapters(trainer.policy) and all(p.requires_grad for p in trainer.params)  # re-enabled


def test_adapter_checkpoint_resumes_and_merges_to_the_velocity_of_base_plus_adapters(lora_setup, tmp_path):
    trainer, traj = lora_setup["trainer"], lora_setup["traj"]
    trainer.step = 1
    path = trainer.save()
    ckpt.verify(path)
    saved = read_tensors(path / ckpt.MODEL_FILE)
    assert saved.keys() == lora.adapter_state(trainer.policy).keys()
    assert len(saved) == 2 * len(lora.lora_layers(trainer.policy)) and all(".lora_" in k for k in saved)
    record = ckpt.read_trainer_state(path)["lora"]
    assert record["base"] == {"checkpoint": None, "weights": "auto", "preset": "tiny", "seed": trainer.cfg.seed}
    assert record["rank"] == RANK

    # resume: a fresh trainer gets the same adapters and optimizer state
    again = lora_setup["make"]()
    again.restore(path)
    assert again.step == 1
    for k, v in lora.adapter_state(again.policy).items():
        assert torch.equal(v, saved[k])
    names = dict(again.policy.named_parameters())
    mine = dict(trainer.policy.named_parameters())
    for n, p in names.items():
        if ".lora_" in n:
            torch.testing.assert_close(again.optimizer.state[p]["exp_avg"], trainer.optimizer.state[mine[n]]["exp_avg"])

    # the adapter shape is checked on resume
    other = lora_setup["make"]("lora.rank=2")
    with pytest.raises(CheckpointError, match=r"rank saved 4, now 2"):
        other.restore(path)
    with pytest.raises(CheckpointError, match="missing adapter tensor"):
        lora.load_adapter_state(other.policy, {}, "empty")

    # merge: the official layout, loadable as a plain Lance, with the velocity of base + adapters
    merged = merge_lora_checkpoint(path, tmp_path / "merged")
    ckpt.verify(merged)
    plain = Lance.from_pretrained(merged).eval()
    assert not any(".lora_" in k or "base_layer" in k for k in plain.state_dict())
    for with_adapters, folded in zip(_means(trainer, trainer.policy, traj), _means(trainer, plain, traj)):
        torch.testing.assert_close(folded, with_adapters, rtol=1e-5, atol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(_means(trainer, plain, traj),
                                                          _means(trainer, trainer.policy, traj, disabled=True))) > 0

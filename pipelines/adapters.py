"""LoRA adapters in a training stage (`lora.enabled` in the stage config; `lance_platform.lora`).

The adapters are added to the model on the meta device, before compile, activation checkpointing
and FSDP2 wrap it (`train_loop.build_model`), so they are sharded with their layers. Every base
weight is frozen; only adapter parameters reach the optimizer and the EMA. The base is filled from
the stage's `init` as without LoRA (a parameter `<module>.base_layer.weight` reads the checkpoint's
`<module>.weight`); the adapters get peft's init, drawn per tensor from the stage seed
(`lora_A` Kaiming-uniform, `lora_B` zero, so the wrapped model starts exactly at the base).

Checkpoints written during the stage hold the adapters alone: `model.safetensors` (and
`ema.safetensors` with EMA) keyed `<module>.lora_{A,B}.weight` (peft's saved-adapter names, the
GRPO adapter files' layout), the optimizer state of the adapters, the scheduler, the data position
and a `lora` record in `trainer_state.json` (the base: init kind, path, weights, preset, seed,
overrides; rank, alpha, targets). A worker resumes from one by rebuilding the base from `init` and
loading the adapters strictly, each rank only its shards' rows. At the end of the stage the driver
exports the last one to `<stage>/adapters` and folds it into the base, writing the full merged
checkpoint to `<stage>/final` (`merge_adapters`, called by `pipelines.trainer`), which the next
stage and `generate` read as they read any final checkpoint.

Names here are plain parameter names (`lance_platform.checkpoint.plain_name`: no activation
checkpointing wrapper prefix), so checkpoints do not depend on how the model was wrapped.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lance_model.checkpoint import CheckpointError, SlicedReader, index_safetensors
from lance_model.config import LanceConfig
from lance_platform import checkpoint as ckpt
from lance_platform import lora
from lance_platform.checkpoint import plain_name
from lance_platform.config import ConfigError

from . import parallel
from .config import StageConfig

log = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"  # <stage>/adapters: the exported adapter checkpoint of a LoRA stage
RECORD_KEY = "lora"  # trainer_state.json of an adapter checkpoint
MERGED_KEY = "merged_lora"  # trainer_state.json of the merged checkpoint (not an adapter checkpoint)
_BASE_LAYER = ".base_layer."
_ADAPTER_SEGMENT = f".{lora.ADAPTER}."


def is_adapter(name: str) -> bool:
    """A LoRA parameter (`...lora_A.default.weight`, `...lora_B.default.weight`)."""
    return ".lora_" in name


def base_key(name: str) -> str:
    """A model parameter's key in the base model's layout (peft's `.base_layer` dropped)."""
    return plain_name(name).replace(_BASE_LAYER, ".")


def saved_key(name: str) -> str:
    """An adapter parameter's key in an adapter checkpoint (`<module>.lora_A.weight`)."""
    return plain_name(name).replace(_ADAPTER_SEGMENT, ".")


def adapter_items(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(saved key, parameter) of every adapter tensor, in parameter order (sharded or not)."""
    return [(saved_key(n), p) for n, p in model.named_parameters() if is_adapter(n)]


def init_adapter(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """peft's init of one adapter tensor: `lora_A` Kaiming-uniform (a = sqrt 5), `lora_B` zeros."""
    out = torch.zeros(shape)
    if ".lora_A." in name:
        torch.nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=generator)
    elif ".lora_B." not in name:
        raise ValueError(f"{name} is not a LoRA adapter tensor")
    return out


def add_stage_adapters(model: torch.nn.Module, stage: StageConfig) -> list[str]:
    """Wrap the stage's LoRA targets (on any device, the meta device included); `ConfigError`
    naming `lora.targets` when a target matches no Linear layer."""
    try:
        return lora.add_adapters(model, stage.lora)
    except lora.LoraError as exc:
        raise ConfigError(str(exc), "lora.targets") from None


def check_targets(stage: StageConfig, config: LanceConfig) -> list[str]:
    """In the driver, before Ray starts: the targets select Linear layers of the stage's model
    (`config`, built on the meta device: no weight is read). Says in the log when the base has no
    pretrained weights (`init.kind=preset`: the adapters train on a random init). Returns the
    wrapped module names."""
    from lance_model import Lance

    with torch.device("meta"):
        model = Lance(config)
    names = add_stage_adapters(model, stage)
    if stage.init.kind == "preset":
        log.warning("stage %s: LoRA on init.kind=preset: the base has no pretrained weights, so the adapters "
                    "train on a randomly initialised model (set init.kind=lance and init.path to fine-tune a "
                    "released checkpoint)", stage.name)
    log.info("stage %s: LoRA rank %d on %d modules, base weights frozen", stage.name, stage.lora.rank, len(names))
    return names


def adapter_record(stage: StageConfig, init_path: str | None = None) -> dict[str, Any]:
    """What an adapter checkpoint needs to be resumed or merged: its base and the adapter shape."""
    path = init_path or stage.init.path
    base = {"kind": stage.init.kind, "path": str(Path(path).resolve()) if path and stage.init.kind != "preset" else None,
            "weights": stage.init.weights, "preset": stage.model.preset, "seed": stage.seed,
            "overrides": dict(stage.model.overrides)}
    a = stage.lora
    return {"base": base, "rank": a.rank, "alpha": a.alpha, "targets": list(a.targets)}


def check_record(saved: Any, mine: Mapping[str, Any], directory: Path) -> None:
    """The checkpoint's `lora` record is this stage's (same base and adapter shape)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{directory} holds no LoRA adapters (no '{RECORD_KEY}' in its trainer state), "
                              "but this stage trains adapters (lora.enabled)")
    diff = sorted(k for k in mine if saved.get(k) != mine[k])
    if diff:
        raise CheckpointError(f"{directory}: its LoRA {', '.join(diff)} differ from this stage's: "
                              + "; ".join(f"{k} saved {saved.get(k)!r}, now {mine[k]!r}" for k in diff))


def full_adapter_state(items: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """saved key -> full (unsharded) CPU tensor; collective under FSDP (all ranks call it)."""
    return {k: parallel.full_tensor(t.detach()).cpu() for k, t in items}


def load_adapter_file(items: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """Fill the given adapter tensors (saved key, tensor; sharded or not) from a safetensors file of
    adapters, strictly (a missing, unexpected or wrongly shaped tensor is a `CheckpointError`
    naming it), each rank reading only its rows."""
    path = Path(path)
    if not path.is_file():
        raise ckpt.InvalidCheckpointError(path, "file missing")
    refs = index_safetensors(path)
    expected = {k: tuple(t.shape) for k, t in items}
    ckpt.strict_model_state(expected, {k: torch.empty(r.shape, device="meta") for k, r in refs.items()},
                            str(path), tied=False)
    with SlicedReader() as reader:
        parallel.fill_local(items, lambda n, shape, a, b: reader.rows(refs[n], a, b))


def merge_adapters(model: torch.nn.Module, stage: StageConfig, adapters: str | Path, target: str | Path,
                   init_path: str | None = None) -> Path:
    """Fold an adapter checkpoint of `stage` into `model` (the stage's base with adapters, unsharded,
    as `train_loop.build_model` makes it) and write a full, verified checkpoint in the official
    layout to `target`: the model, and the EMA when the adapters have one (the base with the EMA
    adapters folded in). The record must be this stage's (`check_record`)."""
    adapters = Path(adapters)
    ckpt.verify(adapters)
    state = ckpt.read_trainer_state(adapters)
    check_record(state.get(RECORD_KEY), adapter_record(stage, init_path), adapters)
    items = adapter_items(model)
    load_adapter_file(items, adapters / ckpt.MODEL_FILE)
    merged = lora.merged_state(model)
    merged_ema = None
    if (adapters / ckpt.EMA_FILE).is_file():
        load_adapter_file(items, adapters / ckpt.EMA_FILE)
        merged_ema = lora.merged_state(model)
        load_adapter_file(items, adapters / ckpt.MODEL_FILE)  # the model keeps the trained adapters
    out = ckpt.save(target, int(state["step"]), config=model.config, model_state=merged, ema_state=merged_ema,
                    trainer_state={MERGED_KEY: {**state[RECORD_KEY], "adapters": str(adapters.resolve())}})
    log.info("stage %s: merged the LoRA adapters of %s into %s", stage.name, adapters, out)
    return out


def fold_state(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full state dict of a model with adapters (plain names, e.g. `train_loop.full_model_state`)
    in the base layout, each adapter folded into its weight (W + scale * B @ A, as `lora.merged_state`
    computes it on a module)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if is_adapter(key):
            continue
        if key.endswith(_BASE_LAYER + "weight"):
            module = key[:-len(_BASE_LAYER + "weight")]
            a, b = state[f"{module}.lora_A.{lora.ADAPTER}.weight"], state[f"{module}.lora_B.{lora.ADAPTER}.weight"]
            value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        out[base_key(key)] = value
    return out

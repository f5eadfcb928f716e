"""The per-worker training loop of a stage (run by Ray Train's `TorchTrainer` on every worker).

One step: pack -> global token counts -> loss -> (skip on NaN/Inf, on all ranks together) ->
backward -> clip -> AdamW -> LR schedule -> EMA. Randomness (mixture draws, CFG dropout, flow
timesteps and noise) is derived from (seed, step, rank), and the data position of every worker is
checkpointed, so a stage that fails and resumes from its last checkpoint reproduces the run that
did not fail.

Checkpoints (every `checkpoint_every` steps and at the end) are sharded and asynchronous
(`lance_platform.sharded_checkpoint`, under `<stage dir>/checkpoints`): every rank copies its own
shards of the model, EMA and optimizer state (by parameter name) to host memory and writes them in
a background thread while the next steps run, with its data state; rank 0 adds the scheduler
state and commits the directory once every rank's files are there. The driver exports the last
one to the full official layout (`pipelines.trainer`). A LoRA stage writes its adapters through
Ray Train's checkpoints in the full format instead. Nothing is unpickled on resume. A worker resuming from a
checkpoint that does not verify falls back to the newest one that does, naming the bad file in
the log and in the stage's MLflow run (`resume_fallback` tag); loading is strict.
Rank 0 alone writes to MLflow, reopening the stage's run by id after a restart.

The model is built on the meta device and wrapped there; every rank then fills only its own FSDP2
shards, tensor by tensor (`build_model`, `fill_model`); restoring reads the model and EMA the same
way. Each worker reads only its dealt rows of the shards and packs ahead of the step in a thread, or
in a forked process with `data.pack_process` (`pipelines.batching`); a checkpoint written by another
number of workers re-splits the data.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lance_model import Lance, LanceConfig
from lance_model.backbone import compile_layers
from lance_model.checkpoint import (
    POS_EMBED_KEY,
    SlicedReader,
    TensorRef,
    index_pretrained,
    index_qwen25vl,
    index_safetensors,
    official_llm_config,
    qwen25vl_sources,
    reset_buffers,
)
from lance_model.config import CONFIG_FILE, OFFICIAL_LLM_CONFIG_FILE
from lance_model.heads import sincos_1d
from lance_model.model import init_tensor
from lance_model.sequence import SequenceBuilder
from lance_model.tokenizer import load_tokenizer
from lance_platform import checkpoint as ckpt
from lance_platform import lora
from lance_platform.checkpoint import plain_name
from lance_platform.config import ConfigError, from_dict
from lance_platform.files import write_text_atomic
from lance_platform.sharded_checkpoint import (
    AsyncCheckpointWriter,
    Piece,
    ShardedCheckpoint,
    is_sharded,
    step_name,
)
from lance_platform.sharded_checkpoint import latest_valid as latest_valid_sharded

from . import adapters, parallel
from .batching import GroupStreams, Packer, Prefetcher, ProcessPrefetcher, ShardRows
from .config import MODEL_SECTIONS, StageConfig
from .profiling import StepProfiler

log = logging.getLogger(__name__)
PREFETCH_DEPTH = 2  # packs made ahead of the step


# ---------------------------------------------------------------------------------------- model
@dataclass
class ModelSource:
    """Where a stage's starting weights come from: the model config, the tensors a checkpoint
    provides (plain key -> safetensors location), and how the rest is filled."""

    config: LanceConfig
    refs: dict[str, TensorRef] = field(default_factory=dict)
    seed: int = 0  # random init of what the checkpoint does not provide
    fresh_ok: bool = True  # False: every tensor must come from the checkpoint (strict)
    qwen: bool = False  # Qwen2.5-VL: gen expert from its und twin, head from a tied embedding
    source: str = ""


def model_source(stage: StageConfig, init_path: str | None = None) -> ModelSource:
    """The stage's `init` and `model` sections as a `ModelSource` (headers read, no tensor).

    `preset`: `model.preset` with `model.overrides`, random init. `qwen25vl`: the text and ViT
    shapes come from the checkpoint, every other field from `model.preset` with `model.overrides`.
    `lance` / `previous`: the checkpoint's config with `model.overrides`. Those two kinds and
    `qwen25vl` refuse overrides of the architecture sections (`ConfigError` naming them)."""
    overrides = dict(stage.model.overrides)
    kind = stage.init.kind
    if kind == "preset":
        return ModelSource(LanceConfig.from_preset(stage.model.preset, **overrides), seed=stage.seed,
                           source=f"preset {stage.model.preset}")
    fixed = [k for k in MODEL_SECTIONS if k in overrides]
    if fixed:
        raise ConfigError(f"model.overrides: {', '.join(fixed)} cannot be overridden for init.kind={kind!r} "
                          "(the checkpoint fixes the architecture; override only top-level fields)", "model.overrides")
    path = init_path or stage.init.path
    if kind == "qwen25vl":
        base = LanceConfig.from_preset(stage.model.preset).with_overrides(overrides, "model.overrides.")
        config, refs, dropped = index_qwen25vl(path, base)
        if dropped:
            log.info("%s: %d tensor(s) Lance does not use", path, len(dropped))
        return ModelSource(config, refs, seed=stage.seed, qwen=True, source=str(path))
    config, refs, weights = index_pretrained(path, weights=stage.init.weights)
    ckpt.verify_if_managed(path)
    return ModelSource(config.with_overrides(overrides, "model.overrides."), refs, seed=stage.seed, fresh_ok=False,
                       source=str(weights))


def tensor_seed(seed: int, name: str) -> int:
    """A generator seed per (seed, tensor name): a tensor's random init does not depend on which
    other tensors were initialised before it, nor on how the model is sharded."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2 ** 63 - 1)


def position_table_rows(frames: int, size: int, hidden: int, start: int, stop: int,
                        chunk: int = 512) -> torch.Tensor:
    """Rows [start, stop) of `lance_model.heads.sincos_3d_table` (the same values), computed a chunk of
    rows at a time: a rank never builds the whole table, nor its float64 intermediates."""
    d = (hidden // 3) // 2 * 2
    dims = (d, d, hidden - 2 * d)
    out = torch.empty(max(stop - start, 0), hidden)
    for a in range(start, stop, chunk):
        rows = torch.arange(a, min(a + chunk, stop))
        axes = (rows // (size * size), rows // size % size, rows % size)
        out[a - start:a - start + len(rows)] = torch.cat([sincos_1d(n, x) for n, x in zip(dims, axes)], dim=1).float()
    return out


def fill_model(model: Lance, source: ModelSource, device: torch.device) -> list[str]:
    """Give every parameter of `model` (after `to_empty`, sharded or not) its value, tensor by
    tensor: read from the checkpoint (only this rank's rows), or a random init made one full tensor
    at a time and cut to this rank's rows; the latent position table and rotary buffers are
    computed. LoRA adapters (`pipelines.adapters`) get peft's init; their base layers read the base's
    keys. Returns the keys that got a random init."""
    named = [(plain_name(n), p) for n, p in model.named_parameters()]
    lora_params = [(n, p) for n, p in named if adapters.is_adapter(n)]
    params = [(adapters.base_key(n), p) for n, p in named if not adapters.is_adapter(n)]
    expected = {n: tuple(p.shape) for n, p in params}
    refs = source.refs
    if source.qwen:
        refs, _ = qwen25vl_sources(list(expected), refs)
    fresh = sorted(n for n in expected if n not in refs and n != POS_EMBED_KEY)
    if fresh and not source.fresh_ok:
        shapes = {k: torch.empty(r.shape, device="meta") for k, r in refs.items()}
        ckpt.strict_model_state(expected, shapes, source.source, model.config.text.tie_word_embeddings)
    unused = sorted(set(refs) - set(expected))
    if unused:
        log.warning("%s: %d tensor(s) the model does not have, ignored: %s", source.source, len(unused),
                    ", ".join(unused[:8]))
    wrong = [f"{k} (checkpoint {refs[k].shape}, model {s})" for k, s in expected.items() if k in refs
             and tuple(refs[k].shape) != s]
    if wrong:
        raise ckpt.CheckpointError(f"{source.source}: {len(wrong)} shape mismatch(es): {', '.join(wrong[:8])}")
    pe = model.latent_pos_embed

    with SlicedReader() as reader:
        def value(name: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
            if name == POS_EMBED_KEY:
                return position_table_rows(pe.frames, pe.size, pe.hidden, start, stop)
            if name in refs:
                return reader.rows(refs[name], start, stop)
            full = torch.empty(shape)
            init_tensor(name, full, generator=torch.Generator().manual_seed(tensor_seed(source.seed, name)))
            return full[start:stop] if full.dim() else full

        parallel.fill_local(params, value)
    parallel.fill_local(lora_params, lambda n, shape, a, b: adapters.init_adapter(
        n, shape, torch.Generator().manual_seed(tensor_seed(source.seed, n)))[a:b])
    reset_buffers(model, device)
    if fresh:
        log.info("%s: %d tensor(s) got a random init", source.source, len(fresh))
    return fresh


def build_model(stage: StageConfig, init_path: str | None = None, device: torch.device | str = "cpu",
                prepare: Callable[[Lance], None] | None = None) -> Lance:
    """The stage's starting model, built on the meta device; `prepare` (compile, activation
    checkpointing, FSDP2) wraps it there, then each rank allocates and fills only its own shards
    (`fill_model`): no rank ever holds the whole model. Without `prepare`, a plain model on
    `device`; the values do not depend on the sharding. With `lora.enabled` the adapters are added
    first (base frozen, `pipelines.adapters`)."""
    source = model_source(stage, init_path)
    with torch.device("meta"):
        model = Lance(source.config)
    if stage.lora_enabled:
        adapters.add_stage_adapters(model, stage)
    if prepare is not None:
        prepare(model)
    model.to_empty(device=torch.device(device))
    fill_model(model, source, torch.device(device))
    return model


def lr_factor(step: int, stage: StageConfig) -> float:
    o = stage.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(stage.steps - o.warmup_steps, 1)
    progress = min(max(step - o.warmup_steps, 0) / span, 1.0)
    floor = o.min_lr / o.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Ema:
    """Exponential moving average of the trainable parameters (sharded like them under FSDP)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {plain_name(n): p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow <- shadow + (1 - decay) (param - shadow), on the local shards in one foreach call
        (a DTensor op per parameter costs a Python dispatch each; the shards are what FSDP2 holds)."""
        shadows, params = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                shadows.append(_local(self.shadow[plain_name(n)]))
                local = _local(p.detach())
                params.append(local if local.dtype == torch.float32 else local.float())
        if shadows:
            torch._foreach_lerp_(shadows, params, 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {n: parallel.full_tensor(t).cpu() for n, t in self.shadow.items()}

    def load_file(self, path: Path, expected: dict[str, tuple[int, ...]], tied: bool) -> None:
        """Strictly load an EMA file (every model key, checked like the model's), each rank reading
        only its shards' rows."""
        refs = index_safetensors(path)
        ckpt.strict_model_state(expected, {k: torch.empty(r.shape, device="meta") for k, r in refs.items()},
                                str(path), tied)
        with SlicedReader() as reader:
            parallel.fill_local(self.shadow.items(), lambda n, shape, a, b: reader.rows(refs[n], a, b))


# ---------------------------------------------------------------------------------------- state
FINAL_METRICS = "final_metrics.json"


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def write_final_metrics(stage_dir: Path, metrics: dict) -> None:
    """The last step's metrics, beside the stage's sharded checkpoints (atomic)."""
    import json

    write_text_atomic(stage_dir / FINAL_METRICS,
                      json.dumps({k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()}))


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if sharded(model):  # FSDP2 also on a single GPU: DTensors, which have no storage of their own to write
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {plain_name(k): v for k, v in sd.items()}


def sharded(model: torch.nn.Module) -> bool:
    """True when FSDP2 holds the parameters as DTensor shards."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The name-keyed, unsharded optimizer state (collective under FSDP: rank 0 gets it, others {})."""
    if not sharded(model):
        return ckpt.optimizer_state_by_name(model, optimizer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not osd:
        return {}
    return {"state": {plain_name(k): v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [plain_name(n) for n in g["params"]]} for g in osd["param_groups"]]}


def save_checkpoint(directory: Path, step: int, model: Lance, config: LanceConfig, optimizer, scheduler,
                    ema: Ema | None, data_state: dict | None, rank: int, world: int) -> Path:
    """Every rank writes its share into its own `directory` (Ray Train merges them): rank 0 the
    model, EMA, optimizer and scheduler state, every rank its data state and part manifest.
    Collective under FSDP (all ranks call it). `step` is the step just done."""
    full = full_model_state(model)
    ema_full = ema.full_state() if ema is not None else None
    optim = full_optimizer_state(model, optimizer)
    return _save_parts(directory, step, data_state, rank, world, config=config, model_state=full,
                       ema_state={**full, **ema_full} if ema_full is not None else None, optimizer_state=optim,
                       trainer_state={"scheduler": scheduler.state_dict()})


def _save_parts(directory: Path, step: int, data_state: dict | None, rank: int, world: int, **rank0) -> Path:
    """Every rank's part of a gathered checkpoint: its data state (and part manifest); rank 0 also
    writes `rank0` (model, EMA, optimizer and trainer state)."""
    def write_data(tmp: Path) -> None:
        if data_state is not None:
            save_data_state(tmp, rank, data_state)

    if rank != 0:
        return ckpt.save(directory, step + 1, write_extra=write_data, part=rank, parts=world)
    return ckpt.save(directory, step + 1, write_extra=write_data, parts=world, **rank0)


def restore_checkpoint(directory: Path, model: Lance, optimizer, scheduler, ema: Ema | None, packer: Packer | None,
                       rank: int) -> int:
    """Strictly load a verified checkpoint (model, optimizer by name, EMA, scheduler, the data
    position); returns the step to continue from. The model and EMA are read tensor by tensor, each
    rank only its shards' rows; the full, name-keyed optimizer state reshards onto this run's
    parameters. The world size may differ from the one that wrote the checkpoint: the data position
    is then re-split (`load_data_states`). A sharded checkpoint is read by
    `restore_sharded_checkpoint`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if is_sharded(directory):
        return restore_sharded_checkpoint(directory, model, optimizer, scheduler, ema, packer, rank)
    tied = model.config.text.tie_word_embeddings
    expected = {plain_name(k): tuple(v.shape) for k, v in model.state_dict().items()}  # global shapes
    model_file = directory / ckpt.MODEL_FILE
    if not model_file.is_file():
        raise ckpt.InvalidCheckpointError(model_file, "file missing")
    refs = index_safetensors(model_file)
    meta = {k: torch.empty(r.shape, device="meta") for k, r in refs.items()}
    checked = ckpt.strict_model_state(expected, meta, str(model_file), tied)
    fill_model(model, ModelSource(model.config, {k: refs[k] for k in checked}, fresh_ok=False,
                                  source=str(model_file)), next(model.parameters()).device)
    named = ckpt.read_optimizer_state(directory)
    params = {plain_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    ckpt.check_optimizer_state(named, ckpt.optimizer_groups_by_name(model, optimizer), params,
                               str(directory / ckpt.OPTIMIZER_JSON))
    if sharded(model):
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
    else:
        ckpt.load_optimizer_state_by_name(model, optimizer, named, str(directory / ckpt.OPTIMIZER_JSON))
    del named
    if ema is not None:
        ema_file = directory / ckpt.EMA_FILE
        if not ema_file.is_file():
            raise ckpt.InvalidCheckpointError(ema_file, "file missing")
        ema.load_file(ema_file, expected, tied)
    if packer is not None:
        packer.load_states(load_data_states(directory, rank, packer.streams.world))
    state = ckpt.read_trainer_state(directory)
    if not isinstance(state.get("scheduler"), dict):
        raise ckpt.InvalidCheckpointError(directory / ckpt.TRAINER_STATE, "no scheduler state: not a training-stage checkpoint")
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def save_adapter_checkpoint(directory: Path, step: int, model: Lance, config: LanceConfig, optimizer, scheduler,
                            ema: Ema | None, data_state: dict | None, rank: int, world: int, record: dict) -> Path:
    """`save_checkpoint` of a LoRA stage: the adapters alone (and their EMA) instead of the model,
    the adapters' optimizer state, the scheduler, the `lora` record (`pipelines.adapters`) and every
    rank's data state. Collective under FSDP (all ranks call it)."""
    items = adapters.adapter_items(model)
    state = adapters.full_adapter_state(items)
    ema_state = {adapters.saved_key(k): v for k, v in ema.full_state().items()} if ema is not None else None
    optim = full_optimizer_state(model, optimizer)
    return _save_parts(directory, step, data_state, rank, world, config=config, model_state=state,
                       ema_state=ema_state, optimizer_state=optim,
                       trainer_state={"scheduler": scheduler.state_dict(), adapters.RECORD_KEY: record})


def restore_adapter_checkpoint(directory: Path, model: Lance, optimizer, scheduler, ema: Ema | None,
                               packer: Packer | None, rank: int, record: dict) -> int:
    """`restore_checkpoint` of a LoRA stage: the base stays as `build_model` filled it from `init`;
    the adapters (and their EMA) are read strictly, each rank only its shards' rows; then the
    optimizer by name, the scheduler and the data position. Returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = ckpt.read_trainer_state(directory)
    adapters.check_record(state.get(adapters.RECORD_KEY), record, directory)
    adapters.load_adapter_file(adapters.adapter_items(model), directory / ckpt.MODEL_FILE)
    if ema is not None:
        adapters.load_adapter_file([(adapters.saved_key(k), t) for k, t in ema.shadow.items()],
                                   directory / ckpt.EMA_FILE)
    named = ckpt.read_optimizer_state(directory)
    params = {plain_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    ckpt.check_optimizer_state(named, ckpt.optimizer_groups_by_name(model, optimizer), params,
                               str(directory / ckpt.OPTIMIZER_JSON))
    if sharded(model):
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
    else:
        ckpt.load_optimizer_state_by_name(model, optimizer, named, str(directory / ckpt.OPTIMIZER_JSON))
    if packer is not None:
        packer.load_states(load_data_states(directory, rank, packer.streams.world))
    if not isinstance(state.get("scheduler"), dict):
        raise ckpt.InvalidCheckpointError(directory / ckpt.TRAINER_STATE, "no scheduler state: not a training-stage checkpoint")
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


# ---------------------------------------------------------------------------------------- sharded checkpoints
def _stores(t: torch.Tensor, rank: int) -> bool:
    """Whether this rank stores its part of `t`: every shard once, a replicated copy (HSDP's other
    replicas, a plain tensor such as AdamW's `step`) by its first holder only."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(t, DTensor):
        return rank == 0
    coordinate = t.device_mesh.get_coordinate()
    return coordinate is not None and all(c == 0 for c, p in zip(coordinate, t.placements) if isinstance(p, Replicate))


def _pieces(named, rank: int) -> list[Piece]:
    out = []
    for name, t in named:
        if _stores(t, rank):
            local, start, _ = parallel.local_part(t)
            out.append(Piece(name, local, start, tuple(t.shape)))
    return out


def _model_params(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The stored parameters: all but the fixed latent position table (computed, never stored)."""
    return [(plain_name(n), p) for n, p in model.named_parameters() if plain_name(n) != POS_EMBED_KEY]


def save_sharded_checkpoint(writer: AsyncCheckpointWriter, step: int, model: Lance, config: LanceConfig, optimizer,
                            scheduler, ema: Ema | None, data_state: dict | None, rank: int) -> Path:
    """Start this rank's part of a sharded checkpoint (`lance_platform.sharded_checkpoint`): its
    shards of the model, EMA and optimizer state, its data state and (rank 0) the scheduler, the
    optimizer's param groups and the model config. Returns once the shards are copied to host
    memory; the files are written in the background. No collective. `step` is the step just done."""
    named = ckpt.optimizer_state_by_name(model, optimizer)
    optim, values, tensor_keys = [], {}, {}
    for name, entry in named["state"].items():
        for key, v in entry.items():
            if torch.is_tensor(v):
                optim.append((f"{name}/{key}", v))
                tensor_keys.setdefault(name, []).append(key)
            else:
                values.setdefault(name, {})[key] = v
    tensors = {"model": _pieces(_model_params(model), rank), "optim": _pieces(optim, rank)}
    if ema is not None:
        tensors["ema"] = _pieces(ema.shadow.items(), rank)
    files: dict[str, Any] = {}
    if data_state is not None:
        files[data_state_file(Path(), rank).name] = data_state
    if rank == 0:
        groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in named["param_groups"]]
        files[ckpt.TRAINER_STATE] = {"format": ckpt.FORMAT, "step": step + 1, "scheduler": scheduler.state_dict(),
                                     "optimizer": {"param_groups": groups, "values": values, "tensors": tensor_keys}}
        files[CONFIG_FILE] = config.to_dict()
        files[OFFICIAL_LLM_CONFIG_FILE] = official_llm_config(config)
    return writer.save(step + 1, tensors, files)


def check_sharded_keys(directory: Path, model: Lance, ema: Ema | None) -> None:
    """A sharded checkpoint holds exactly the model's tensors (and the EMA's): `CheckpointError`
    naming the missing/unexpected keys otherwise (`latest_valid` then falls back)."""
    with ShardedCheckpoint(directory) as sc:
        sc.check("model", {n: tuple(p.shape) for n, p in _model_params(model)})
        if ema is not None:
            sc.check("ema", {n: tuple(t.shape) for n, t in ema.shadow.items()})


def restore_sharded_checkpoint(directory: Path, model: Lance, optimizer, scheduler, ema: Ema | None,
                               packer: Packer | None, rank: int) -> int:
    """Strictly load a verified sharded checkpoint, each rank reading only the rows of its own
    shards, on any number of ranks: model, EMA, optimizer (by parameter name, resharded like the
    parameters), scheduler and data position. Every key is checked before any tensor is read."""
    state = ckpt.read_trainer_state(directory)
    source = str(directory / ckpt.TRAINER_STATE)
    opt = state.get("optimizer")
    if not isinstance(state.get("scheduler"), dict) or not isinstance(opt, dict) \
            or not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("tensors"), dict):
        raise ckpt.InvalidCheckpointError(directory / ckpt.TRAINER_STATE, "needs 'scheduler' and 'optimizer' "
                                          "(param_groups, tensors): not a training-stage checkpoint")
    params = dict(_model_params(model))
    shapes = {plain_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    groups = ckpt.optimizer_groups_by_name(model, optimizer)
    ckpt.check_optimizer_state({"state": {}, "param_groups": opt["param_groups"]}, groups, shapes, source)
    with ShardedCheckpoint(directory) as sc:
        check_sharded_keys(directory, model, ema)
        stored = sc.names("optim")
        want: dict[str, tuple[int, ...]] = {}
        for name, keys in opt["tensors"].items():
            if name not in shapes or not isinstance(keys, list):
                raise ckpt.InvalidCheckpointError(directory / ckpt.TRAINER_STATE, f"optimizer state of {name!r}: "
                                                  "no such parameter")
            for key in keys:
                k = f"{name}/{key}"
                want[k] = () if stored.get(k) == () else shapes[name]
        sc.check("optim", want)

        parallel.fill_local(params.items(), lambda n, shape, a, b: sc.rows("model", n, a, b))
        if ema is not None:
            parallel.fill_local(ema.shadow.items(), lambda n, shape, a, b: sc.rows("ema", n, a, b))
        by_name = {plain_name(n): p for n, p in model.named_parameters()}
        index = {name: i for i, name in enumerate(n for g in groups for n in g)}
        loaded: dict[int, dict[str, Any]] = {}
        # in the optimizer's own order: every rank must hold its state in the same order (FSDP collectives)
        for name in sorted(set(opt["tensors"]) | set(opt.get("values", {})), key=index.__getitem__):
            entry = dict(opt.get("values", {}).get(name, {}))
            for key in opt["tensors"].get(name, []):
                k = f"{name}/{key}"
                if want[k] == ():
                    entry[key] = sc.rows("optim", k)
                else:
                    t = torch.empty_like(by_name[name].detach(), dtype=sc.blocks["optim"][k][0].dtype)
                    parallel.fill_local([(k, t)], lambda n, shape, a, b: sc.rows("optim", n, a, b))
                    entry[key] = t
            loaded[index[name]] = entry
    optimizer.load_state_dict({"state": loaded, "param_groups": [
        {**saved, "params": [index[n] for n in names]} for saved, names in zip(opt["param_groups"], groups)]})
    if packer is not None:
        packer.load_states(load_data_states(directory, rank, packer.streams.world))
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def resume_sharded(root: Path, model: Lance, optimizer, scheduler, ema: Ema | None, packer: Packer | None,
                   rank: int, device: torch.device) -> tuple[int, str | None]:
    """(step to continue from, the fallback note when newer checkpoints were skipped). Rank 0
    picks the newest checkpoint under `root` that verifies (checksums, indexes, every key the
    model and EMA have) and tells the others which; each rank then reads only its rows."""
    chosen_step, note = -1, None
    if rank == 0:
        chosen, skipped = latest_valid_sharded(root, "step-*", check=lambda d: check_sharded_keys(d, model, ema))
        if skipped:
            note = ckpt.fallback_note(chosen, skipped)
            log.warning("resume: %s", note)
        if chosen is not None:
            chosen_step = ckpt.read_trainer_state(chosen)["step"]
    chosen_step = int(parallel.all_reduce_sum([chosen_step if rank == 0 else 0.0], device)[0])
    if chosen_step < 0:
        return 0, note
    return restore_sharded_checkpoint(root / step_name(chosen_step), model, optimizer, scheduler, ema, packer,
                                      rank), note


def resume_directory(checkpoint) -> tuple[Path | None, str | None]:
    """(checkpoint directory to resume from, the fallback note when it is not Ray's latest). Ray's
    latest checkpoint is used when it verifies; on local storage the newest one of the run that
    verifies replaces it (None when none does); remote storage has no fallback."""
    path = Path(checkpoint.path)
    local = getattr(checkpoint.filesystem, "type_name", "") == "local"
    if not local:
        return None, None
    chosen, skipped = ckpt.latest_valid(path.parent, "checkpoint_*")
    if chosen == path or (chosen is not None and not skipped):
        return chosen, None
    note = ckpt.fallback_note(chosen, skipped)
    log.warning("resume: %s", note)
    return chosen, note


def data_state_file(directory: Path, rank: int) -> Path:
    return directory / f"data_state_rank{rank}.json"


def save_data_state(directory: Path, rank: int, state: dict) -> None:
    """This worker's data position (per-group cursors, a few integers) as JSON."""
    write_text_atomic(data_state_file(directory, rank), json.dumps(state))


def _read_data_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ckpt.InvalidCheckpointError(path, "file missing") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ckpt.InvalidCheckpointError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(state, dict) or not isinstance(state.get("streams"), dict) \
            or not isinstance(state["streams"].get("world"), int):
        raise ckpt.InvalidCheckpointError(path, "not a data state (needs 'streams' with 'world')")
    return state


def load_data_states(directory: Path, rank: int, world: int) -> list[dict]:
    """This rank's own data state when the checkpoint was written by `world` workers; otherwise the
    states of all the workers that wrote it (rank order), for the packer to re-split."""
    first = _read_data_state(data_state_file(directory, 0))
    saved_world = first["streams"]["world"]
    if saved_world == world:
        return [first if rank == 0 else _read_data_state(data_state_file(directory, rank))]
    log.info("rank %d: the checkpoint was written by %d workers, this run has %d: re-splitting the data",
             rank, saved_world, world)
    return [first, *(_read_data_state(data_state_file(directory, r)) for r in range(1, saved_world))]


# ---------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: Lance, packer: Packer, rows: list[dict], device: torch.device, seed: int) -> dict[str, float]:
    """Held-out loss per task: every rank runs the same number of forwards (FSDP collectives),
    each on its own stride of the held-out rows; sums are reduced over ranks."""
    rank, world = parallel.world()
    tasks = sorted({r["task"] for r in rows})
    per_rank = math.ceil(len(rows) / world) if rows else 0
    sums = {t: [0.0, 0.0] for t in tasks}
    model.eval()
    for j in range(per_rank):
        i = j * world + rank
        row = rows[min(i, len(rows) - 1)]
        weight = 1.0 if i < len(rows) else 0.0
        sample = packer.builder.render(_sample(row, packer.config.vit))
        from lance_model.packing import pack_rendered

        batch = pack_rendered([sample], packer.config).to(device)
        out = model(batch, generator=torch.Generator(device=device).manual_seed(seed + i),
                    text_vocab=len(packer.builder.tok))
        sums[row["task"]][0] += weight * float(out.loss)
        sums[row["task"]][1] += weight
    model.train()
    flat = [v for t in tasks for v in sums[t]]
    reduced = parallel.all_reduce_sum(flat, device)
    return {f"val_loss/{t}": reduced[2 * k] / max(reduced[2 * k + 1], 1.0) for k, t in enumerate(tasks)}


def step_flops(config: LanceConfig, tokens: int, pairs: int) -> float:
    """Matmul + attention FLOPs of forward + backward (each token passes one expert)."""
    t = config.text
    layer = (2 * t.hidden_size * t.num_attention_heads * t.head_dim
             + 2 * t.hidden_size * t.num_key_value_heads * t.head_dim + 3 * t.hidden_size * t.intermediate_size)
    return t.num_hidden_layers * (6 * layer * tokens + 12 * t.num_attention_heads * t.head_dim * pairs)


def log_validation_samples(model: Lance, config: LanceConfig, rows: list[dict], tracker, step: int,
                           device: torch.device, stage: StageConfig) -> None:
    """Rank 0: a grid of generated images (top) over the held-out targets (bottom), and x2t answers
    next to the references, as MLflow artifacts. `model` is an unsharded copy."""
    from PIL import Image

    from lance_model.encoders.vae import build_vae
    from lance_model.generation import SamplerOptions, TextOptions, generate_text, sample_latents
    from lance_model.sequence import Sample, Visual
    from lance_platform.schema import row_to_sample

    builder = SequenceBuilder(load_tokenizer(config.tokenizer), config.vit.spatial_merge_size if config.vit else 2)
    n = stage.validation.samples
    images = [row_to_sample(r, config.vit) for r in rows if r["task"] == "t2i"][:n]
    questions = [row_to_sample(r, config.vit) for r in rows if r["task"] in ("i2t", "v2t")][:n]
    with tempfile.TemporaryDirectory() as tmp:
        if images:
            vae = build_vae(config.vae).to(device)
            tiles = []
            for s in images:  # one at a time: held-out targets may differ in size
                prompt = Sample("t2i", s.caption, target=Visual(latent_shape=s.target.latent_shape))
                latents = sample_latents(model, builder, [prompt], [stage.validation.seed],
                                         SamplerOptions(num_steps=stage.validation.sample_steps)).latents
                both = torch.cat([latents, s.target.latent[None].to(device)])
                pixels = ((vae.decode(both).float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
                tiles.append(torch.cat([pixels[0, :, 0], pixels[1, :, 0]], dim=1).permute(1, 2, 0).cpu())
            height = max(t.shape[0] for t in tiles)
            grid = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, 0, 0, height - t.shape[0])) for t in tiles], dim=1)
            Image.fromarray(grid.numpy()).save(Path(tmp) / f"samples_step{step:06d}.png")
        if questions:
            answers = generate_text(model, builder, questions, TextOptions(max_new_tokens=32))
            (Path(tmp) / f"answers_step{step:06d}.json").write_text(json.dumps(
                [{"question": q.caption, "reference": q.answer, "answer": a.text} for q, a in zip(questions, answers)],
                indent=2))
        tracker.log_artifact(Path(tmp), "validation")


def unsharded_copy(model: Lance, config: LanceConfig, device: torch.device) -> Lance:
    """A plain (unsharded) model with the current weights; collective under FSDP (all ranks call it)."""
    full = full_model_state(model)
    if parallel.world()[0] != 0:
        return model
    layers = lora.lora_layers(model)
    if layers:  # LoRA: the base with the adapters folded in
        full = adapters.fold_state(full, next(iter(layers.values())).scaling[lora.ADAPTER])
    copy = Lance(config)
    copy.load_state_dict(full, strict=False)
    return copy.to(device).eval()


def _sample(row: dict, vit=None):
    from lance_platform.schema import row_to_sample

    return row_to_sample(row, vit)


# ---------------------------------------------------------------------------------------- loop
def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    stage: StageConfig = from_dict(StageConfig, config["stage"])
    rank, world = parallel.world()
    use_gpu = stage.scaling.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def prepare(model: Lance) -> None:  # on the meta device, before any weight exists
        if stage.model.compile:
            compile_layers(model)
        if stage.model.activation_checkpointing:
            parallel.apply_activation_checkpointing(model, stage.model.activation_checkpointing_every)
        if parallel.distributed() and (world > 1 or use_gpu):
            # FSDP2 also on a single GPU: fp32 master weights with bf16 compute; HSDP with scaling.shard_size
            parallel.apply_fsdp(model, device, bf16=use_gpu, shard_size=stage.scaling.shard_size)

    model = build_model(stage, config.get("init_path"), device, prepare)
    model_config = model.config

    builder = SequenceBuilder(load_tokenizer(model_config.tokenizer),
                              model_config.vit.spatial_merge_size if model_config.vit else 2)
    # this worker reads only its own rows of the shards (see pipelines.batching)
    streams = GroupStreams(ShardRows(config["files"]), dict(stage.mixture.groups), rank,
                           world, holdout=config.get("holdout", stage.data.holdout_per_group),
                           block=int(config.get("split_block", 1)))
    holdout_rows = streams.holdout_rows()
    packer = Packer(streams, stage.mixture, builder, model_config, stage.data.max_tokens,
                    stage.data.max_sample_tokens, seed=stage.seed, rank=rank)

    params = [p for p in model.parameters() if p.requires_grad]
    o = stage.optim
    # foreach (also on CPU, where torch's default is a loop of per-tensor ops: under FSDP2 each a
    # DTensor dispatch, 7x slower for the tiny model on gloo); fused: one CUDA kernel for all tensors
    impl = {"fused": True} if o.fused and use_gpu else {"foreach": True}
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                  **impl)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, stage))
    ema = Ema(model, stage.ema_decay) if stage.ema_decay > 0 else None  # LoRA: of the adapters
    lora_record = adapters.adapter_record(stage, config.get("init_path")) if stage.lora_enabled else None
    restore_checkpoint_ = restore_checkpoint if lora_record is None else functools.partial(
        restore_adapter_checkpoint, record=lora_record)

    start = 0
    fallback = None
    writer = None
    if lora_record is None and config.get("storage_dir"):
        # sharded, asynchronous checkpoints under <stage dir>/checkpoints; one attempt id per (re)start
        attempt = int(parallel.all_reduce_sum([secrets.randbits(48) if rank == 0 else 0.0], device)[0])
        writer = AsyncCheckpointWriter(Path(config["storage_dir"]) / "checkpoints", rank, world,
                                       keep=stage.keep_checkpoints, attempt=f"{attempt:012x}")
        start, fallback = resume_sharded(writer.root, model, optimizer, scheduler, ema, packer, rank, device)
        if start:
            log.info("rank %d resumed at step %d", rank, start)
    checkpoint = ray.train.get_checkpoint() if writer is None else None
    if checkpoint is not None:
        directory, fallback = resume_directory(checkpoint)
        if directory is None and fallback is None:  # remote storage: verify the downloaded copy
            with checkpoint.as_directory() as d:
                ckpt.verify(d)
                start = restore_checkpoint_(Path(d), model, optimizer, scheduler, ema, packer, rank)
        elif directory is not None:
            start = restore_checkpoint_(directory, model, optimizer, scheduler, ema, packer, rank)
        log.info("rank %d resumed at step %d", rank, start)

    tracker = None
    if rank == 0 and config.get("tracking_uri") and config.get("run_id"):
        from lance_platform.tracking import Tracker

        tracker = Tracker(config["tracking_uri"], config.get("experiment", "lance"))
        tracker.start(stage.name, run_id=config["run_id"])
        if fallback:
            tracker.set_tags({"resume_fallback": fallback})

    model.train()

    def pack(step: int):  # in the background thread (or process), while earlier steps run
        batch, stats = packer.next_pack(step)
        return batch, stats, packer.state_dict(), packer.total.skipped_too_long, packer.streams.source.rows_read

    steps = range(start, stage.steps)
    ahead = (ProcessPrefetcher(pack, steps, depth=PREFETCH_DEPTH, pin_memory=use_gpu) if stage.data.pack_process
             else Prefetcher(pack, steps, depth=PREFETCH_DEPTH))
    profiler = StepProfiler(stage.profile, rank, Path(config["storage_dir"]) if config.get("storage_dir") else None,
                            use_gpu)
    try:
        _steps(stage, model, model_config, ahead, start, optimizer, scheduler, params, ema, packer, builder,
               holdout_rows, device, rank, world, use_gpu, tracker, lora_record, writer, profiler)
    finally:
        ahead.close()
        if writer is not None:
            writer.close()
    if tracker is not None:
        tracker.set_tags({"final_step": str(stage.steps - 1)})


def optimizer_step(loss: torch.Tensor, params: list, optimizer: torch.optim.Optimizer, grad_clip: float,
                   after: Callable[[], None]) -> tuple[float, bool]:
    """Backward, clip and step -> (global gradient norm, skipped). The norm is the step's one wait for
    the GPU (everything before it is queued without one): a non-finite loss or gradient on any rank
    makes it non-finite on every rank, and then no rank steps (nor calls `after`, the EMA update)."""
    loss.backward()
    grad_norm = float(parallel.full_tensor(torch.nn.utils.clip_grad_norm_(params, grad_clip)))
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
        after()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def _steps(stage: StageConfig, model: Lance, model_config: LanceConfig, ahead: Prefetcher | ProcessPrefetcher,
           start: int, optimizer,
           scheduler, params: list, ema: Ema | None, packer: Packer, builder: SequenceBuilder, holdout_rows: list[dict],
           device: torch.device, rank: int, world: int, use_gpu: bool, tracker,
           lora_record: dict | None = None, writer: AsyncCheckpointWriter | None = None,
           profiler: StepProfiler | None = None) -> None:
    import ray.train
    from ray.train import Checkpoint

    o = stage.optim
    last_metrics: dict[str, float] = {}
    progress_every = max(1, stage.steps // 10)
    for step in range(start, stage.steps):
        if profiler is not None:
            profiler.before(step)
        t0 = time.perf_counter()
        batch, stats, data_state, skipped_total, rows_read = ahead.get(step)
        wait = time.perf_counter() - t0
        # counted on the host copy of the pack: no wait for the GPU
        counts = [batch.ce_index.numel(), int(batch.vae_noisy.sum()), batch.num_tokens]
        batch = batch.to(device)
        ce_n, mse_n, tokens = parallel.all_reduce_sum(counts, device)
        gen = torch.Generator(device=device).manual_seed((stage.seed * 1_000_003 + step) * 1_009 + rank)
        out = model(batch, generator=gen, ce_count=int(ce_n), mse_count=int(mse_n), text_vocab=len(builder.tok))
        # Each rank's loss is its share of the global mean; FSDP averages gradients over ranks.
        grad_norm, skipped = optimizer_step(out.loss * world, params, optimizer, o.grad_clip,
                                            lambda: ema.update(model) if ema is not None else None)
        if skipped:
            log.warning("step %d: non-finite loss or gradient on some rank; the step is skipped on all ranks", step)
        scheduler.step()
        dt = time.perf_counter() - t0
        if profiler is not None:
            profiler.after(step)
        loss_sum, ce_sum, mse_sum = parallel.all_reduce_sum(
            [float(out.loss.detach()), float(out.ce), float(out.mse)], device)
        pairs = parallel.all_reduce_sum([stats.attention_pairs], device)[0]
        last_metrics = {"loss": loss_sum, "ce": ce_sum, "mse": mse_sum, "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "step_time_s": dt,
                        "samples": stats.samples, "skipped_too_long": skipped_total, "data_wait_s": wait,
                        "rows_read": rows_read,
                        "skipped_step": float(skipped)}
        if use_gpu and stage.scaling.peak_tflops > 0:
            last_metrics["mfu"] = step_flops(model_config, int(tokens), int(pairs)) / dt / (
                world * stage.scaling.peak_tflops * 1e12)
        if tracker is not None and (step % stage.log_every == 0 or step == stage.steps - 1):
            tracker.log_metrics(last_metrics, step=step)
        if rank == 0 and ((step + 1) % progress_every == 0 or step == stage.steps - 1):
            # Ray forwards the workers' log lines to the driver: about ten progress lines per stage.
            log.info("%s step %d/%d: loss %.4f (ce %.4f, mse %.4f), %s tokens/s (%.0f ms/step, %.0f ms waiting for "
                     "data), lr %.2e", stage.name, step + 1, stage.steps, loss_sum, ce_sum, mse_sum,
                     f"{tokens / dt:,.0f}", dt * 1e3, wait * 1e3, last_metrics["lr"])

        last = step == stage.steps - 1
        due = last or (stage.validation.every and (step + 1) % stage.validation.every == 0)
        if holdout_rows and due:
            val = validate(model, packer, holdout_rows, device, stage.validation.seed)
            last_metrics.update(val)
            if stage.validation.samples:
                copy = unsharded_copy(model, model_config, device)
                if tracker is not None:
                    log_validation_samples(copy, model_config, holdout_rows, tracker, step, device, stage)
            if tracker is not None:
                tracker.log_metrics(val, step=step)
        if (last or (stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0)) and writer is not None:
            # written in the background while the next steps run; the last one is waited for
            save_sharded_checkpoint(writer, step, model, model_config, optimizer, scheduler, ema, data_state, rank)
            if last:
                writer.wait()
                if rank == 0:  # Ray keeps only metrics reported with a checkpoint: the driver reads these
                    write_final_metrics(writer.root.parent, {**last_metrics, "step": step})
            ray.train.report({**last_metrics, "step": step})
        elif last or (stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0):
            with tempfile.TemporaryDirectory() as tmp:
                if lora_record is not None:  # LoRA: the adapters, not the frozen base
                    written = save_adapter_checkpoint(Path(tmp) / "checkpoint", step, model, model_config, optimizer,
                                                      scheduler, ema, data_state, rank, world, lora_record)
                else:
                    written = save_checkpoint(Path(tmp) / "checkpoint", step, model, model_config, optimizer,
                                              scheduler, ema, data_state, rank, world)
                ray.train.report({**last_metrics, "step": step}, checkpoint=Checkpoint.from_directory(written))

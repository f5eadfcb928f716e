"""The per-worker training loop of a stage (run by Ray Train's `TorchTrainer` on every worker).

One step: pack -> global token counts -> loss -> (skip on NaN/Inf, on all ranks together) ->
backward -> clip -> AdamW -> LR schedule -> EMA. Randomness (mixture draws, CFG dropout, flow
timesteps and noise) is derived from (seed, step, rank), and the data position of every worker is
checkpointed, so a stage that fails and resumes from its last checkpoint reproduces the run that
did not fail.

Checkpoints (every `checkpoint_every` steps and at the end) are `lance_platform.checkpoint`
directories, the format RL writes too: `model.safetensors` and `ema.safetensors` in the official
key layout (they load with `Lance.from_pretrained` and in the official code), the optimizer state
keyed by parameter name (gathered to full tensors under FSDP2), the scheduler state as JSON, each
worker's data state, and the manifests. Nothing is unpickled on resume. A worker resuming from a
checkpoint that does not verify falls back to the newest one that does, naming the bad file in
the log and in the stage's MLflow run (`resume_fallback` tag); loading is strict.
Rank 0 alone writes to MLflow, reopening the stage's run by id after a restart.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lance_platform.schema import read_shard, shard_schema, write_shard
from lance_model import Lance, LanceConfig
from lance_model.backbone import compile_layers
from lance_platform import checkpoint as ckpt
from lance_platform.checkpoint import plain_name
from lance_platform.config import from_dict
from lance_model.sequence import SequenceBuilder
from lance_model.tokenizer import load_tokenizer

from . import parallel
from .batching import GroupStreams, Packer
from .config import StageConfig

log = logging.getLogger(__name__)
SHARD_COLUMNS = set(shard_schema().names)


# ---------------------------------------------------------------------------------------- model
def build_model(stage: StageConfig, init_path: str | None) -> Lance:
    """The stage's starting weights, identical on every rank (built before sharding)."""
    overrides = dict(stage.model.overrides)
    kind = stage.init.kind
    if kind == "preset":
        config = LanceConfig.from_preset(stage.model.preset, **overrides)
        torch.manual_seed(stage.seed)
        model = Lance(config)
        model.init_weights(generator=torch.Generator().manual_seed(stage.seed))
        return model
    if kind == "qwen25vl":
        return Lance.from_qwen25vl(init_path or stage.init.path)
    model = Lance.from_pretrained(init_path or stage.init.path, weights=stage.init.weights)
    for key, value in overrides.items():
        setattr(model.config, key, value)
    model.config.validate()
    model.apply_freeze()
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
        for n, p in model.named_parameters():
            if p.requires_grad:
                self.shadow[plain_name(n)].lerp_(p.detach().float(), 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        return {n: parallel.full_tensor(t).cpu() for n, t in self.shadow.items()}

    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for n, t in self.shadow.items():
            src = full[n].to(device=t.device, dtype=t.dtype)
            if isinstance(t, DTensor):
                src = distribute_tensor(src, t.device_mesh, t.placements)
            t.copy_(src)


# ---------------------------------------------------------------------------------------- state
def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if parallel.world()[1] > 1:
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

    def write_data(tmp: Path) -> None:
        if data_state is not None:
            save_data_state(tmp, rank, data_state)

    if rank != 0:
        return ckpt.save(directory, step + 1, write_extra=write_data, part=rank, parts=world)
    return ckpt.save(directory, step + 1, config=config, model_state=full,
                     ema_state={**full, **ema_full} if ema_full is not None else None, optimizer_state=optim,
                     trainer_state={"scheduler": scheduler.state_dict()}, write_extra=write_data, parts=world)


def restore_checkpoint(directory: Path, model: Lance, optimizer, scheduler, ema: Ema | None, packer: Packer | None,
                       rank: int) -> int:
    """Strictly load a verified checkpoint (model, optimizer by name, EMA, scheduler, this rank's data
    state); returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    source = str(directory / ckpt.MODEL_FILE)
    full = ckpt.read_model_state(directory)
    named = ckpt.read_optimizer_state(directory)
    if sharded(model):
        shapes = {plain_name(k): tuple(v.shape) for k, v in model.state_dict().items()}  # global shapes
        checked = ckpt.strict_model_state(shapes, full, source, model.config.text.tie_word_embeddings)
        # strictness was checked above; the fixed latent position table is never stored
        set_model_state_dict(model, checked, options=StateDictOptions(full_state_dict=True, strict=False))
        params = {plain_name(n): tuple(p.shape) for n, p in model.named_parameters()}
        ckpt.check_optimizer_state(named, ckpt.optimizer_groups_by_name(model, optimizer), params,
                                   str(directory / ckpt.OPTIMIZER_JSON))
        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
    else:
        ckpt.load_model_state(model, full, source)
        ckpt.load_optimizer_state_by_name(model, optimizer, named, str(directory / ckpt.OPTIMIZER_JSON))
    if ema is not None:
        shapes = {plain_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
        ema.load_full(ckpt.strict_model_state(shapes, ckpt.read_model_state(directory, ckpt.EMA_FILE),
                                              str(directory / ckpt.EMA_FILE), model.config.text.tie_word_embeddings))
    if packer is not None:
        packer.load_state_dict(load_data_state(directory, rank))
    state = ckpt.read_trainer_state(directory)
    if not isinstance(state.get("scheduler"), dict):
        raise ckpt.InvalidCheckpointError(directory / ckpt.TRAINER_STATE, "no scheduler state: not a training-stage checkpoint")
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


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


def save_data_state(directory: Path, rank: int, state: dict) -> None:
    """Scalars as JSON; rows queued but not yet trained on as shard-schema Parquet files."""
    queues = state["streams"]["queues"]
    files = {}
    for i, (group, rows) in enumerate(queues.items()):
        if rows:
            name = f"data_rank{rank}_queue{i}.parquet"
            write_shard([{k: v for k, v in r.items() if k in SHARD_COLUMNS} for r in rows], directory / name)
            files[group] = name
    meta = {**state, "streams": {**state["streams"], "queues": files}}
    (directory / f"data_state_rank{rank}.json").write_text(json.dumps(meta))


def load_data_state(directory: Path, rank: int) -> dict:
    meta = json.loads((directory / f"data_state_rank{rank}.json").read_text())
    queues = {g: read_shard(directory / name).to_pylist() for g, name in meta["streams"]["queues"].items()}
    meta["streams"]["queues"] = queues
    return meta


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
        sample = packer.builder.render(_sample(row))
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

    from lance_platform.schema import row_to_sample
    from lance_model.encoders.vae import build_vae
    from lance_model.generation import SamplerOptions, TextOptions, generate_text, sample_latents
    from lance_model.sequence import Sample, Visual

    builder = SequenceBuilder(load_tokenizer(config.tokenizer), config.vit.spatial_merge_size if config.vit else 2)
    n = stage.validation.samples
    images = [row_to_sample(r) for r in rows if r["task"] == "t2i"][:n]
    questions = [row_to_sample(r) for r in rows if r["task"] in ("i2t", "v2t")][:n]
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
    copy = Lance(config)
    copy.load_state_dict(full, strict=False)
    return copy.to(device).eval()


def _sample(row: dict):
    from lance_platform.schema import row_to_sample

    return row_to_sample(row)


# ---------------------------------------------------------------------------------------- loop
def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    from ray.train import Checkpoint

    stage: StageConfig = from_dict(StageConfig, config["stage"])
    rank, world = parallel.world()
    use_gpu = stage.scaling.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    model = build_model(stage, config.get("init_path"))
    model_config = model.config
    model.to(device)
    if stage.model.compile:
        compile_layers(model)
    if stage.model.activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    if parallel.distributed() and (world > 1 or use_gpu):
        # FSDP2 also on a single GPU: fp32 master weights with bf16 compute
        parallel.apply_fsdp(model, device, bf16=use_gpu)

    builder = SequenceBuilder(load_tokenizer(model_config.tokenizer),
                              model_config.vit.spatial_merge_size if model_config.vit else 2)
    shard = ray.train.get_dataset_shard("train")
    streams = GroupStreams(shard.iter_rows, {n: g.tasks for n, g in stage.mixture.groups.items()}, rank, world,
                           holdout=config.get("holdout", stage.data.holdout_per_group))
    holdout_rows = streams.holdout_rows()
    packer = Packer(streams, stage.mixture, builder, model_config, stage.data.max_tokens,
                    stage.data.max_sample_tokens, seed=stage.seed, rank=rank)

    params = [p for p in model.parameters() if p.requires_grad]
    o = stage.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, stage))
    ema = Ema(model, stage.ema_decay) if stage.ema_decay > 0 else None

    start = 0
    fallback = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        directory, fallback = resume_directory(checkpoint)
        if directory is None and fallback is None:  # remote storage: verify the downloaded copy
            with checkpoint.as_directory() as d:
                ckpt.verify(d)
                start = restore_checkpoint(Path(d), model, optimizer, scheduler, ema, packer, rank)
        elif directory is not None:
            start = restore_checkpoint(directory, model, optimizer, scheduler, ema, packer, rank)
        log.info("rank %d resumed at step %d", rank, start)

    tracker = None
    if rank == 0 and config.get("tracking_uri") and config.get("run_id"):
        from lance_platform.tracking import Tracker

        tracker = Tracker(config["tracking_uri"], config.get("experiment", "lance"))
        tracker.start(stage.name, run_id=config["run_id"])
        if fallback:
            tracker.set_tags({"resume_fallback": fallback})

    model.train()
    last_metrics: dict[str, float] = {}
    for step in range(start, stage.steps):
        t0 = time.perf_counter()
        batch, stats = packer.next_pack(step)
        batch = batch.to(device)
        ce_n, mse_n, tokens = parallel.all_reduce_sum(
            [batch.ce_index.numel(), int(batch.vae_noisy.sum()), batch.num_tokens], device)
        gen = torch.Generator(device=device).manual_seed((stage.seed * 1_000_003 + step) * 1_009 + rank)
        out = model(batch, generator=gen, ce_count=int(ce_n), mse_count=int(mse_n), text_vocab=len(builder.tok))
        # Each rank's loss is its share of the global mean; FSDP averages gradients over ranks.
        loss = out.loss * world
        skipped = not parallel.all_finite(out.loss.detach())
        if skipped:
            optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: non-finite loss on some rank; the step is skipped on all ranks", step)
            grad_norm = float("nan")
        else:
            loss.backward()
            grad_norm = float(parallel.full_tensor(torch.nn.utils.clip_grad_norm_(params, o.grad_clip)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
        scheduler.step()
        dt = time.perf_counter() - t0
        loss_sum, ce_sum, mse_sum = parallel.all_reduce_sum(
            [float(out.loss.detach()), float(out.ce), float(out.mse)], device)
        pairs = parallel.all_reduce_sum([stats.attention_pairs], device)[0]
        last_metrics = {"loss": loss_sum, "ce": ce_sum, "mse": mse_sum, "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "step_time_s": dt,
                        "samples": stats.samples, "skipped_too_long": packer.total.skipped_too_long,
                        "skipped_step": float(skipped)}
        if use_gpu and stage.scaling.peak_tflops > 0:
            last_metrics["mfu"] = step_flops(model_config, int(tokens), int(pairs)) / dt / (
                world * stage.scaling.peak_tflops * 1e12)
        if tracker is not None and (step % stage.log_every == 0 or step == stage.steps - 1):
            tracker.log_metrics(last_metrics, step=step)

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
        if last or (stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0):
            with tempfile.TemporaryDirectory() as tmp:
                written = save_checkpoint(Path(tmp) / "checkpoint", step, model, model_config, optimizer, scheduler,
                                          ema, packer.state_dict(), rank, world)
                ray.train.report({**last_metrics, "step": step}, checkpoint=Checkpoint.from_directory(written))
    if tracker is not None:
        tracker.set_tags({"final_step": str(stage.steps - 1)})

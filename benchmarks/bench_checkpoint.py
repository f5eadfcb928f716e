"""Checkpoint costs of a training stage: sharded load, asynchronous and synchronous saves, export, resume.

Each rank does what a training worker of `pipelines.train_loop` does, with the same functions:

1. **init**: the stage's model built on the meta device and sharded with FSDP2, each rank filling
   only its own shards (`build_model`, random init of `--preset`);
2. **steps**: full train steps (pack -> forward -> backward -> clip -> AdamW -> EMA) on the reference
   mixed pack of `bench_train_step.py` (16K tokens; a smaller t2i + x2t pack below `--tokens 16384`);
   the median is the baseline step time;
3. **sync save**: `save_sharded_checkpoint` (model + EMA + optimizer, this rank's shards) waited for
   at once: what a step would stall without the writer thread, and the peak host memory of a save
   against the snapshot it writes (the host copies of the rank's shards);
4. **async save**: the same save as the training loop makes it: the stall is the time until it
   returns (the copy into the host buffers); `--steps` more steps follow while the files are
   written (their median is the step time during a write), and the write time is taken at the end
   of the step in which the writer finished (or at the wait after the steps);
5. **export** (rank 0): the newest checkpoint streamed to the official layout (`export`), as at a
   stage's end;
6. **load**: the stage rebuilt from that export (`init.kind: lance`), each rank reading only the rows
   of its shards: time, and this process's peak host memory above what it held before, against its
   shard plus the largest tensor;
7. **resume**: model, EMA and optimizer restored from the sharded checkpoint (`resume_sharded`).

One GPU (nccl; fp32 master weights, bf16 compute, as the workers run):
    torchrun --nproc_per_node 1 benchmarks/bench_checkpoint.py --device cuda --preset lance-3b:36 --dir /tmp/ckpt
CPU (gloo), a smaller model:
    torchrun --nproc_per_node 2 benchmarks/bench_checkpoint.py --preset lance-3b:1 --no-vit --tokens 1024

Peak host memory is Linux's VmHWM, reset before each phase (`/proc/self/clear_refs`). On CPU the
shards themselves live in host memory, so the load's peak includes them; on a GPU it is what the
load needs on the host (the bound is then one tensor's rows). Saves are written under `--dir`,
which is emptied first.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from bench_train_step import reference_samples

from lance_model.packing import pack_rendered
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer
from lance_platform import parallel
from lance_platform.config import from_dict
from lance_platform.sharded_checkpoint import AsyncCheckpointWriter, export, step_name
from pipelines.config import StageConfig
from pipelines.profiling import peak_host_rss_mib, reset_peak_host_rss
from pipelines.train_loop import (
    Ema,
    build_model,
    optimizer_step,
    resume_sharded,
    save_sharded_checkpoint,
)

GIB = 2 ** 30


def peak_rss() -> float:
    """This process's peak resident memory (GiB) since the last `reset_peak`."""
    return peak_host_rss_mib() / 1024


def reset_peak() -> float:
    """Free what can be freed, restart the peak, and return the resident memory now (GiB)."""
    return reset_peak_host_rss() / 1024


def stage(args: argparse.Namespace, init: dict | None = None) -> StageConfig:
    name, _, layers = args.preset.partition(":")
    overrides: dict = {}
    if layers:
        overrides["text"] = {"num_hidden_layers": int(layers)}
    if args.no_vit:
        overrides["vit"] = None
    model = {"preset": name, "overrides": overrides} if init is None else {"preset": name}
    return from_dict(StageConfig, {"seed": 0, "ema_decay": 0.999, "optim": {"lr": 1e-5, "warmup_steps": 0},
                                   "model": model, **({"init": init} if init else {})})


def pack_samples_of(hidden: int, tokens: int, builder: SequenceBuilder) -> list:
    """`bench_train_step`'s reference mixed pack (about 16K tokens) from `tokens` >= 16384 on; below
    that a t2i image of about half the tokens and an x2t answer filling the rest (CPU runs)."""
    if tokens >= 16384:
        return reference_samples(hidden, tokens, builder)
    g = torch.Generator().manual_seed(0)
    side = max(2, int((tokens / 2) ** 0.5))
    rendered = [builder.render(Sample("t2i", 'a sign that says "OPEN"',
                                      target=Visual(latent=torch.randn(48, 1, side, side, generator=g))))]
    used = len(rendered[0])
    rendered.append(builder.render(Sample("i2t", "Describe.", answer="x" * max(tokens - used - 40, 8), source=Visual(
        vit_tokens=torch.randn(4, hidden, generator=g), vit_grid=(1, 4, 4)))))
    return rendered


def local_bytes(model: torch.nn.Module) -> tuple[float, float]:
    """(this rank's share of the parameters, the largest full parameter), in GiB."""
    share = sum(parallel.local_part(p)[0].numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return share / GIB, largest / GIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="lance-3b:36", help="preset[:layers]")
    ap.add_argument("--no-vit", action="store_true", help="a model without the ViT tower (smaller, for CPU)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step per rank")
    ap.add_argument("--steps", type=int, default=5, help="timed steps of the baseline (after 2 warm-up steps)")
    ap.add_argument("--dir", default="/tmp/bench_checkpoint", help="where checkpoints are written (emptied)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    root = Path(args.dir)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    dist.barrier()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def prepare(model) -> None:
        parallel.apply_fsdp(model, device, bf16=cuda)

    r: dict = {"rank": rank}
    cfg = stage(args)
    base = reset_peak()
    t0 = time.perf_counter()
    model = build_model(cfg, device=device, prepare=prepare)
    sync()
    r["init_s"], r["init_peak_gib"] = time.perf_counter() - t0, peak_rss() - base
    r["shard_gib"], r["largest_tensor_gib"] = local_bytes(model)

    def trainer(model):
        params = [p for p in model.parameters() if p.requires_grad]
        impl = {"fused": True} if cuda else {"foreach": True}
        opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(0.9, 0.95), eps=1e-15, **impl)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return params, opt, sched, Ema(model, cfg.ema_decay)

    params, opt, sched, ema = trainer(model)
    builder = SequenceBuilder(ByteTokenizer())
    rendered = pack_samples_of(model.config.text.hidden_size, args.tokens, builder)

    def step(i: int) -> float:
        sync()
        t = time.perf_counter()
        batch = pack_rendered(rendered, model.config).to(device)
        out = model(batch, generator=torch.Generator(device=device).manual_seed(i))
        optimizer_step(out.loss, params, opt, 1.0, lambda: ema.update(model))
        sched.step()
        sync()
        return time.perf_counter() - t

    i = 0
    for _ in range(2):  # warm-up; also creates AdamW's state, so the saves below hold all of it
        step(i)
        i += 1
    times = sorted(step(i + k) for k in range(args.steps))
    i += args.steps
    r["tokens"] = pack_rendered(rendered, model.config).num_tokens
    r["step_s"] = times[len(times) // 2]

    writer = AsyncCheckpointWriter(root, rank, world, keep=2, attempt="bench")
    dist.barrier()
    base = reset_peak()
    t0 = time.perf_counter()
    save_sharded_checkpoint(writer, i, model, model.config, opt, sched, ema, None, rank)
    writer.wait()
    r["sync_save_s"], r["save_peak_gib"] = time.perf_counter() - t0, peak_rss() - base
    r["snapshot_gib"] = writer.host_bytes() / GIB
    i += 1
    dist.barrier()
    t0 = time.perf_counter()  # the host buffers exist now, as for every save after a stage's first
    target = save_sharded_checkpoint(writer, i, model, model.config, opt, sched, ema, None, rank)
    r["async_stall_s"] = time.perf_counter() - t0
    during, done = [], None
    for _ in range(args.steps):  # the same number of steps on every rank (each step has collectives)
        busy = writer.busy()
        dt = step(i)
        i += 1
        if busy:
            during.append(dt)
        if done is None and not writer.busy():
            done = time.perf_counter() - t0  # the write ended during this step (an upper bound)
    writer.wait()
    r["async_write_s"] = done if done is not None else time.perf_counter() - t0
    r["steps_during_write"] = len(during)
    r["step_during_write_s"] = sorted(during)[len(during) // 2] if during else None
    writer.close()
    dist.barrier()
    if rank == 0:
        r["checkpoint_gib"] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / GIB
    saved = int(target.name.split("-")[1])

    exported = root / "export"
    if rank == 0:
        t0 = time.perf_counter()
        export(target, exported, layout="official")
        r["export_s"] = time.perf_counter() - t0
        r["export_gib"] = sum(f.stat().st_size for f in exported.rglob("*") if f.is_file()) / GIB
    dist.barrier()

    del model, params, opt, sched, ema, writer
    if cuda:
        torch.cuda.empty_cache()
    base = reset_peak()
    t0 = time.perf_counter()
    model = build_model(stage(args, {"kind": "lance", "path": str(exported), "weights": "model"}), device=device,
                        prepare=prepare)
    sync()
    r["load_s"], r["load_peak_gib"] = time.perf_counter() - t0, peak_rss() - base
    dist.barrier()

    params, opt, sched, ema = trainer(model)
    base = reset_peak()
    t0 = time.perf_counter()
    resumed, _ = resume_sharded(root, model, opt, sched, ema, None, rank, device)
    sync()
    r["resume_s"], r["resume_peak_gib"] = time.perf_counter() - t0, peak_rss() - base
    if resumed != saved:
        raise RuntimeError(f"resumed at step {resumed}, expected {saved} ({step_name(saved)})")
    if cuda:
        r["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB

    rows: list = [None] * world
    dist.all_gather_object(rows, r)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "CPU"
        print(f"device: {name} x{world} ({dist.get_backend()}), torch {torch.__version__}; {args.preset}"
              f"{' without ViT' if args.no_vit else ''}, {rows[0]['tokens']} tokens per step per rank")
        keys = ("init_s", "step_s", "sync_save_s", "async_stall_s", "async_write_s", "step_during_write_s",
                "load_s", "resume_s", "shard_gib", "largest_tensor_gib", "snapshot_gib", "save_peak_gib",
                "load_peak_gib", "resume_peak_gib", "checkpoint_gib")
        for row in rows:
            print(f"rank {row['rank']}: " + ", ".join(
                f"{k} {row[k]:.3f}" if isinstance(row.get(k), float) else f"{k} {row.get(k)}" for k in keys))
        print(f"export (rank 0) {rows[0]['export_s']:.2f} s, {rows[0]['export_gib']:.2f} GiB; "
              f"steps run while the async save was written: {[row['steps_during_write'] for row in rows]}")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"checkpoint_x{world}.json").write_text(json.dumps(
            {"device": name, "world": world, "preset": args.preset, "no_vit": args.no_vit, "ranks": rows}, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Full train step (pack -> embeddings -> MoT -> CE + flow loss -> backward -> clip -> AdamW) on GPU.

Unlike bench_backbone.py (decoder layers only), this times what a training worker does per step:
packing rendered samples into a PackedBatch on the host, the copy to the GPU, the whole `Lance`
forward with both losses, backward, gradient clipping and the optimizer step. The pack follows the
layout of the reference 16K mixed pack (shared/bench/mixed_pack.py): a 768² t2i sample, a 768²
image edit with its ViT copy, an x2t image question, a 480p 4-latent-frame t2v sample, and text to
fill 16384 tokens. FLOPs use the same formula as the backbone figure, so MFU compares directly.

One GPU:   torchrun --nproc_per_node 1 benchmarks/bench_train_step.py --preset nano --preset lance-3b:4
Two GPUs:  torchrun --nproc_per_node 2 benchmarks/bench_train_step.py --preset lance-3b:8   (FSDP2)
Both use FSDP2 with bf16 compute and fp32 master weights, as the training workers do.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from lance_model import Lance, LanceConfig
from lance_model.attention import dense_mask
from lance_model.backbone import compile_layers
from lance_model.packing import pack_rendered
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer

PEAK_TFLOPS = 798.0  # bf16 dense matmul measured on the H100 (BENCHMARKS.md)


def reference_samples(hidden: int, total: int, builder: SequenceBuilder) -> list:
    g = torch.Generator().manual_seed(0)
    lat = lambda t, h, w: torch.randn(48, t, h, w, generator=g)
    vit = Visual(vit_tokens=torch.randn(576, hidden, generator=g), vit_grid=(1, 48, 48))
    src = Visual(latent=lat(1, 48, 48), vit_tokens=vit.vit_tokens, vit_grid=vit.vit_grid)
    samples = [
        Sample("t2i", "a storefront sign that says \"OPEN\" " * 3, target=Visual(latent=lat(1, 48, 48))),
        Sample("image_edit", "change the text to \"CLOSED\"", source=src, target=Visual(latent=lat(1, 48, 48))),
        Sample("i2t", "What does the sign say? Answer in detail.", answer="The sign says OPEN. " * 12, source=vit),
        Sample("t2v", "a red square sliding to the right over a blue background " * 2, target=Visual(latent=lat(4, 30, 53))),
    ]
    rendered = [builder.render(s) for s in samples]
    used = sum(len(r) for r in rendered)
    filler_answer = "x" * max(total - used - 160, 16)
    rendered.append(builder.render(Sample("i2t", "Describe.", answer=filler_answer, source=Visual(
        vit_tokens=torch.randn(4, hidden, generator=g), vit_grid=(1, 4, 4)))))
    return rendered


def step_flops(model: Lance, batch) -> float:
    cfg = model.config.text
    h, d = cfg.hidden_size, cfg.head_dim
    layer_params = (h * cfg.num_attention_heads * d * 2 + h * cfg.num_key_value_heads * d * 2
                    + 3 * h * cfg.intermediate_size)
    pairs = int(dense_mask(batch.layout).sum())
    return cfg.num_hidden_layers * (6 * layer_params * batch.num_tokens + 12 * cfg.num_attention_heads * d * pairs)


def build(preset: str, device: torch.device, frozen_embeddings: bool = True) -> Lance:
    """The released recipe freezes the token embeddings and lm_head (official SFT scripts)."""
    name, _, layers = preset.partition(":")
    cfg = LanceConfig.from_preset(name, freeze_embeddings=frozen_embeddings, freeze_lm_head=frozen_embeddings)
    cfg.vit = None
    if layers:
        cfg.text.num_hidden_layers = int(layers)
    with torch.device(device):
        model = Lance(cfg)
    model.init_weights()
    return model


def run(preset: str, steps: int, warmup: int, compile_: bool, rank: int, world: int, device: torch.device,
        frozen_embeddings: bool = True) -> dict:
    torch.manual_seed(rank)
    model = build(preset, device, frozen_embeddings)
    if compile_:
        compile_layers(model)
    from pipelines.parallel import apply_fsdp

    apply_fsdp(model, device, bf16=True)  # fp32 master weights, bf16 compute, as training runs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-15, fused=True)
    builder = SequenceBuilder(ByteTokenizer())
    rendered = reference_samples(model.config.text.hidden_size, 16384, builder)
    flops = step_flops(model, pack_rendered(rendered, model.config))
    times, phases = [], {"pack": [], "forward": [], "backward": [], "optimizer": []}
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch = pack_rendered(rendered, model.config).to(device)
        t1 = time.perf_counter()
        out = model(batch, generator=torch.Generator(device=device).manual_seed(i))
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        out.loss.backward()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        if i >= warmup:
            times.append(t4 - t0)
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k].append(dt)
    times.sort()
    med = times[len(times) // 2]
    phase_ms = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in phases.items()}
    tokens = batch.num_tokens * world
    return {"preset": preset, "gpus": world, "compile": compile_, "tokens_per_step": tokens,
            "ms_per_step": med * 1e3, "tokens_per_s": tokens / med,
            "mfu": flops / med / (PEAK_TFLOPS * 1e12), "loss": float(out.loss.detach()),  # per GPU
            "spread_ms": (times[-1] - times[0]) * 1e3, "phase_ms": phase_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", default=None, help="preset[:layers], repeatable")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dist.init_process_group("nccl")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    results = [run(p, args.steps, args.warmup, not args.no_compile, rank, world, device)
               for p in args.preset or ["nano", "lance-3b:4", "lance-3b:8"]]
    if rank == 0:
        print(f"device: {torch.cuda.get_device_name(device)} x{world}, torch {torch.__version__}")
        print(f"{'preset':<12} {'gpus':>4} {'tokens':>7} {'ms/step':>8} {'tokens/s':>10} {'MFU':>6} {'spread ms':>9}")
        for r in results:
            print(f"{r['preset']:<12} {r['gpus']:>4} {r['tokens_per_step']:>7} {r['ms_per_step']:>8.1f} "
                  f"{r['tokens_per_s']:>10,.0f} {r['mfu']:>6.1%} {r['spread_ms']:>9.1f}  "
                  + " ".join(f"{k}={v:.1f}" for k, v in r["phase_ms"].items()))
        with open(os.path.join(args.out, f"train_step_x{world}.json"), "w") as f:
            json.dump(results, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Rollout throughput: images/s of the GRPO SDE sampler (per-step log-probs, CFG at every step).

A rollout batch is G samples of one prompt group, denoised by `lance_model.generation.sample_latents`
with noise on every step (the loop `rl/` runs), random weights in bf16, no ViT. Two shapes:
- `--preset nano --size 256` (pixel VAE; decode included, as a GRPO iteration needs the pixels);
- `--preset lance-3b --layers 36 --size 512` (decode not counted; MFU of the denoising forwards:
  matmul + attention FLOPs of every row's target tokens over the measured time).
The KV cache is on (the rollout default) unless `--no-cache`. Every figure counts images produced.

    PYTHONPATH=. python benchmarks/bench_rollout.py --preset nano --size 256 --group 8 24
    PYTHONPATH=. python benchmarks/bench_rollout.py --preset lance-3b --layers 36 --size 512 --group 24 --no-decode
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lance_model import Lance, LanceConfig
from lance_model.encoders.vae import build_vae
from lance_model.generation import SamplerOptions, sample_latents
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer

PEAK_BF16 = 790e12  # bf16 dense matmul rate measured on an H200 (KINDS.md): the MFU denominator


def denoise_flops(cfg: LanceConfig, rows: int, target: int, prefix: int) -> float:
    """Forward FLOPs of one denoising step: every row's target tokens through one expert, attending
    its prefix and its own target."""
    t = cfg.text
    per_token = 2 * (t.hidden_size * t.num_attention_heads * t.head_dim * 2
                     + 2 * t.hidden_size * t.num_key_value_heads * t.head_dim + 3 * t.hidden_size * t.intermediate_size)
    attention = 4 * t.num_attention_heads * t.head_dim * target * (prefix + target)
    return t.num_hidden_layers * rows * (per_token * target + attention)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--group", type=int, nargs="+", default=[8, 24])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--label", default="", help="a name for this code version in the output")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    cfg = LanceConfig.from_preset(args.preset)
    cfg.vit = None
    if args.layers:
        cfg.text.num_hidden_layers = args.layers
    with torch.device(device):
        model = Lance(cfg)
    model.init_weights(std=0.02, generator=torch.Generator(device).manual_seed(0))
    model.to(torch.bfloat16).eval()
    vae = None if args.no_decode else build_vae(cfg.vae).to(device)
    builder = SequenceBuilder(ByteTokenizer())
    s = cfg.vae.spatial_stride
    opts = SamplerOptions(num_steps=args.steps, text_scale=4.5, noise_level=0.7, interval=None)
    lat = args.size // s
    print(f"[{args.label}] {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.preset} "
          f"x {cfg.text.num_hidden_layers} layers, {args.size}x{args.size} ({lat * lat} latent tokens), "
          f"{args.steps} SDE steps, CFG 4.5 every step, cache {not args.no_cache}, decode {vae is not None}", flush=True)
    rows_out = []
    for g in args.group:
        prompts = [Sample("t2i", f'a sign that says "OPEN {i}"', target=Visual(latent_shape=(1, lat, lat)))
                   for i in range(g)]
        times = []
        for r in range(args.repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                res = sample_latents(model, builder, prompts, list(range(r * g, (r + 1) * g)), opts,
                                     use_cache=not args.no_cache)
                if vae is not None:
                    vae.decode(res.latents.float())
            torch.cuda.synchronize()
            if r:
                times.append(time.perf_counter() - t0)
        assert res.log_probs is not None and torch.isfinite(res.log_probs).all()
        made = res.latents.shape[0]
        med = statistics.median(times)
        prefix = len(builder.render(prompts[0])) - (lat * lat + 2)
        flops = args.steps * denoise_flops(cfg, 2 * g, lat * lat + 2, prefix)
        row = {"label": args.label, "preset": args.preset, "layers": cfg.text.num_hidden_layers, "size": args.size,
               "group": g, "images": made, "s_per_batch": med, "images_per_s": made / med,
               "mfu": flops / med / PEAK_BF16}
        rows_out.append(row)
        print(f"[{args.label}] group {g:>3}: {med:7.3f} s/batch  {made / med:8.2f} images/s  "
              f"MFU(denoise fwd) {row['mfu'] * 100:5.1f}%", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows_out:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""GRPO rollout throughput: images/s of the SDE sampler (with per-step log-probs) on a GPU.

A rollout batch is G samples of one prompt group, denoised with `lance_model.generation.sample_latents`
in SDE mode (the same path `rl/` uses), CFG on, then decoded to pixels. Timed with the KV cache on
and off, for the `nano` preset (random weights, bf16, pixel VAE) at 256x256.

    PYTHONPATH=. python benchmarks/bench_rollout.py --group 8 --steps 10
"""
from __future__ import annotations

import argparse
import time

import torch

from lance_model import Lance, LanceConfig
from lance_model.encoders.vae import build_vae
from lance_model.generation import SamplerOptions, sample_latents
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--group", type=int, nargs="+", default=[8, 24])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda")
    cfg = LanceConfig.from_preset(args.preset)
    cfg.vit = None
    with torch.device(device):
        model = Lance(cfg)
    model.init_weights()
    model.to(torch.bfloat16).eval()
    vae = build_vae(cfg.vae).to(device)
    builder = SequenceBuilder(ByteTokenizer())
    s = cfg.vae.spatial_stride
    opts = SamplerOptions(num_steps=args.steps, text_scale=4.5, noise_level=0.7, interval=None)
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, preset {args.preset}, "
          f"{args.size}x{args.size}, {args.steps} SDE steps, CFG 4.5")
    print(f"{'group':>5} {'cache':>5} {'s/batch':>8} {'images/s':>9}")
    for g in args.group:
        prompts = [Sample("t2i", f'a sign that says "OPEN {i}"', target=Visual(latent_shape=(1, args.size // s, args.size // s)))
                   for i in range(g)]
        for cache in (True, False):
            times = []
            for r in range(args.repeats + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.no_grad():
                    res = sample_latents(model, builder, prompts, list(range(r * g, (r + 1) * g)), opts, use_cache=cache)
                    vae.decode(res.latents.float())
                torch.cuda.synchronize()
                if r:
                    times.append(time.perf_counter() - t0)
            med = sorted(times)[len(times) // 2]
            assert res.log_probs is not None and torch.isfinite(res.log_probs).all()
            print(f"{g:>5} {cache!s:>5} {med:>8.3f} {g / med:>9.1f}")


if __name__ == "__main__":
    main()

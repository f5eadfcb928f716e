"""Inference benchmark: seconds per denoising step with and without the KV cache, and x2t decode speed.

A `lance-3b`-shaped model (full width, `--layers` decoder layers, random weights, bf16, no ViT tower:
ViT tokens are given precomputed; no VAE: latents only) runs `lance_model.generation`'s real code:
- t2i at --height x --width (768x768 -> 48x48 = 2304 latent tokens), CFG on at every step
  (2 rows: conditional + text-unconditional): `DenoisingSession.velocity` with `use_cache=True`
  (target tokens only, against the cached prefixes) and `use_cache=False` (the full packed sequence
  through `Lance.backbone`, with each attention backend in --backends);
- image_edit with a source latent of the same size (a 2.3K-token prefix: where the cache matters);
- x2t: greedy decoding with the KV cache after an image prompt of 576 ViT tokens (672x672),
  batch 1 and each --decode-batch; tokens/s counts the tokens produced after the prefill's first one.
Before timing, every path's bf16 velocity is compared with the fp32 cached one (relative L2 error),
and the fp32 cached and uncached velocities with each other.

    PYTHONUNBUFFERED=1 python benchmarks/bench_inference.py --layers 8 --out $OUT
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after PYTHONPATH, so a baseline tree given there wins

from lance_model import Lance, LanceConfig
from lance_model.generation import DenoisingSession, SamplerOptions, TextOptions, generate_text
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer

CAPTION = ('A photograph of a wooden sign reading "OPEN" hanging on a blue door, morning light, '
           "a potted plant on the left and a bicycle leaning against the wall.")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, repeat: int) -> float:
    """Median seconds of `fn()` (host clock around a synchronised call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_model(preset: str, layers: int, device: torch.device, dtype: torch.dtype) -> Lance:
    config = LanceConfig.from_preset(preset)
    config.text.num_hidden_layers = layers
    config.vit = None
    with torch.device(device):
        model = Lance(config)
    model.init_weights(std=0.02, generator=torch.Generator(device).manual_seed(0))
    return model.to(dtype).eval()


def visual_samples(task: str, lat_h: int, lat_w: int, channels: int) -> list[Sample]:
    target = Visual(latent_shape=(1, lat_h, lat_w))
    if task == "t2i":
        return [Sample("t2i", CAPTION, target=target)]
    source = Visual(latent=torch.randn(channels, 1, lat_h, lat_w, generator=torch.Generator().manual_seed(1)))
    return [Sample("image_edit", "Change the word on the sign to CLOSED.", source=source, target=target)]


def bench_denoise(model, builder, task, lat_h, lat_w, backends, args, device) -> list[dict]:
    channels = model.config.vae.latent_channels
    samples = visual_samples(task, lat_h, lat_w, channels)
    options = SamplerOptions(interval=None)  # CFG on at every step: 2 rows
    x = torch.randn(1, lat_h * lat_w, channels, generator=torch.Generator().manual_seed(2)).to(device)
    # fp32 references (weights cast up losslessly, then back): how far each bf16 path is from
    # fp32, and how far the cached and uncached paths are from each other in fp32.
    dtype = model.vae2llm.weight.dtype
    model.float()
    model.config.attention_backend = "sdpa"
    with torch.no_grad():
        reference = DenoisingSession(model, builder, samples, options, use_cache=True).velocity(x, 0.9).float()
        full32 = DenoisingSession(model, builder, samples, options, use_cache=False).velocity(x, 0.9).float()
    fp32_gap = float((full32 - reference).norm() / reference.norm())
    print(f"{task:<10} fp32: cached vs uncached rel.err {fp32_gap:.2e}", flush=True)
    model.to(dtype)
    rows = []
    for use_cache, backend in [(True, "sdpa")] + [(False, b) for b in backends]:
        model.config.attention_backend = backend
        try:
            sync(device)
            t0 = time.perf_counter()
            session = DenoisingSession(model, builder, samples, options, use_cache=use_cache)
            sync(device)
            setup = time.perf_counter() - t0
            with torch.no_grad():
                v = session.velocity(x, 0.9)
                err = float((v.float() - reference).norm() / reference.norm())
                step = timed(functools.partial(session.velocity, x, 0.9), device, args.warmup, args.repeat)
        except Exception as exc:  # noqa: BLE001 - one failing backend must not lose the other rows
            print(f"{task} use_cache={use_cache} backend={backend}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        tokens = sum(len(r) for r in session.rendered)
        name = "KV cache (target only)" if use_cache else f"no cache, {backend}"
        rows.append({"task": task, "path": name, "s_per_step": step, "setup_s": setup, "rel_err_vs_fp32": err, "fp32_cached_vs_uncached": fp32_gap,
                     "rows": len(session.rendered), "tokens_per_row": tokens // len(session.rendered)})
        print(f"{task:<10} {name:<24} {step * 1e3:8.2f} ms/step  setup {setup:6.2f} s  rel.err vs fp32 {err:.2e}", flush=True)
    return rows


def text_options(tokens: int, compile: bool = False) -> TextOptions:
    """Fixed-length greedy decoding where the code supports it (`ignore_eos`); tokens are counted
    as produced either way. `compile`: TextOptions.compile (asked for only when set, so a baseline
    tree without the option still runs the eager step)."""
    try:
        return TextOptions(max_new_tokens=tokens, ignore_eos=True, **({"compile": True} if compile else {}))
    except TypeError:  # a version without ignore_eos: rows stop at <|im_end|>
        return TextOptions(max_new_tokens=tokens)


@torch.no_grad()
def greedy(model, builder, samples, tokens: int, compile: bool = False):
    return generate_text(model, builder, samples, text_options(tokens, compile), list(range(len(samples))))


def bench_decode(model, builder, args, device) -> list[dict]:
    """Tokens/s of the decode phase: tokens produced after the first one (which the prefill makes),
    over (time to make up to n + 1 tokens) - (time to make 1)."""
    hidden = model.config.text.hidden_size
    g = torch.Generator().manual_seed(3)
    grid = (1, 48, 48)  # a 672x672 image: 24x24 = 576 merged ViT tokens
    model.config.attention_backend = "sdpa"
    rows = []
    for batch in sorted({1, *args.decode_batch}):
        samples = [Sample("i2t", "Describe the image in detail.",
                          source=Visual(vit_tokens=torch.randn(576, hidden, generator=g).to(model.vae2llm.weight.dtype),
                                        vit_grid=grid)) for _ in range(batch)]
        n = args.decode_tokens
        run = functools.partial(greedy, model, builder, samples, compile=args.decode_compile)

        def measure(tokens: int, run=run) -> tuple[float, int]:
            """(median seconds of a call of `tokens` tokens, tokens it produced over all rows)"""
            return timed(functools.partial(run, tokens), device, 1, 3), sum(len(o.token_ids) for o in run(tokens))

        prefill, first = measure(1)
        total, made = measure(n + 1)
        decode = total - prefill
        tok_s = (made - first) / decode
        # the steady-state rate: the extra time and tokens of a call twice as long (what a call's
        # fixed costs, prefill and CUDA-graph capture included, add is cancelled out)
        longer, made_longer = measure(2 * n + 1)
        per_token = (longer - total) / max((made_longer - made) / batch, 1)
        setup = decode - per_token * (made - first) / batch
        rows.append({"batch": batch, "tokens_requested": batch * n, "tokens_made": made - first, "prefill_s": prefill,
                     "decode_s": decode, "tokens_per_s": tok_s, "steady_ms_per_step": per_token * 1e3,
                     "steady_tokens_per_s": batch / per_token, "fixed_decode_setup_s": setup})
        print(f"x2t decode batch {batch}: {tok_s:8.1f} tokens/s produced ({made - first} of {batch * n} requested "
              f"in {decode * 1e3:.0f} ms), prefill {prefill * 1e3:.1f} ms; steady state {per_token * 1e3:.2f} ms "
              f"per step = {batch / per_token:.0f} tokens/s, fixed decode cost per call {setup * 1e3:.0f} ms", flush=True)
    return rows


def profile_decode(model, builder, tokens: int, device, compile: bool = False) -> None:
    """Kernels of one batch-1 greedy call (prefill, graph capture and replays) by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    hidden = model.config.text.hidden_size
    sample = Sample("i2t", "Describe the image in detail.",
                    source=Visual(vit_tokens=torch.randn(576, hidden).to(model.vae2llm.weight.dtype), vit_grid=(1, 48, 48)))
    greedy(model, builder, [sample], tokens, compile)
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        greedy(model, builder, [sample], tokens, compile)
        sync(device)
    print(prof.key_averages().table(sort_by="cuda_time_total" if device.type == "cuda" else "cpu_time_total",
                                    row_limit=25), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="lance-3b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--stride", type=int, default=16, help="VAE spatial stride (latent side = size / stride)")
    p.add_argument("--backends", nargs="*", default=["sdpa", "flex"], help="attention backends of the uncached path")
    p.add_argument("--tasks", nargs="*", default=["t2i", "image_edit"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-batch", type=int, nargs="+", default=[8, 32])
    p.add_argument("--decode-compile", action="store_true", help="greedy decoding with TextOptions.compile")
    p.add_argument("--decode-profile", type=int, default=0, metavar="TOKENS",
                   help="profile one batch-1 greedy call of TOKENS tokens (kernel table by GPU time)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_model(args.preset, args.layers, device, dtype)
    builder = SequenceBuilder(ByteTokenizer())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.preset} x {args.layers} layers, {args.dtype}", flush=True)
    lat_h, lat_w = args.height // args.stride, args.width // args.stride
    results = {"device": name, "torch": torch.__version__, "layers": args.layers, "dtype": args.dtype,
               "latent": [lat_h, lat_w], "denoise": [], "decode": []}
    for task in args.tasks:
        results["denoise"] += bench_denoise(model, builder, task, lat_h, lat_w, args.backends, args, device)
    if args.decode_tokens:
        results["decode"] = bench_decode(model, builder, args, device)
    if args.decode_profile:
        profile_decode(model, builder, args.decode_profile, device, args.decode_compile)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_inference.json").write_text(json.dumps(results, indent=2))
    print("\n| task | path | s / step (CFG, 2 rows) | tokens / row | setup s | rel. err vs fp32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results["denoise"]:
        print(f"| {r['task']} | {r['path']} | {r['s_per_step']:.4f} | {r['tokens_per_row']} | {r['setup_s']:.2f} "
              f"| {r['rel_err_vs_fp32']:.1e} |")
    for r in results["decode"]:
        print(f"| x2t decode | batch {r['batch']} | {r['tokens_per_s']:.0f} tokens/s produced "
              f"(steady {r.get('steady_tokens_per_s', float('nan')):.0f}) | {r['tokens_made']} tokens | "
              f"prefill {r['prefill_s'] * 1e3:.0f} ms | |")


if __name__ == "__main__":
    main()

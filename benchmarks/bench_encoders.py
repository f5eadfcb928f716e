"""Encoder throughput: the Wan2.2-shaped VAE encoder and the Qwen2.5-VL-shaped ViT, batched by bucket
vs one sample at a time (issue 4, "Measure").

Both encoders are our own code with random weights: `lance_model.encoders.vae.build_vae(VaeConfig())`
(diffusers `AutoencoderKLWan` in the Wan2.2 layout: base_dim 160, dim_mult (1,2,4,4), 2 res blocks,
48 latent channels, x16 spatial / x4 temporal) and `lance_model.encoders.vit.build_vit(VitConfig())`
(the released Qwen2.5-VL vision tower shape: 32 blocks, width 1280, 2x2 merger to 2048). Both run in
bf16 (the VAE also in fp32 for images, which is what `VaeStage` does today: it never casts the VAE).

Sizes come from the curation buckets (`data_curation.buckets.bucket_size` with `BucketConfig`'s
default areas): VAE images 768x768 (1:1 at 768^2), VAE video 480x848 (16:9 at 640^2: "480p"),
ViT images 448x448 (1:1 at 448^2, the configured ViT image area) and 756x756 (768^2 rounded to the
ViT's 28-pixel stride), ViT video 252x448 (16:9 at 336^2, the configured ViT video area) and
448x812 (16:9 at 616^2). Videos have 69 frames (1 + 17*4, a valid Wan length; the ViT pads to 70).

"batched" is what `VaeStage` / `VitStage` do for a group of equal-shape inputs: one forward on the
stacked batch (VAE: [B,3,F,H,W]; ViT: the items' patch rows concatenated, one grid_thw row each).
"one at a time" loops over the same B items. Inputs are random (never zeros) and already on the
device (the VAE's float32 [-1,1] pixels, the ViT's float32 patch rows from `vit_patches`), so only
the encoders are timed (the host-side decode/resize/patchify and the copy are not). Timing: CUDA
events around each repetition after warm-up, median of --repeat repetitions.

    PYTHONUNBUFFERED=1 python benchmarks/bench_encoders.py --out $OUT
    python benchmarks/bench_encoders.py --smoke          # tiny shapes on CPU, checks the code runs

`--vit-attention` compares the ViT's attention implementations instead: transformers' stock path
(one SDPA call per window / frame, `STOCK_ATTN`) against ours (one call per layer, `VARLEN_ATTN`),
same weights and inputs, batched as `VitStage` runs them; it reports both times and the max abs
difference of the outputs. On a GPU it runs the released tower in bf16 at the ViT cases above; on
CPU (or with --cpu) a narrower tower in fp32 (CPU_VIT: the released depth 32 and head width 80,
fewer heads and a narrower MLP, so that a run takes minutes on a few cores) at 448^2, 756^2 and a
17-frame 252x448 clip:

    python benchmarks/bench_encoders.py --vit-attention --cpu --repeat 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_curation.buckets import bucket_size
from data_curation.config import BucketConfig
from lance_model.config import VaeConfig, VitConfig
from lance_model.encoders.vae import build_vae
from lance_model.encoders.vit import (
    STOCK_ATTN,
    VARLEN_ATTN,
    build_vit,
    encode_vit,
    set_vit_attention,
    vit_patches,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeat: int) -> list[float]:
    """Seconds of each of `repeat` calls of `fn()` after `warmup` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    encoder: str          # "vae" | "vit"
    kind: str             # "image" | "video"
    height: int
    width: int
    frames: int
    batch: int
    dtype: str = "bf16"
    note: str = ""


def default_cases(args) -> list[Case]:
    b = BucketConfig()
    vae_img = bucket_size("1:1", b.vae_image_area, 16)
    vae_vid = bucket_size("16:9", b.vae_video_area, 16)
    vit_img_cfg = bucket_size("1:1", b.vit_image_area, 28)
    vit_img_768 = bucket_size("1:1", 768 * 768, 28)
    vit_vid_cfg = bucket_size("16:9", b.vit_video_area, 28)
    vit_vid_616 = bucket_size("16:9", 616 * 616, 28)
    f, ib, vb = args.frames, args.image_batch, args.video_batch
    # Most important first (a --time-budget cut drops the tail); the fp32 VAE case is last.
    return [
        Case("vae", "image", *vae_img, 1, ib, "bf16", "768^2 1:1 bucket"),
        Case("vit", "image", *vit_img_768, 1, ib, "bf16", "768^2 area, 28-rounded"),
        Case("vae", "video", *vae_vid, f, vb, "bf16", "480p: 16:9 at 640^2 area"),
        Case("vit", "video", *vit_vid_cfg, f, vb, "bf16", "configured ViT video area 336^2"),
        Case("vit", "image", *vit_img_cfg, 1, ib, "bf16", "configured ViT image area 448^2"),
        Case("vit", "video", *vit_vid_616, f, vb, "bf16", "16:9 at 616^2 area"),
        Case("vae", "image", *vae_img, 1, ib, "fp32", "as VaeStage runs it (no cast)"),
    ]


def smoke_cases() -> list[Case]:
    return [Case("vae", "image", 64, 64, 1, 4), Case("vae", "image", 64, 64, 1, 4, "fp32"),
            Case("vit", "image", 56, 56, 1, 4), Case("vae", "video", 32, 48, 9, 2),
            Case("vit", "video", 56, 112, 9, 2)]


SMOKE_VAE = {"base_dim": 16, "decoder_base_dim": 16, "num_res_blocks": 1}
SMOKE_VIT = {"depth": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128, "out_hidden_size": 64,
             "fullatt_block_indexes": (1,)}


# Released depth / full-attention layers / head width (80), 4 heads instead of 16, MLP 4x narrower.
CPU_VIT = {"hidden_size": 320, "num_heads": 4, "intermediate_size": 855, "out_hidden_size": 512}


def vit_attention_cases(args, device: torch.device) -> list[Case]:
    b = BucketConfig()
    if device.type == "cuda":
        return [c for c in default_cases(args) if c.encoder == "vit"]
    return [Case("vit", "image", *bucket_size("1:1", b.vit_image_area, 28), 1, args.image_batch, "fp32",
                 "configured ViT image area 448^2"),
            Case("vit", "image", *bucket_size("1:1", 768 * 768, 28), 1, args.image_batch, "fp32",
                 "768^2 area, 28-rounded"),
            Case("vit", "video", *bucket_size("16:9", b.vit_video_area, 28), 17, args.video_batch, "fp32",
                 "configured ViT video area 336^2, 17 frames")]


def run_vit_attention(args, device: torch.device) -> list[dict]:
    """Stock per-window attention vs one call per layer, per case (same tower, same inputs)."""
    t_start = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vit_cfg = VitConfig(**({} if device.type == "cuda" else CPU_VIT))
    if args.smoke:
        vit_cfg = VitConfig(**SMOKE_VIT)
    torch.manual_seed(0)
    with torch.device(device):
        vit = build_vit(vit_cfg).to(device=device, dtype=dtype)
    print(f"ViT {sum(p.numel() for p in vit.parameters()) / 1e6:.0f}M params, depth {vit_cfg.depth}, width "
          f"{vit_cfg.hidden_size}, {vit_cfg.num_heads} heads, {dtype}, on {device}", flush=True)
    cases = smoke_cases() if args.smoke else vit_attention_cases(args, device)
    rows = []
    for case in [c for c in cases if c.encoder == "vit"]:
        if time.perf_counter() - t_start > args.time_budget:
            print(f"skipped (time budget): {case}", flush=True)
            continue
        batched, _, out_shape, _ = vit_fns(vit, vit_cfg, case, device)
        outs, times = {}, {STOCK_ATTN: [], VARLEN_ATTN: []}
        for impl in times:
            set_vit_attention(vit, impl)
            with torch.no_grad():
                outs[impl] = batched().float()
        # Alternate the two per repetition, so a change in machine load hits both alike.
        for _ in range(args.repeat):
            for impl in times:
                set_vit_attention(vit, impl)
                times[impl] += timed(batched, device, 0, 1)  # warm: outs above
        diff = float((outs[VARLEN_ATTN] - outs[STOCK_ATTN]).abs().max())
        stock_s, ours_s = statistics.median(times[STOCK_ATTN]), statistics.median(times[VARLEN_ATTN])
        row = dict(dataclasses.asdict(case), dtype=str(dtype).removeprefix("torch."), out_shape=list(out_shape),
                   stock_times_s=times[STOCK_ATTN], one_call_times_s=times[VARLEN_ATTN], stock_s=stock_s, one_call_s=ours_s, speedup=stock_s / ours_s, max_abs_diff=diff,
                   stock_items_per_s=case.batch / stock_s, one_call_items_per_s=case.batch / ours_s)
        rows.append(row)
        print(f"vit {case.kind} {case.height}x{case.width}x{case.frames} B={case.batch}: stock {stock_s * 1e3:.0f} ms, "
              f"one call per layer {ours_s * 1e3:.0f} ms, x{stock_s / ours_s:.2f}, max |diff| {diff:.1e} "
              f"[t={time.perf_counter() - t_start:.0f}s]", flush=True)
    set_vit_attention(vit, VARLEN_ATTN)
    print("\n| ViT input (H×W×frames) | dtype | batch | stock: items/s | one call per layer: items/s | speed-up "
          "| max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        unit = "clips/s" if r["kind"] == "video" else "img/s"
        print(f"| {r['kind']} {r['height']}×{r['width']}×{r['frames']} | {r['dtype']} | {r['batch']} "
              f"| {r['stock_items_per_s']:.2f} {unit} | {r['one_call_items_per_s']:.2f} {unit} "
              f"| {r['speedup']:.2f}× | {r['max_abs_diff']:.1e} |")
    return rows


# ----------------------------------------------------------------------------- runners
def vae_fns(vae, case: Case, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(case.batch, 3, case.frames, case.height, case.width, generator=g, device=device) * 2 - 1
    singles = [x[i:i + 1].contiguous() for i in range(case.batch)]

    def batched():
        return vae.encode(x)

    def one_at_a_time():
        return [vae.encode(s) for s in singles]

    with torch.no_grad():  # shape check (and the first compile/cudnn set-up) before timing
        lat = batched()
        one = vae.encode(singles[0])
    err = (lat[:1].float() - one.float()).norm() / one.float().norm()
    return batched, one_at_a_time, tuple(lat.shape[1:]), float(err)


def vit_fns(vit, vit_cfg: VitConfig, case: Case, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    items = [vit_patches(torch.rand(case.frames, 3, case.height, case.width, generator=g, device=device), vit_cfg)
             for _ in range(case.batch)]
    patches = torch.cat([p for p, _ in items])
    grids = torch.stack([gr for _, gr in items])

    def batched():
        return encode_vit(vit, patches, grids)

    def one_at_a_time():
        return [encode_vit(vit, p, gr) for p, gr in items]

    with torch.no_grad():
        toks = batched()
        one = encode_vit(vit, *items[0])
    n = one.shape[0]
    err = (toks[:n].float() - one.float()).norm() / one.float().norm()
    return batched, one_at_a_time, (n, toks.shape[1]), float(err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-batch", type=int, default=8)
    ap.add_argument("--video-batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=69)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="case indexes to run (default: all)")
    ap.add_argument("--time-budget", type=float, default=1e9,
                    help="skip the remaining cases once this many seconds have passed")
    ap.add_argument("--smoke", action="store_true", help="tiny models and shapes (CPU check)")
    ap.add_argument("--out", default=None, help="directory for results.json")
    ap.add_argument("--vit-attention", action="store_true",
                    help="compare the ViT's stock per-window attention with one call per layer")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    args = ap.parse_args()

    t_start = time.perf_counter()
    use_cuda = torch.cuda.is_available() and not args.smoke and not args.cpu
    device = torch.device("cuda" if use_cuda else "cpu")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}  torch {torch.__version__}", flush=True)
    else:
        print(f"device: CPU, {torch.get_num_threads()} threads  torch {torch.__version__}", flush=True)
    if args.vit_attention:
        rows = run_vit_attention(args, device)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "vit_attention.json").write_text(json.dumps(rows, indent=1))
        print(f"\ntotal {time.perf_counter() - t_start:.0f}s", flush=True)
        return
    vae_cfg = VaeConfig(**(SMOKE_VAE if args.smoke else {}))
    vit_cfg = VitConfig(**(SMOKE_VIT if args.smoke else {}))
    cases = smoke_cases() if args.smoke else default_cases(args)
    if args.only:
        cases = [cases[int(i)] for i in args.only]

    torch.manual_seed(0)
    with torch.device(device):  # random init directly on the device
        vae = build_vae(vae_cfg).to(device)  # fp32; cast to a case's dtype when it runs
        vit = build_vit(vit_cfg).to(device=device, dtype=torch.bfloat16)
    n_vae = sum(p.numel() for p in vae.model.encoder.parameters()) + sum(
        p.numel() for p in vae.model.quant_conv.parameters())
    n_vit = sum(p.numel() for p in vit.parameters())
    print(f"built: VAE encoder {n_vae / 1e6:.0f}M params, ViT {n_vit / 1e6:.0f}M params "
          f"({time.perf_counter() - t_start:.1f}s)", flush=True)

    rows = []
    vae_dtype = "fp32"
    for case in cases:
        if time.perf_counter() - t_start > args.time_budget:
            print(f"skipped (time budget): {case}", flush=True)
            continue
        if case.encoder == "vae":
            if case.dtype != vae_dtype:
                vae = vae.to(DTYPES[case.dtype])
                vae_dtype = case.dtype
            batched, loop, out_shape, err = vae_fns(vae, case, device)
        else:
            batched, loop, out_shape, err = vit_fns(vit, vit_cfg, case, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tb = timed(batched, device, args.warmup, args.repeat)
        mem_b = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        tl = timed(loop, device, args.warmup, args.repeat)
        mb, ml = statistics.median(tb), statistics.median(tl)
        row = dict(dataclasses.asdict(case), out_shape=list(out_shape), rel_err_batched_vs_single=err,
                   batched_s=tb, loop_s=tl, batched_median_s=mb, loop_median_s=ml,
                   batched_items_per_s=case.batch / mb, loop_items_per_s=case.batch / ml,
                   speedup=ml / mb, peak_gib_batched=mem_b)
        rows.append(row)
        print(f"{case.encoder} {case.kind} {case.height}x{case.width}x{case.frames} B={case.batch} "
              f"{case.dtype}: batched {mb * 1e3:.1f} ms, loop {ml * 1e3:.1f} ms, x{ml / mb:.2f}, "
              f"out {tuple(out_shape)}, err {err:.1e}, peak {mem_b:.1f} GiB "
              f"[t={time.perf_counter() - t_start:.0f}s]", flush=True)

    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))

    print("\n| encoder | input (H×W×frames) | dtype | batch | batched: items/s | one at a time: items/s "
          "| batched speed-up | frames/s batched / one | peak GiB (batched) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        unit = "clips/s" if r["kind"] == "video" else "img/s"
        fps = (f"{r['batched_items_per_s'] * r['frames']:.1f} / {r['loop_items_per_s'] * r['frames']:.1f}"
               if r["kind"] == "video" else "")
        print(f"| {r['encoder'].upper()} {r['kind']} | {r['height']}×{r['width']}×{r['frames']} | {r['dtype']} "
              f"| {r['batch']} | {r['batched_items_per_s']:.2f} {unit} | {r['loop_items_per_s']:.2f} {unit} "
              f"| {r['speedup']:.2f}× | {fps} | {r['peak_gib_batched']:.1f} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()

"""Train-step benchmark of the MoT backbone (lance-3b width) on the reference 16K-token mixed pack.

Forward + backward of `MoTDecoder` layers + final norms (no embeddings, no heads, no optimizer step)
in bf16 (bf16 parameters, inputs that require grad), for each attention backend x layer count x eager /
compiled layers (`lance_model.backbone.compile_layers`: the parts around the attention compiled). Backends:
`sdpa` (dense boolean mask, memory-efficient kernel), `flex` (FlexAttention, block mask, compiled
kernel), `flash` (`FlashVarlenAttention`: the mask split into varlen problems; the flash-attn package
when installed, else PyTorch's bundled FlashAttention-2 kernels). Before timing, a correctness check
at full sequence length compares outputs and parameter gradients of the bf16 backends against an fp32
SDPA reference.

FLOPs (from the reference pack's module, so figures compare across implementations):
    step FLOPs = layers x (6 x matmul_params_per_token x tokens + 12 x heads x head_dim x visible_pairs)
with matmul_params_per_token = the q, k, v, o, gate, up, down weights of ONE expert (each token
passes one expert). MFU is against --peak-tflops (798: a measured bf16 8192^3 matmul on the H100).

The pack module `mixed_pack.py` is read from `../shared/bench` beside the repository when present,
else from `--mixed-pack` / the `LANCE_MIXED_PACK` environment variable (a file or its folder). For a
device run copy it into the git-ignored `.device/` and pass `LANCE_MIXED_PACK=.device/mixed_pack.py`.

    PYTHONUNBUFFERED=1 python benchmarks/bench_backbone.py --layers 4 8 --out $OUT
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lance_model.attention import FlashVarlenAttention, FlexAttention, MaskLayout, SdpaAttention, dense_mask
from lance_model.backbone import MoTDecoder, compile_layers
from lance_model.config import LanceConfig, TextConfig
from lance_model.rope import rotary_cos_sin

OFFICIAL_S_PER_STEP = {4: 0.138, 8: 0.265}  # official implementation, same pack, H100
COMPILE_KW: dict = {}  # extra torch.compile arguments for compile_layers (--compile-options)
FLEX_KW: dict = {}  # FlexAttention constructor arguments (--flex-kernel-options)


# ----------------------------------------------------------------------------------- the pack
def load_mixed_pack(explicit: str | None):
    candidates = [REPO.parent / "shared" / "bench" / "mixed_pack.py"]
    for c in (explicit, os.environ.get("LANCE_MIXED_PACK")):
        if c:
            c = Path(c)
            candidates.insert(0, c / "mixed_pack.py" if c.is_dir() else c)
    for path in candidates:
        if path.is_file():
            spec = importlib.util.spec_from_file_location("mixed_pack", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod, str(path)
    raise SystemExit(f"mixed_pack.py not found (tried {[str(c) for c in candidates]}); "
                     "pass --mixed-pack or set LANCE_MIXED_PACK")


def build_pack(samples, gen_tokens: str):
    """Rendered per-token expert flags -> expert-sorted storage permutation + MaskLayout + positions.

    gen_tokens="inner": a gen split's first and last tokens (vision start/end) are understanding
    tokens, its inner tokens (the VAE latents) generation tokens; "whole": the whole split is gen."""
    is_gen = []
    for sample in samples:
        for _, length, expert in sample:
            if expert == "gen" and gen_tokens == "inner":
                is_gen += [False] + [True] * (length - 2) + [False]
            else:
                is_gen += [expert == "gen"] * length
    is_gen = torch.tensor(is_gen)
    rendered = torch.arange(len(is_gen))
    perm = torch.cat([rendered[~is_gen], rendered[is_gen]])  # storage i <- rendered perm[i]
    layout = MaskLayout.from_splits([[(m, n) for m, n, _ in s] for s in samples], perm)
    positions = perm[None].expand(3, -1).clone()  # arange positions (rendered index), storage order
    return layout, positions, int((~is_gen).sum()), int(is_gen.sum())


def text_config(layers: int) -> TextConfig:
    base = LanceConfig.from_preset("lance-3b").text
    cfg = TextConfig(**{k: getattr(base, k) for k in base.__dataclass_fields__})
    cfg.num_hidden_layers = layers
    cfg.vocab_size = 16  # the embedding table is not used by the decoder forward; keep memory small
    return cfg


def matmul_params_per_token(cfg: TextConfig) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * cfg.num_attention_heads * d * 2 + h * cfg.num_key_value_heads * d * 2  # q, o, k, v
    return attn + 3 * h * cfg.intermediate_size


# ----------------------------------------------------------------------------------- the step
def make_attention(name: str):
    if name == "sdpa":
        return SdpaAttention()
    if name == "flex":
        return FlexAttention(**FLEX_KW)
    if name == "flash":  # the flash-attn package when installed, else PyTorch's bundled FA2 kernels
        return FlashVarlenAttention()
    raise ValueError(name)


class Setup:
    def __init__(self, layers, dtype, backend_name, compiled, pack, device, seed=0, state_dict=None):
        self.cfg = text_config(layers)
        torch.manual_seed(seed)
        self.model = MoTDecoder(self.cfg)
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        self.model.to(device=device, dtype=dtype)
        if compiled:
            compile_layers(self.model, **COMPILE_KW)
        layout, positions, n_und, n_gen = pack
        self.layout = layout.to(device)
        cos, sin = rotary_cos_sin(positions.to(device), self.cfg.head_dim, self.cfg.rope_theta,
                                  self.cfg.mrope_section, interleaved=self.cfg.mrope_interleaved)
        self.cos, self.sin = cos.to(dtype), sin.to(dtype)
        self.backend = make_attention(backend_name)
        self.state = None
        self.n_und, self.n_gen = n_und, n_gen
        self.dtype, self.device = dtype, device

    def prepare(self):
        self.state = self.backend.prepare(self.layout)
        return self.state

    def inputs(self, seed):
        g = torch.Generator(device=self.device).manual_seed(seed)
        h = self.cfg.hidden_size
        mk = lambda n: torch.randn(n, h, device=self.device, generator=g, dtype=torch.float32).to(self.dtype)
        return mk(self.n_und), mk(self.n_gen), mk(self.n_und), mk(self.n_gen)  # x_und, x_gen, dy_und, dy_gen

    def step(self, x_und, x_gen, dy_und, dy_gen):
        for p in self.model.parameters():
            p.grad = None
        # inputs require grad, as in training (vae2llm / time embedder / ViT upstream are trainable)
        x_und, x_gen = x_und.detach().requires_grad_(), x_gen.detach().requires_grad_()
        backend, state = self.backend, self.state
        y_und, y_gen = self.model(x_und, x_gen, self.cos, self.sin,
                                  lambda i, q, k, v: backend.attend(q, k, v, state))
        torch.autograd.backward([y_und, y_gen], [dy_und, dy_gen])
        return y_und, y_gen


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def correctness(pack, device, layers, pairs_expected, log):
    """fp32 SDPA reference vs bf16 {sdpa, flex eager, flex compiled}: outputs and every grad."""
    layout = pack[0].to(device)
    allowed = int(dense_mask(layout).sum())
    log(f"mask check: dense rule allows {allowed} pairs, visible_pairs() = {pairs_expected} "
        f"({'OK' if allowed == pairs_expected else 'MISMATCH'})")
    torch.manual_seed(1)
    sd = {k: v.clone() for k, v in MoTDecoder(text_config(layers)).state_dict().items()}
    for k, v in list(sd.items()):  # give biases and norm weights non-trivial values
        if k.endswith("bias") or "norm" in k:
            sd[k] = v + 0.1 * torch.randn_like(v)
    ref = Setup(layers, torch.float32, "sdpa", False, pack, device, state_dict=sd)
    ref.prepare()
    x = [t.float() for t in ref.inputs(seed=123)]  # inputs drawn in fp32; bf16 runs use their rounding
    xb = [t.to(torch.bfloat16) for t in x]
    x = [t.float() for t in xb]  # same rounded inputs for the reference
    yr = ref.step(*x)
    ref_out = torch.cat([t.detach().float() for t in yr])
    ref_grads = {n: p.grad.detach().float() for n, p in ref.model.named_parameters() if p.grad is not None}
    del ref
    results = {"mask_pairs_ok": allowed == pairs_expected, "layers": layers, "runs": {}}
    ok = allowed == pairs_expected
    for name, backend, compiled in (("sdpa bf16 eager", "sdpa", False), ("flex bf16 eager", "flex", False),
                                    ("flash bf16 eager", "flash", False), ("flex bf16 compiled", "flex", True),
                                    ("flash bf16 compiled", "flash", True)):
        s = Setup(layers, torch.bfloat16, backend, compiled, pack, device, state_dict=sd)
        s.prepare()
        y = s.step(*xb)
        out = torch.cat([t.detach().float() for t in y])
        finite = bool(torch.isfinite(out).all())
        gerr = {n: rel(p.grad, ref_grads[n]) for n, p in s.model.named_parameters() if p.grad is not None}
        all_g = rel(torch.cat([p.grad.float().flatten() for n, p in s.model.named_parameters() if p.grad is not None]),
                    torch.cat([ref_grads[n].flatten() for n, _ in s.model.named_parameters() if n in ref_grads]))
        worst = max(gerr, key=gerr.get)
        r = {"out_rel_err": rel(out, ref_out), "grad_rel_err_all": all_g, "grad_rel_err_worst": gerr[worst],
             "worst_param": worst, "finite": finite, "missing_grads": len(ref_grads) - len(gerr)}
        results["runs"][name] = r
        passed = finite and r["out_rel_err"] < 2e-2 and all_g < 2e-2 and gerr[worst] < 5e-2 and not r["missing_grads"]
        ok &= passed
        log(f"check {name:20s}: out {r['out_rel_err']:.2e}  grads(all) {all_g:.2e}  worst {gerr[worst]:.2e} "
            f"({worst})  {'PASS' if passed else 'FAIL'}")
        del s
        torch.cuda.empty_cache()
    results["pass"] = bool(ok)
    return results


def time_config(pack, device, layers, backend, compiled, warmup, iters, log):
    s = Setup(layers, torch.bfloat16, backend, compiled, pack, device)
    # block mask / dense mask build: once per batch, shared by all layers
    prep = []
    for _ in range(5 if backend == "flex" else 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        s.prepare()
        torch.cuda.synchronize()
        prep.append(time.perf_counter() - t0)
    x = s.inputs(seed=7)
    t0 = time.perf_counter()
    for _ in range(warmup):
        s.step(*x)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        s.step(*x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del s
    torch.cuda.empty_cache()
    return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times),
            "prepare_s": statistics.median(prep[1:]), "prepare_first_s": prep[0], "warmup_s": warm_s,
            "peak_mem_gib": peak}


def profile_config(pack, device, layers, backend, compiled, out_dir, log, rows=40):
    from torch.profiler import ProfilerActivity, profile

    s = Setup(layers, torch.bfloat16, backend, compiled, pack, device)
    s.prepare()
    x = s.inputs(seed=7)
    for _ in range(3):
        s.step(*x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            s.step(*x)
        torch.cuda.synchronize()
    tag = f"{backend}_{'compiled' if compiled else 'eager'}_{layers}l"
    try:
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=90)
    except (KeyError, AttributeError, RuntimeError):  # older profilers name the column after CUDA
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=90)
    if out_dir:
        (Path(out_dir) / f"profile_{tag}.txt").write_text(table)
    log(f"--- profile {tag} (2 steps) ---")
    log("\n".join(table.splitlines()[: rows + 4]))
    del s
    torch.cuda.empty_cache()


def attention_only(pack, device, configs, warmup, iters, log):
    """FlexAttention alone (compiled, our block mask, lance-3b heads) for several kernel_options."""
    from torch.nn.attention.flex_attention import flex_attention

    cfg = text_config(1)
    layout = pack[0].to(device)
    backend = FlexAttention()
    bm = backend.prepare(layout)
    L, H, Hkv, D = len(layout), cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(3)
    mk = lambda h: torch.randn(L, h, D, device=device, generator=g, dtype=torch.bfloat16)
    q0, k0, v0, do = mk(H), mk(Hkv), mk(Hkv), mk(H)
    out = []
    for opts in configs:
        torch._dynamo.reset()
        fn = torch.compile(flex_attention, dynamic=False, **({"mode": opts.pop("__mode__")} if "__mode__" in opts else {}))
        q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))

        def fwd(fn=fn, q=q, k=k, v=v, opts=opts):
            return fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=bm,
                      enable_gqa=True, kernel_options=opts or None)[0].transpose(0, 1)

        def fwd_bwd(fwd=fwd, q=q, k=k, v=v):
            q.grad = k.grad = v.grad = None
            fwd().backward(do)

        res = {"kernel_options": opts}
        try:
            t0 = time.perf_counter()
            for _ in range(warmup):
                fwd_bwd()
            torch.cuda.synchronize()
            res["compile_s"] = time.perf_counter() - t0
            for name, f in (("fwd", lambda: fwd()), ("fwd_bwd", fwd_bwd)):
                ts = []
                for _ in range(iters):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    with torch.set_grad_enabled(name == "fwd_bwd"):
                        f()
                    b.record()
                    b.synchronize()
                    ts.append(a.elapsed_time(b) / 1e3)
                res[name + "_ms"] = statistics.median(ts) * 1e3
            res["bwd_ms"] = res["fwd_bwd_ms"] - res["fwd_ms"]
        except Exception as e:  # noqa: BLE001 - a config the kernel cannot take (shared memory, block sizes)
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        out.append(res)
        log(f"attn-only {json.dumps(res)}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--backends", nargs="+", default=["sdpa", "flex", "flash"], choices=["sdpa", "flex", "flash"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--check-layers", type=int, default=2, help="layers for the correctness check (0: skip)")
    ap.add_argument("--profile", nargs="*", default=[], help="configs to profile, e.g. flex:compiled:4")
    ap.add_argument("--gen-tokens", choices=["inner", "whole"], default="inner")
    ap.add_argument("--peak-tflops", type=float, default=798.0)
    ap.add_argument("--mixed-pack", default=None)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--compile-options", default=None, help="JSON: torch.compile options for compile_layers")
    ap.add_argument("--flex-kernel-options", default=None, help="JSON: FlexAttention kernel_options")
    ap.add_argument("--attn-configs", default=None, help="JSON list of flex kernel_options: attention-only runs")
    args = ap.parse_args()

    lines = []
    if args.compile_options:
        COMPILE_KW["options"] = json.loads(args.compile_options)
    if args.flex_kernel_options:
        FLEX_KW["kernel_options"] = json.loads(args.flex_kernel_options)

    def log(msg=""):
        print(msg, flush=True)
        lines.append(str(msg))

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    mp, mp_path = load_mixed_pack(args.mixed_pack)
    samples = mp.mixed_pack()
    pairs = mp.visible_pairs(samples)
    pack = build_pack(samples, args.gen_tokens)
    n_tok = len(pack[0])
    cfg = text_config(1)
    mpp = matmul_params_per_token(cfg)
    dev_name = torch.cuda.get_device_name()
    log(f"device: {dev_name}; torch {torch.__version__}; pack {mp_path}: {n_tok} tokens "
        f"({pack[2]} und, {pack[3]} gen; gen_tokens={args.gen_tokens}), {pairs} visible pairs "
        f"({pairs / n_tok**2:.1%} dense); matmul params/token/layer {mpp}")
    report = {"device": dev_name, "torch": torch.__version__, "tokens": n_tok, "und_tokens": pack[2],
              "gen_tokens": pack[3], "gen_tokens_rule": args.gen_tokens, "visible_pairs": pairs,
              "matmul_params_per_token_per_layer": mpp, "peak_tflops": args.peak_tflops,
              "argv": sys.argv, "tag": args.tag, "results": []}
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)

    def flush():
        if out_dir:
            (out_dir / f"bench_backbone{args.tag}.json").write_text(json.dumps(report, indent=1))
            (out_dir / f"bench_backbone{args.tag}.log").write_text("\n".join(lines) + "\n")

    if args.attn_configs:
        report["attention_only"] = attention_only(pack, device, json.loads(args.attn_configs), args.warmup,
                                                  args.iters, log)
        flush()

    if args.check_layers:
        report["check"] = correctness(pack, device, args.check_layers, pairs, log)
        flush()

    for layers in args.layers:
        flops = layers * (6 * mpp * n_tok + 12 * cfg.num_attention_heads * cfg.head_dim * pairs)
        for backend in args.backends:
            for mode in args.modes:
                try:
                    r = time_config(pack, device, layers, backend, mode == "compiled", args.warmup, args.iters, log)
                except torch.OutOfMemoryError as e:
                    log(f"{layers}L {backend} {mode}: OOM ({str(e).splitlines()[0]})")
                    torch.cuda.empty_cache()
                    continue
                t = r["median_s"]
                r.update(layers=layers, backend=backend, mode=mode, flops=flops, tokens_per_s=n_tok / t,
                         tflops=flops / t / 1e12, mfu=flops / t / 1e12 / args.peak_tflops,
                         speedup_vs_official=OFFICIAL_S_PER_STEP.get(layers, math.nan) / t)
                report["results"].append(r)
                log(f"{layers}L {backend:5s} {mode:8s}: {t*1e3:8.1f} ms/step (min {r['min_s']*1e3:.1f}, "
                    f"spread {(max(r['times_s']) - r['min_s'])*1e3:.1f})  {r['tokens_per_s']:9.0f} tok/s  "
                    f"MFU {r['mfu']:.1%}  x{r['speedup_vs_official']:.2f} vs official  "
                    f"mask {r['prepare_s']*1e3:.1f} ms (first {r['prepare_first_s']*1e3:.0f})  "
                    f"warmup {r['warmup_s']:.0f} s  peak {r['peak_mem_gib']:.1f} GiB")
                flush()

    for spec in args.profile:
        backend, mode, layers = spec.split(":")
        profile_config(pack, device, int(layers), backend, mode == "compiled", out_dir, log)

    log("")
    log("| layers | backend | compile | ms/step | tokens/s | MFU | speedup vs official | mask build ms |")
    log("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in report["results"]:
        log(f"| {r['layers']} | {r['backend']} | {'layers' if r['mode'] == 'compiled' else 'eager'} | "
            f"{r['median_s']*1e3:.1f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | "
            f"{r['speedup_vs_official']:.2f}x | {r['prepare_s']*1e3:.1f} |")
    for layers, s in OFFICIAL_S_PER_STEP.items():
        log(f"official {layers}L: {s*1e3:.0f} ms/step, {n_tok / s:,.0f} tok/s")
    flush()


if __name__ == "__main__":
    main()

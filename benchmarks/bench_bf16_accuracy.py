"""Where the bf16 error of a denoising velocity comes from: the model in bf16 against its fp32 twin,
with one part at a time kept in fp32, and a plain bf16 chain of the same depth and width.

Model: `lance-3b` width, `--layers` decoder layers, random weights (std 0.02), no ViT. Quantity: the
guided t2i velocity at t = 0.9 (768x768 -> 2304 latent tokens, CFG on: 2 rows) through the KV-cache
path, relative L2 distance to the fp32 model's (TF32 off). Variants keep in fp32: the timestep
embedder; the latent position table; the rotary application; the latent in/out projections
(vae2llm, llm2vae); all of these. The plain chain is `--layers` pre-norm residual SwiGLU blocks of
the same hidden and MLP size in bf16 vs fp32, on inputs of the same size: the error a bf16 network of
this depth has by itself.

    PYTHONUNBUFFERED=1 python benchmarks/bench_bf16_accuracy.py --layers 8 36
"""
from __future__ import annotations

import argparse
import copy
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH

from lance_model import Lance, LanceConfig
from lance_model import backbone as backbone_module
from lance_model.generation import DenoisingSession, SamplerOptions
from lance_model.rope import rotate_half
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer

CAPTION = 'A wooden sign reading "OPEN" on a blue door, morning light.'


class Float32(nn.Module):
    """Run a module in fp32 whatever its input dtype (the output stays fp32)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.float()

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float())


def rotary_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * cos[:, None, :].float() + rotate_half(x32) * sin[:, None, :].float()).to(x.dtype)


@contextmanager
def patched_rotary(enabled: bool):
    original = backbone_module.apply_rotary
    if enabled:
        backbone_module.apply_rotary = rotary_fp32
    try:
        yield
    finally:
        backbone_module.apply_rotary = original


def velocity(model: Lance, samples, x: torch.Tensor, text_scale: float = 4.0) -> torch.Tensor:
    """The guided velocity (CFG 4), or with `text_scale=1` the conditional row's alone."""
    with torch.no_grad():
        return DenoisingSession(model, SequenceBuilder(ByteTokenizer()), samples,
                                SamplerOptions(interval=None, text_scale=text_scale), use_cache=True
                                ).velocity(x, 0.9).float()


def variant(model32: Lance, parts: set[str]) -> Lance:
    model = copy.deepcopy(model32).to(torch.bfloat16)
    model.config.attention_backend = "auto"
    if "time" in parts:
        model.time_embedder.float()
    if "pos" in parts:
        model.latent_pos_embed.float()
    if "io" in parts:
        model.vae2llm = Float32(copy.deepcopy(model32.vae2llm))
        model.llm2vae = Float32(copy.deepcopy(model32.llm2vae))
    return model


def plain_chain(layers: int, hidden: int, mlp: int, tokens: int, device: torch.device) -> float:
    g = torch.Generator(device).manual_seed(5)
    blocks = []
    for _ in range(layers):
        w = [torch.randn(mlp, hidden, generator=g, device=device) * 0.02 for _ in range(2)]
        blocks.append((w[0], w[1], torch.randn(hidden, mlp, generator=g, device=device) * 0.02))
    x0 = torch.randn(tokens, hidden, generator=g, device=device)

    def run(dtype: torch.dtype) -> torch.Tensor:
        x = x0.to(dtype)
        for gate, up, down in blocks:
            h = x.float()
            h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
            x = x + (torch.nn.functional.silu(h @ gate.to(dtype).T) * (h @ up.to(dtype).T)) @ down.to(dtype).T
        return x.float()

    ref = run(torch.float32)
    return float((run(torch.bfloat16) - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 36])
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    variants = [("bf16 as is", set(), False), ("+ timestep embedder fp32", {"time"}, False),
                ("+ position table fp32", {"pos"}, False), ("+ rotary in fp32", set(), True),
                ("+ latent in/out projections fp32", {"io"}, False), ("all of the above", {"time", "pos", "io"}, True)]
    print("| layers | variant | guided (CFG 4), rel. L2 vs fp32 | conditional row alone |\n| ---: | --- | ---: | ---: |")
    for layers in args.layers:
        cfg = LanceConfig.from_preset("lance-3b")
        cfg.text.num_hidden_layers = layers
        cfg.vit = None
        with torch.device(device):
            model32 = Lance(cfg)
        model32.init_weights(std=0.02, generator=torch.Generator(device).manual_seed(0))
        model32.eval()
        model32.config.attention_backend = "sdpa"  # FlashAttention has no fp32 kernel
        lat = args.size // cfg.vae.spatial_stride
        samples = [Sample("t2i", CAPTION, target=Visual(latent_shape=(1, lat, lat)))]
        x = torch.randn(1, lat * lat, cfg.vae.latent_channels, generator=torch.Generator().manual_seed(2)).to(device)
        ref, ref_cond = velocity(model32, samples, x), velocity(model32, samples, x, 1.0)
        for name, parts, rotary in variants:
            model = variant(model32, parts)
            with patched_rotary(rotary):
                v, v_cond = velocity(model, samples, x), velocity(model, samples, x, 1.0)
            print(f"| {layers} | {name} | {float((v - ref).norm() / ref.norm()):.2e} "
                  f"| {float((v_cond - ref_cond).norm() / ref_cond.norm()):.2e} |", flush=True)
            del model
        t = cfg.text
        print(f"| {layers} | plain bf16 residual SwiGLU chain ({t.hidden_size} wide, MLP {t.intermediate_size}) "
              f"| | {plain_chain(layers, t.hidden_size, t.intermediate_size, 2 * lat * lat, device):.2e} |", flush=True)
        del model32
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

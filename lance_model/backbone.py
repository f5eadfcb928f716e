"""The dual-stream mixture-of-transformers (MoT) decoder: pure math, no distribution, no I/O.

Every decoder layer holds two full copies of its weights: the understanding copy (plain names) and
the generation copy (suffix `_moe_gen`). Tokens are routed by position, not by a learned router:
the model stores the packed sequence *expert-sorted* (all text/ViT tokens first, then all VAE
tokens), so each expert's projections run on one contiguous slice with no scatter/gather, and a
single attention runs over the concatenated q/k/v of both streams. Module and parameter names
follow the official checkpoint layout (MODEL.md §2), so `state_dict()` keys match it directly.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .rope import apply_rotary

GEN = "_moe_gen"


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nn.Module):
    """q/k/v/o projections and per-head q/k norms, one copy per expert; one shared attention."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        for suffix in ("", GEN):
            setattr(self, "q_proj" + suffix, nn.Linear(h, self.num_heads * d, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(h, self.num_kv_heads * d, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(h, self.num_kv_heads * d, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(self.num_heads * d, h, bias=False))
            if cfg.qk_norm:
                setattr(self, "q_norm" + suffix, RMSNorm(d, cfg.rms_norm_eps))
                setattr(self, "k_norm" + suffix, RMSNorm(d, cfg.rms_norm_eps))
        self.qk_norm = cfg.qk_norm

    def project(self, x: torch.Tensor, suffix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        q = getattr(self, "q_proj" + suffix)(x).view(n, self.num_heads, self.head_dim)
        k = getattr(self, "k_proj" + suffix)(x).view(n, self.num_kv_heads, self.head_dim)
        v = getattr(self, "v_proj" + suffix)(x).view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = getattr(self, "q_norm" + suffix)(q)
            k = getattr(self, "k_norm" + suffix)(k)
        return q, k, v


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = MoTAttention(cfg)
        self.mlp = SwiGLU(h, cfg.intermediate_size)
        self.mlp_moe_gen = SwiGLU(h, cfg.intermediate_size)
        self.compile_options: dict | None = None  # set by `compile_layers`: run qkv/finish compiled

    def qkv(self, x_und: torch.Tensor, x_gen: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Normalised, projected, rotated q/k/v of both streams, concatenated [und; gen]."""
        a = self.self_attn
        qu, ku, vu = a.project(self.input_layernorm(x_und), "")
        qg, kg, vg = a.project(self.input_layernorm_moe_gen(x_gen), GEN)
        q, k, v = torch.cat([qu, qg]), torch.cat([ku, kg]), torch.cat([vu, vg])
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def finish(self, x_und: torch.Tensor, x_gen: torch.Tensor, attn: torch.Tensor):
        """Per-expert o-proj + residual, then per-expert post-norm + MLP + residual."""
        n_und = x_und.shape[0]
        attn = attn.reshape(attn.shape[0], -1)
        x_und = x_und + self.self_attn.o_proj(attn[:n_und])
        x_gen = x_gen + self.self_attn.o_proj_moe_gen(attn[n_und:])
        x_und = x_und + self.mlp(self.post_attention_layernorm(x_und))
        x_gen = x_gen + self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(x_gen))
        return x_und, x_gen

    def forward(self, x_und: torch.Tensor, x_gen: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        if self.compile_options is not None:
            qkv, finish = _compiled_parts(self.compile_options)
            q, k, v = qkv(self, x_und, x_gen, cos, sin)
            return finish(self, x_und, x_gen, attend(q, k, v))
        q, k, v = self.qkv(x_und, x_gen, cos, sin)
        return self.finish(x_und, x_gen, attend(q, k, v))


_COMPILED_PARTS: dict[str, tuple[Callable, Callable]] = {}


def _compiled_parts(options: dict) -> tuple[Callable, Callable]:
    """`torch.compile`d `MoTDecoderLayer.qkv` / `.finish` (unbound; the layer is an argument, its
    parameters graph inputs), one pair per set of compile options, shared by every layer."""
    key = repr(sorted(options.items()))
    if key not in _COMPILED_PARTS:
        _COMPILED_PARTS[key] = (torch.compile(MoTDecoderLayer.qkv, **options),
                                torch.compile(MoTDecoderLayer.finish, **options))
    return _COMPILED_PARTS[key]


class MoTDecoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_und: torch.Tensor, x_gen: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`attend(layer_index, q, k, v)`: the layer index lets a KV cache keep one entry per layer."""
        for i, layer in enumerate(self.layers):
            x_und, x_gen = layer(x_und, x_gen, cos, sin, functools.partial(attend, i))
        return self.norm(x_und), self.norm_moe_gen(x_gen)


class LanceLanguageModel(nn.Module):
    """`language_model.model` (the MoT decoder) + `language_model.lm_head`."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.model = MoTDecoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


def compile_layers(module: nn.Module, **compile_kwargs) -> nn.Module:
    """Run every `MoTDecoderLayer` inside `module` through `torch.compile`d code, in place.

    The two halves around the attention (`qkv`: per-expert norm, q/k/v projections, q/k norm,
    rotary; `finish`: o-proj, residuals, post-norm, MLP) are compiled, once for all layers; the
    `attend` callable runs between them uncompiled, so any backend (FlexAttention, which compiles
    its own kernel; SDPA; flash varlen; a KV cache keyed by layer index) works without a recompile
    per layer or per batch. Only a plain attribute is set: parameter names, `state_dict()` keys and
    deep copies are unchanged. `compile_kwargs` go to `torch.compile` (e.g. `options`, `dynamic`).
    Returns `module`."""
    for m in module.modules():
        if isinstance(m, MoTDecoderLayer):
            m.compile_options = dict(compile_kwargs)
    return module

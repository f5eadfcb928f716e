"""`Lance`: the unified model (MoT backbone + ViT + latent heads) and its training forward.

Module names match the official checkpoint layout (`language_model.*`, `vit_model.*`,
`time_embedder.*`, `vae2llm`, `llm2vae`, `latent_pos_embed.pos_embed`), so `state_dict()` is
directly loadable by, and from, the released code. The VAE is not part of the state dict: it lives
in `lance_model.encoders` and is loaded from its own weights file.

Training objective (MODEL.md §6): next-token CE on answer tokens + rectified-flow MSE on noisy VAE
targets, with logit-normal timesteps and shift; both reduced by *global* token counts so that
data-parallel ranks with different token mixes give the same gradient as one big batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionBackend, make_backend
from .backbone import LanceLanguageModel
from .checkpoint import (
    assign_state,
    fill_from_qwen25vl,
    materialize,
    read_pretrained,
    read_qwen25vl,
    save_pretrained,
)
from .config import LanceConfig
from .heads import PositionEmbedding3D, TimestepEmbedder
from .packing import PackedBatch
from .rope import rotary_cos_sin


@dataclass
class LanceLoss:
    loss: torch.Tensor
    ce: torch.Tensor
    mse: torch.Tensor
    ce_tokens: int
    mse_tokens: int


def sample_timesteps(n: int, shift: float, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Logit-normal t = sigmoid(N(0,1)), then shifted t' = s*t / (1 + (s-1)*t)."""
    t = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    return shift_timesteps(t, shift)


@torch.no_grad()
def init_tensor(name: str, p: torch.Tensor, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """The random init of one parameter `name` in place: zeros for biases, ones for other vectors
    (norms), normal(0, std) for the rest (also used to initialise a sharded model tensor by tensor)."""
    if p.dim() == 1:
        if name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
    else:
        p.normal_(0.0, std, generator=generator)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


class Lance(nn.Module):
    def __init__(self, config: LanceConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        h = config.text.hidden_size
        c = config.vae.latent_channels
        self.language_model = LanceLanguageModel(config.text)
        self.time_embedder = TimestepEmbedder(h, config.timestep_embed_dim)
        self.vae2llm = nn.Linear(c, h)
        self.llm2vae = nn.Linear(h, c)
        self.latent_pos_embed = PositionEmbedding3D(config.max_latent_frames, config.max_latent_size, h)
        if config.vit is not None:
            from .encoders.vit import build_vit

            self.vit_model = build_vit(config.vit)
        else:
            self.vit_model = None
        self._backends: dict[tuple[str, str], AttentionBackend] = {}
        self.apply_freeze()

    # ------------------------------------------------------------------ construction helpers
    def apply_freeze(self) -> None:
        cfg = self.config
        self.latent_pos_embed.pos_embed.requires_grad_(False)
        self.language_model.model.embed_tokens.weight.requires_grad_(not cfg.freeze_embeddings)
        if not cfg.text.tie_word_embeddings:
            self.language_model.lm_head.weight.requires_grad_(not cfg.freeze_lm_head)
        if self.vit_model is not None:
            trainable = cfg.vit.trainable
            for p in self.vit_model.parameters():
                p.requires_grad_(trainable)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for fresh models (normal(0, std) linears/embeddings, ones for norms)."""
        for name, p in self.named_parameters():
            if name == "latent_pos_embed.pos_embed" or name.startswith("vit_model."):
                continue
            init_tensor(name, p, std, generator)
        self.latent_pos_embed.reset_table()

    def attention_backend(self, device: torch.device, dtype: torch.dtype | None = None) -> AttentionBackend:
        """The attention implementation for activations of `dtype` on `device` (see `make_backend`)."""
        key = (self.config.attention_backend, device.type, dtype)
        if key not in self._backends:
            self._backends[key] = make_backend(self.config.attention_backend, device, dtype)
        return self._backends[key]

    def num_parameters(self) -> dict[str, int]:
        """Total parameters (ViT included), the ViT's share, and the ones active per LLM token
        (one expert copy of the backbone + embeddings/heads; the position table is not counted)."""
        counts = {"total": 0, "vit": 0, "gen_expert": 0}
        for n, p in self.named_parameters():
            if n == "latent_pos_embed.pos_embed":
                continue
            counts["total"] += p.numel()
            if n.startswith("vit_model."):
                counts["vit"] += p.numel()
            elif "_moe_gen" in n:
                counts["gen_expert"] += p.numel()
        counts["active"] = counts["total"] - counts["vit"] - counts["gen_expert"]
        return counts

    # ------------------------------------------------------------------ forward pieces
    def vit_embeddings(self, batch: PackedBatch) -> torch.Tensor:
        if batch.vit_tokens is not None:
            return batch.vit_tokens
        if batch.vit_patches is None:
            return torch.zeros(0, self.config.text.hidden_size, device=batch.positions.device)
        if self.vit_model is None:
            raise ValueError("batch carries ViT patches but the model has no vit_model")
        from .encoders.vit import encode_vit

        return encode_vit(self.vit_model, batch.vit_patches, batch.vit_grids)

    def embed(self, batch: PackedBatch, x_latent: torch.Tensor, token_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings: und stream [num_und, H] (text + ViT), gen stream [Ng, H] (VAE tokens)."""
        emb = self.language_model.model.embed_tokens
        dtype = emb.weight.dtype
        x_und = emb.weight.new_zeros(batch.num_und, emb.embedding_dim)
        x_und = x_und.index_copy(0, batch.text_index, emb(batch.text_ids))
        if batch.vit_index.numel():
            x_und = x_und.index_copy(0, batch.vit_index, self.vit_embeddings(batch).to(dtype))
        x_gen = (self.vae2llm(x_latent.to(self.vae2llm.weight.dtype)) + self.time_embedder(token_t)
                 + self.latent_pos_embed(batch.vae_pos_ids).to(dtype))
        return x_und, x_gen.to(dtype)

    def backbone(self, batch: PackedBatch, x_und: torch.Tensor, x_gen: torch.Tensor):
        """Run the MoT decoder with the batch's mask; returns the final-normed hidden states of both streams."""
        backend = self.attention_backend(x_und.device, x_und.dtype)
        state = backend.prepare(batch.layout)
        return self.run_decoder(batch.positions, x_und, x_gen, lambda i, q, k, v: backend.attend(q, k, v, state))

    def run_decoder(self, positions: torch.Tensor, x_und: torch.Tensor, x_gen: torch.Tensor, attend):
        """The MoT decoder with a caller-supplied `attend(layer_index, q, k, v)` (e.g. a KV cache)
        for tokens at MaPE `positions` [3, L] (storage order: und then gen)."""
        cfg = self.config.text
        cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section,
                                  interleaved=cfg.mrope_interleaved)
        return self.language_model.model(x_und, x_gen, cos.to(x_und.dtype), sin.to(x_und.dtype), attend)

    def forward(self, batch: PackedBatch, timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, ce_count: int | None = None,
                mse_count: int | None = None, text_vocab: int | None = None) -> LanceLoss:
        """Training forward. `timesteps` [num_items] and `noise` [Ng, C] are sampled when None.
        `ce_count`/`mse_count`: global token counts (summed over data-parallel ranks) for the reduction.
        `text_vocab`: the tokenizer's length. As in the released recipe, the cross-entropy then runs
        over the first `text_vocab` logits only (151,665 of the 3B head's 151,936 rows: the rest are
        padding no tokenizer produces) and labels at or beyond it are ignored; None = every row."""
        device = batch.positions.device
        x0 = batch.vae_latents.float()
        if timesteps is None:
            timesteps = sample_timesteps(batch.num_items, self.config.timestep_shift, generator, device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=device)
        noisy = batch.vae_noisy
        token_t = torch.where(noisy, timesteps.float()[batch.vae_item.clamp(min=0)], torch.zeros((), device=device))
        x_t = torch.where(noisy[:, None], (1 - token_t[:, None]) * x0 + token_t[:, None] * noise, x0)

        x_und, x_gen = self.embed(batch, x_t, token_t)
        h_und, h_gen = self.backbone(batch, x_und, x_gen)

        # Both heads run even on empty selections, so every trainable parameter gets a gradient
        # (zeros when unused): data-parallel ranks then reduce the same set of gradients.
        n_ce = int(batch.ce_index.numel())
        n_mse = int(noisy.sum())
        logits = self.language_model.lm_head(h_und[batch.ce_index]).float()
        labels = batch.ce_labels
        if text_vocab is not None and text_vocab < logits.shape[-1]:
            logits = logits[:, :text_vocab]
            labels = labels.masked_fill(labels >= text_vocab, -100)
        ce = F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100) / max(ce_count or n_ce, 1)
        pred = self.llm2vae(h_gen[noisy]).float()
        target = noise[noisy] - x0[noisy]
        mse = (pred - target).pow(2).mean(-1).sum() / max(mse_count or n_mse, 1)
        loss = self.config.ce_weight * ce + self.config.mse_weight * mse
        return LanceLoss(loss, ce.detach(), mse.detach(), n_ce, n_mse)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, directory: str | Path, weights: str = "auto", device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, vit_weights: str | Path | None = None) -> Lance:
        """Our checkpoint directories and the released official ones. The model is built on the meta
        device and the tensors are assigned, so a 6B-parameter checkpoint needs no extra copy."""
        config, state, path = read_pretrained(directory, weights, device, vit_weights)
        with torch.device("meta"):
            model = cls(config)
        assign_state(model, state, str(path), strict=True, dtype=dtype)
        materialize(model, device, dtype)
        return model

    @classmethod
    def from_qwen25vl(cls, directory: str | Path, config: LanceConfig | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0) -> Lance:
        """A Lance whose und expert and ViT come from a Qwen2.5-VL checkpoint and whose gen expert is
        a copy of the und expert (`model.qwen_init_report` says what kept a fresh init)."""
        config, mapped, dropped = read_qwen25vl(directory, config, device)
        with torch.device(device):
            model = cls(config)
            model.init_weights(generator=torch.Generator(device=device).manual_seed(seed))
        if dtype is not None:
            model.to(dtype)
        fill_from_qwen25vl(model, mapped, dropped, str(directory))
        return model

    def save_pretrained(self, directory: str | Path, filename: str = "model.safetensors") -> Path:
        return save_pretrained(self, directory, filename)

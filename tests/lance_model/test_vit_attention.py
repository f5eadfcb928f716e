"""The ViT's one-call-per-layer attention equals transformers' stock per-window attention (CPU, fp32)."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lance_model.config import LanceConfig, VitConfig
from lance_model.encoders.vit import (
    STOCK_ATTN,
    VARLEN_ATTN,
    block_diagonal_sdpa,
    build_vit,
    encode_vit,
    set_vit_attention,
    vit_patches,
    vit_varlen_attention,
)

TOL = 1e-5


def _items(cfg: VitConfig, shapes: list[tuple[int, int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = [vit_patches(torch.rand(t, 3, h, w, generator=g), cfg) for t, h, w in shapes]
    return torch.cat([p for p, _ in items]), torch.stack([gr for _, gr in items])


def _both(model: torch.nn.Module, patches: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    set_vit_attention(model, STOCK_ATTN)
    stock = encode_vit(model, patches, grid)
    set_vit_attention(model, VARLEN_ATTN)
    ours = encode_vit(model, patches, grid)
    return stock, ours


@pytest.fixture(scope="module", params=["tiny", "nano"])
def preset_vit(request) -> tuple[VitConfig, torch.nn.Module]:
    cfg = LanceConfig.from_preset(request.param).vit
    torch.manual_seed(0)
    return cfg, build_vit(cfg)


# Images whose sides are not multiples of the window (edge windows are smaller), a video, and a
# mixed batch of several items of different sizes (full-attention blocks of unequal length).
CASES = {
    "image_square": [(1, 112, 112)],
    "image_ragged_windows": [(1, 84, 196)],
    "video_5_frames": [(5, 112, 168)],
    "mixed_batch": [(1, 56, 84), (3, 140, 84), (1, 224, 224), (2, 28, 28)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_stock_attention(preset_vit, case):
    cfg, model = preset_vit
    patches, grid = _items(cfg, CASES[case])
    stock, ours = _both(model, patches, grid)
    assert ours.shape == stock.shape == (int(grid.prod(dim=1).sum()) // 4, cfg.out_hidden_size)
    assert (ours - stock).abs().max().item() < TOL
    assert stock.abs().max().item() > 1e-2  # a real signal, not two zero tensors


def test_one_sdpa_call_per_layer(monkeypatch):
    cfg = LanceConfig.from_preset("nano").vit
    torch.manual_seed(0)
    model = build_vit(cfg)
    patches, grid = _items(cfg, [(1, 224, 336), (3, 112, 112)])
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    set_vit_attention(model, VARLEN_ATTN)
    encode_vit(model, patches, grid)
    assert len(calls) == cfg.depth
    calls.clear()
    set_vit_attention(model, STOCK_ATTN)
    encode_vit(model, patches, grid)
    # stock: one call per window in window layers (224x336: 2x3 windows of 112 px; 112x112: 1 per
    # temporal slice, 2 slices) and one per temporal slice in the full layer (1 + 2 slices).
    windows, frames = 6 + 2, 1 + 2
    full = len(cfg.fullatt_block_indexes)
    assert len(calls) == (cfg.depth - full) * windows + full * frames


def test_gradients_equal_stock():
    cfg = dataclasses.replace(LanceConfig.from_preset("tiny").vit, trainable=True)
    torch.manual_seed(0)
    model = build_vit(cfg)
    patches, grid = _items(cfg, [(1, 84, 112), (3, 56, 56)])
    grads = {}
    for impl in (STOCK_ATTN, VARLEN_ATTN):
        model.zero_grad()
        set_vit_attention(model, impl)
        (encode_vit(model, patches, grid) ** 2).sum().backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads[STOCK_ATTN].abs().max() > 0
    torch.testing.assert_close(grads[VARLEN_ATTN], grads[STOCK_ATTN], atol=1e-5, rtol=1e-4)


def _per_block_reference(q, k, v, lengths):
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1),
                                                   v[sl].transpose(0, 1)).transpose(0, 1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [
    [64, 64, 48, 64, 32],     # near-uniform blocks: padded batch
    [64, 64, 64, 64],         # equal blocks: a reshape, no mask
    [300] + [1] * 40,         # one long block and many tiny ones: block-diagonal mask
    [17],                     # a single block: plain attention
])
def test_block_diagonal_sdpa_both_layouts(lengths):
    g = torch.Generator().manual_seed(1)
    total = sum(lengths)
    q, k, v = (torch.randn(total, 3, 16, generator=g) for _ in range(3))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    out = block_diagonal_sdpa(q, k, v, cu)
    assert out.shape == (total, 3, 16)
    assert (out - _per_block_reference(q, k, v, lengths)).abs().max().item() < TOL


@pytest.mark.parametrize("cu", [[0, 5, 9], [1, 5, 10], [0, 5, 5, 10]])
def test_bad_cu_seqlens_is_named(cu):
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        block_diagonal_sdpa(q, q, q, torch.tensor(cu))


def test_rejects_masked_or_causal_calls():
    q = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-causal"):
        vit_varlen_attention(None, q, q, q, cu_seq_lens_q=cu, is_causal=True)
    with pytest.raises(ValueError, match="non-causal"):
        vit_varlen_attention(None, q, q, q)
    with pytest.raises(ValueError, match="expected"):
        set_vit_attention(build_vit(LanceConfig.from_preset("tiny").vit), "flex")


def test_model_and_curation_use_one_call_attention():
    from data_curation.config import ModelRef
    from data_curation.encoders import build_vit_encoder
    from lance_model.model import Lance

    cfg = LanceConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = Lance(cfg)
    curation_vit = build_vit_encoder(ModelRef(preset="tiny"), cfg)
    assert model.vit_model.config._attn_implementation == VARLEN_ATTN
    assert curation_vit.config._attn_implementation == VARLEN_ATTN
    patches, grid = _items(cfg.vit, [(1, 56, 84), (3, 56, 56)])
    batch = SimpleNamespace(vit_tokens=None, vit_patches=patches, vit_grids=grid, positions=torch.zeros(1))
    ours = model.vit_embeddings(batch)
    set_vit_attention(model.vit_model, STOCK_ATTN)
    stock = model.vit_embeddings(batch)
    assert (ours - stock).abs().max().item() < TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen FlashAttention needs a CUDA GPU")
def test_cuda_flash_varlen_matches_stock_bf16():
    cfg = LanceConfig.from_preset("nano").vit  # head_dim 32: the flash kernel's path
    torch.manual_seed(0)
    model = build_vit(cfg).cuda().to(torch.bfloat16)
    patches, grid = _items(cfg, [(1, 224, 336), (5, 112, 168)])
    stock, ours = _both(model, patches.cuda(), grid.cuda())
    ref = encode_vit(set_vit_attention(model.float(), STOCK_ATTN), patches.cuda(), grid.cuda())
    # bf16 vs an fp32 reference: ours is no further from it than the stock bf16 path (plus slack).
    err_ours = (ours.float() - ref).abs().max().item()
    err_stock = (stock.float() - ref).abs().max().item()
    assert err_ours <= 1.5 * err_stock + 1e-3

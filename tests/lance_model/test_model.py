"""Model behaviour: expert routing, sample isolation inside a pack, the training objective, learning."""
from __future__ import annotations

import torch

from lance_model import Lance, LanceConfig
from lance_model.backbone import MoTDecoderLayer
from lance_model.packing import pack_samples
from lance_model.rope import rotary_cos_sin

TINY = LanceConfig.from_preset("tiny")


def grads(model, predicate):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad and predicate(n)}


def test_generation_copy_gets_no_gradient_without_vae_tokens(tiny_model, builder, sample_factory):
    batch = pack_samples([sample_factory("i2t", 64, 1), sample_factory("v2t", 64, 2)], builder, TINY)
    assert batch.num_tokens == batch.num_und
    tiny_model(batch).loss.backward()
    gen = grads(tiny_model, lambda n: "_moe_gen" in n)
    und = grads(tiny_model, lambda n: "language_model.model.layers" in n and "_moe_gen" not in n)
    assert gen and all(g is None or torch.count_nonzero(g) == 0 for g in gen.values())
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in und.values())


def test_understanding_copy_gets_no_gradient_from_generation_only_tokens(tiny_config):
    torch.manual_seed(0)
    layer = MoTDecoderLayer(tiny_config.text)
    x_und = torch.zeros(0, 64)
    x_gen = torch.randn(5, 64)
    cos, sin = rotary_cos_sin(torch.arange(5).expand(3, 5), 16, 1e4, (2, 3, 3))

    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
                                                                v.repeat_interleave(2, 1).transpose(0, 1)).transpose(0, 1)

    _, out_gen = layer(x_und, x_gen, cos, sin, attend)
    out_gen.sum().backward()
    for n, p in layer.named_parameters():
        if "_moe_gen" in n:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, n
        else:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, n


def hidden_by_token(model, batch):
    """Final hidden states keyed by (sample, rendered index within the sample), clean latents, t = 0."""
    with torch.no_grad():
        t = torch.zeros(batch.vae_latents.shape[0])
        h_und, h_gen = model.backbone(batch, *model.embed(batch, batch.vae_latents, t))
    hidden = torch.cat([h_und, h_gen])
    starts = torch.tensor([0] + batch.sample_lens).cumsum(0)
    out = {}
    for i, r in enumerate(batch.layout.order.tolist()):
        s = int(torch.searchsorted(starts, r, right=True)) - 1
        out[(s, r - int(starts[s]))] = hidden[i]
    return out


def test_packed_samples_do_not_see_each_other(tiny_model, builder, sample_factory):
    samples = [sample_factory(t, 64, i) for i, t in enumerate(["t2i", "i2t", "image_edit", "t2v", "subject"])]
    packed = hidden_by_token(tiny_model, pack_samples(samples, builder, TINY))
    for i, s in enumerate(samples):
        alone = hidden_by_token(tiny_model, pack_samples([s], builder, TINY))
        for (_, j), h in alone.items():
            torch.testing.assert_close(packed[(i, j)], h, atol=1e-5, rtol=1e-5)


def test_flow_objective_matches_hand_computation(tiny_model, builder, sample_factory):
    batch = pack_samples([sample_factory("t2i", 64, 0)], builder, TINY)
    t = torch.tensor([0.3])
    noise = torch.randn(batch.vae_latents.shape, generator=torch.Generator().manual_seed(1))
    out = tiny_model(batch, timesteps=t, noise=noise)
    x0 = batch.vae_latents
    x_t = 0.7 * x0 + 0.3 * noise
    with torch.no_grad():
        _, h_gen = tiny_model.backbone(batch, *tiny_model.embed(batch, x_t, torch.full((x0.shape[0],), 0.3)))
        pred = tiny_model.llm2vae(h_gen)
    expected = ((pred - (noise - x0)) ** 2).mean(-1).sum() / x0.shape[0]
    torch.testing.assert_close(out.mse, expected)
    assert out.ce_tokens == 0 and out.mse_tokens == x0.shape[0]
    # global-count reduction: passing twice the local count halves the loss term
    half = tiny_model(batch, timesteps=t, noise=noise, mse_count=2 * x0.shape[0])
    torch.testing.assert_close(half.mse, expected / 2)


def test_timestep_shift():
    from lance_model.model import shift_timesteps

    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_timesteps(t, 4.0), torch.tensor([0.0, 1.0 / 1.75, 2.0 / 2.5, 1.0]))
    assert torch.equal(shift_timesteps(t, 1.0), t)


def test_tiny_model_overfits_mixed_samples(builder, sample_factory):
    cfg = LanceConfig.from_preset("tiny", freeze_embeddings=False, freeze_lm_head=False)
    torch.manual_seed(0)
    model = Lance(cfg)
    model.init_weights()
    samples = [sample_factory("t2i", 64, 1), sample_factory("i2t", 64, 2), sample_factory("image_edit", 64, 3)]
    batch = pack_samples(samples, builder, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    history = []
    # 200 steps: CE is ~1200x and MSE ~7x below their first values by then (the bounds: 100x, 5x)
    for _ in range(200):
        out = model(batch, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append((out.ce.item(), out.mse.item()))
    first_ce, first_mse = history[0]
    last_ce = sum(h[0] for h in history[-20:]) / 20
    last_mse = sum(h[1] for h in history[-20:]) / 20
    assert last_ce < first_ce / 100, (first_ce, last_ce)
    assert last_mse < first_mse / 5, (first_mse, last_mse)


def test_frozen_parts(tiny_model):
    assert not tiny_model.language_model.model.embed_tokens.weight.requires_grad
    assert not tiny_model.language_model.lm_head.weight.requires_grad
    assert not tiny_model.latent_pos_embed.pos_embed.requires_grad
    assert not any(p.requires_grad for p in tiny_model.vit_model.parameters())
    cfg = LanceConfig.from_preset("tiny")
    cfg.vit.trainable = True
    assert all(p.requires_grad for p in Lance(cfg).vit_model.parameters())


def test_vit_runs_inside_forward_when_given_patches(tiny_config, builder):
    from lance_model.encoders.vit import encode_vit, vit_patches
    from lance_model.sequence import Sample, Visual

    torch.manual_seed(0)
    model = Lance(tiny_config)
    model.init_weights()
    frames = torch.rand(1, 3, 56, 84)
    patches, grid = vit_patches(frames, tiny_config.vit)
    tokens = encode_vit(model.vit_model, patches, grid)
    with_patches = Sample("i2t", "q?", answer="a", source=Visual(vit_patches=patches, vit_grid=tuple(grid.tolist())))
    with_tokens = Sample("i2t", "q?", answer="a", source=Visual(vit_tokens=tokens, vit_grid=tuple(grid.tolist())))
    a = model(pack_samples([with_patches], builder, TINY))
    b = model(pack_samples([with_tokens], builder, TINY))
    torch.testing.assert_close(a.ce, b.ce)


def test_cross_entropy_over_the_tokenizers_rows_only(tiny_model, builder, sample_factory):
    """`text_vocab` slices the logits to the tokenizer's length and ignores labels beyond it, as the
    released recipe does (151,665 of 151,936 rows); checked against a hand computation."""
    batch = pack_samples([sample_factory("i2t", 64, 0)], builder, TINY)
    assert batch.ce_index.numel() > 1
    t, noise = torch.tensor([0.5]), torch.zeros(batch.vae_latents.shape)
    vocab = int(batch.ce_labels.max()) + 1  # the largest label is the last row kept
    batch.ce_labels[0] = vocab + 3           # a label beyond the tokenizer: ignored
    with torch.no_grad():
        h_und, _ = tiny_model.backbone(batch, *tiny_model.embed(batch, batch.vae_latents.float(),
                                                                torch.zeros(batch.vae_latents.shape[0])))
        logits = tiny_model.language_model.lm_head(h_und[batch.ce_index]).float()
    expected = torch.nn.functional.cross_entropy(logits[1:, :vocab], batch.ce_labels[1:], reduction="sum")
    out = tiny_model(batch, timesteps=t, noise=noise, text_vocab=vocab)
    torch.testing.assert_close(out.ce, expected / batch.ce_index.numel())
    full = tiny_model(batch, timesteps=t, noise=noise, ce_count=batch.ce_index.numel())
    assert not torch.isclose(full.ce, out.ce)  # all rows: a different loss

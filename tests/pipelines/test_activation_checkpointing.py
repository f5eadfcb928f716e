"""Activation checkpointing of every n-th decoder layer (`model.activation_checkpointing_every`):
the chosen layers are wrapped, and loss and gradients equal the unwrapped model's."""
from __future__ import annotations

import copy

import pytest
import torch

from lance_model import Lance, LanceConfig
from lance_model.packing import pack_rendered
from lance_model.sequence import Sample, SequenceBuilder, Visual
from lance_model.tokenizer import ByteTokenizer
from lance_platform import checkpoint as ckpt
from pipelines import parallel


def loss_and_grads(model: Lance, batch) -> tuple[float, dict[str, torch.Tensor]]:
    out = model(batch, timesteps=torch.full((batch.num_items,), 0.5), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = {ckpt.plain_name(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss), grads


@pytest.mark.parametrize("every, wrapped", [(1, [0, 1, 2, 3, 4]), (2, [0, 2, 4]), (3, [0, 3]), (9, [0])])
def test_every_nth_layer_is_recomputed_and_the_gradients_are_the_same(every, wrapped):
    torch.manual_seed(0)
    model = Lance(LanceConfig.from_preset("tiny", text={"num_hidden_layers": 5}))
    model.init_weights(std=0.05)
    plain = copy.deepcopy(model)
    assert parallel.apply_activation_checkpointing(model, every) == wrapped
    layers = model.language_model.model.layers
    assert [i for i, layer in enumerate(layers) if type(layer).__name__ == "CheckpointWrapper"] == wrapped
    builder = SequenceBuilder(ByteTokenizer())
    samples = [Sample("t2i", "a sign that says OPEN", target=Visual(latent=torch.randn(48, 1, 4, 4))),
               Sample("t2i", "STOP", target=Visual(latent=torch.randn(48, 1, 2, 4)))]
    batch = pack_rendered([builder.render(s) for s in samples], model.config)
    got_loss, got = loss_and_grads(model, batch)
    want_loss, want = loss_and_grads(plain, batch)
    assert got_loss == pytest.approx(want_loss, rel=1e-6) and got.keys() == want.keys() and len(got) > 10
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_a_stride_below_one_is_refused():
    with pytest.raises(ValueError, match="every=0"):
        parallel.apply_activation_checkpointing(Lance(LanceConfig.from_preset("tiny")), 0)

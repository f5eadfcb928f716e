"""A training step's optimizer update (`pipelines.train_loop.optimizer_step`): a finite step clips
and steps, and a non-finite loss or gradient skips the step, leaving weights, optimizer state and
EMA as they were."""
from __future__ import annotations

import math

import torch

from pipelines.train_loop import optimizer_step


def setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    params = list(model.parameters())
    return model, params, torch.optim.AdamW(params, lr=0.1)


def test_a_finite_step_clips_steps_and_updates_the_ema():
    model, params, opt = setup()
    before = [p.detach().clone() for p in params]
    loss = (model(torch.ones(2, 4)) ** 2).sum() * 100
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
    calls = []
    norm, skipped = optimizer_step(loss, params, opt, 1.0, lambda: calls.append(1))
    assert not skipped and calls == [1]
    assert math.isclose(norm, expected, rel_tol=1e-5) and norm > 1.0  # the pre-clip norm
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(p.grad is None for p in params) and len(opt.state) == 2


def test_a_non_finite_loss_or_gradient_skips_the_step():
    model, params, opt = setup()
    before = [p.detach().clone() for p in params]
    for bad in (float("nan"), float("inf")):
        loss = model(torch.ones(2, 4)).sum() * bad
        calls = []
        norm, skipped = optimizer_step(loss, params, opt, 1.0, lambda: calls.append(1))
        assert skipped and not math.isfinite(norm) and calls == []
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        assert all(p.grad is None for p in params) and not opt.state
    # an input that overflows float32 in the forward: skipped too
    loss = model(torch.full((2, 4), 3e38)).sum()
    assert optimizer_step(loss, params, opt, 1.0, lambda: None)[1]
    assert all(torch.equal(a, p) for a, p in zip(before, params))

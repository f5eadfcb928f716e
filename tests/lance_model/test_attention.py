"""The Lance mask equals a brute-force evaluation of the rule; every backend matches dense SDPA."""
from __future__ import annotations

import random

import pytest
import torch

from lance_model.attention import (
    FlashVarlenAttention,
    FlexAttention,
    MaskLayout,
    SdpaAttention,
    dense_mask,
    flash_available,
    make_backend,
    visible_pairs,
)


def random_layout(rng: random.Random):
    """Random packed layout: several samples of random splits, and a random expert-sorted storage order."""
    samples = []
    for _ in range(rng.randint(1, 4)):
        splits = [("causal", rng.randint(1, 6))]
        for _ in range(rng.randint(1, 6)):
            splits.append((rng.choice(["causal", "full", "noise"]), rng.randint(1, 7)))
        samples.append(splits)
    n = sum(length for s in samples for _, length in s)
    gen = [rng.random() < 0.4 for _ in range(n)]
    perm = [i for i in range(n) if not gen[i]] + [i for i in range(n) if gen[i]]
    return samples, torch.tensor(perm)


def brute_force(samples) -> torch.Tensor:
    """The rule of MODEL.md §4 evaluated pair by pair, in rendered order, straight from its wording."""
    tokens = []  # (sample, split, mode)
    split_id = 0
    for s, splits in enumerate(samples):
        for mode, length in splits:
            tokens += [(s, split_id, mode)] * length
            split_id += 1
    n = len(tokens)
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            sq, pq, mq = tokens[q]
            sk, pk, mk = tokens[k]
            same_block = pq == pk and mq in ("full", "noise")
            hidden_noise = mk == "noise" and pk != pq
            out[q, k] = sq == sk and (k <= q or same_block) and not hidden_noise
    return out


@pytest.mark.parametrize("seed", range(12))
def test_mask_equals_brute_force(seed):
    samples, perm = random_layout(random.Random(seed))
    layout = MaskLayout.from_splits(samples, perm)
    expected = brute_force(samples)
    got = dense_mask(layout)  # storage order
    assert torch.equal(got, expected[perm][:, perm])
    assert visible_pairs(samples) == int(expected.sum())


def test_mask_hand_example():
    # one sample: text(2) noise(2) text(1); noise is invisible to the trailing text
    layout = MaskLayout.from_splits([[("causal", 2), ("noise", 2), ("causal", 1)]])
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(dense_mask(layout), expected)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    """flash_attn_varlen_func semantics (bottom-right aligned causal), written with plain softmax."""
    outs = []
    rep = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        qi = q[cu_q[i]:cu_q[i + 1]]
        ki = k[cu_k[i]:cu_k[i + 1]].repeat_interleave(rep, dim=1)
        vi = v[cu_k[i]:cu_k[i + 1]].repeat_interleave(rep, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, ki) / qi.shape[-1] ** 0.5
        if causal:
            lq, lk = qi.shape[0], ki.shape[0]
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vi))
    return torch.cat(outs)


def run_backend(backend, layout, q, k, v):
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = backend.attend(q, k, v, backend.prepare(layout))
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def random_case(layout_seed: int, seed: int):
    """(samples, layout, q [L, 4, 16], k, v [L, 2, 16]) of a random packed layout."""
    samples, perm = random_layout(random.Random(layout_seed))
    layout = MaskLayout.from_splits(samples, perm)
    n = len(layout)
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(n, 4, 16, generator=g), torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g)
    return samples, layout, q, k, v


@pytest.mark.parametrize("seed", range(4))
def test_backends_agree_forward_and_backward(seed):
    _, layout, q, k, v = random_case(100 + seed, seed)
    ref = run_backend(SdpaAttention(), layout, q, k, v)
    # FlexAttention has no CPU backward: compare its forward here (benchmarks/bench_backbone.py checks gradients on the GPU).
    flex = FlexAttention(compile=False)
    with torch.no_grad():
        torch.testing.assert_close(flex.attend(q, k, v, flex.prepare(layout)), ref[0], atol=2e-5, rtol=2e-4)
    backends = [FlashVarlenAttention(varlen_fn=reference_varlen)]
    if flash_available():
        backends.append(FlashVarlenAttention())
    for backend in backends:
        got = run_backend(backend, layout, q, k, v)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=lambda m, b=backend.name, n=name: f"{b} {n}: {m}")


class DenseSdpa:
    """SDPA with one dense [L, L] mask over the whole pack: the plain reading of the rule."""

    def prepare(self, layout):
        return dense_mask(layout)

    def attend(self, q, k, v, mask):
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                                               v.transpose(0, 1), attn_mask=mask)
        return out.transpose(0, 1)


@pytest.mark.parametrize("seed", range(4))
def test_sdpa_per_sample_rows_equal_one_dense_mask(seed):
    samples, layout, q, k, v = random_case(200 + seed, seed)
    blocks = SdpaAttention().prepare(layout)
    lengths = [sum(length for _, length in s) for s in samples]
    assert blocks.mask.shape == (len(samples), 1, max(lengths), max(lengths))  # B * Lmax^2, not (sum L)^2
    got, ref = run_backend(SdpaAttention(), layout, q, k, v), run_backend(DenseSdpa(), layout, q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_make_backend_selection():
    assert make_backend("auto", "cpu").name == "sdpa"
    assert make_backend("flex", "cpu").name == "flex"
    # FlashAttention has no fp32 kernels: an fp32 model on a GPU (a checkpoint loaded as stored, a
    # GRPO policy) attends with SDPA under `auto`, and `flash` says what to change
    assert make_backend("auto", "cuda", torch.float32).name == "sdpa"
    assert make_backend("auto", "cuda", torch.bfloat16).name == "flash"
    assert make_backend("auto", "cuda").name == "flash"
    with pytest.raises(RuntimeError, match="bf16/fp16 only"):
        make_backend("flash", "cuda", torch.float32)
    with pytest.raises(ValueError, match="attention_backend='nope'"):
        make_backend("nope", "cpu")
    if not flash_available():
        with pytest.raises(RuntimeError, match="flash-attn"):
            make_backend("flash", "cpu")


def test_unknown_split_mode_is_named():
    with pytest.raises(ValueError, match="'fullnoise'"):
        MaskLayout.from_splits([[("fullnoise", 3)]])

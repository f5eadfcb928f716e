"""Generation and understanding inference on a tiny random model: KV cache == full recompute,
CFG branches and interval, batching, i2v's frozen first frame, the SDE sampler, text decoding."""
from __future__ import annotations

import pytest
import torch

from lance_model import Lance, LanceConfig
from lance_model.generation import (
    DenoisingSession,
    LanceGenerator,
    Request,
    SamplerOptions,
    TextOptions,
    _pick_tokens,
    generate_text,
    sample_latents,
    split_at_target,
)
from lance_model.sampling import flow_timesteps

FAST = {"num_steps": 4, "interval": (0.3, 1.0)}


@pytest.fixture(scope="module")
def gen() -> LanceGenerator:
    torch.manual_seed(0)
    model = Lance(LanceConfig.from_preset("tiny"))
    model.init_weights(std=0.05)  # large enough that every branch and token visibly matters
    return LanceGenerator(model)


def frames(t: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(t, 3, h, w, generator=torch.Generator().manual_seed(seed))


REQUESTS = {
    "t2i": lambda p, s: Request("t2i", p, 16, 20, seed=s),
    "t2v": lambda p, s: Request("t2v", p, 12, 12, frames=3, seed=s),
    "i2v": lambda p, s: Request("i2v", p, frames=3, seed=s, source=frames(1, 12, 16, 7)),
    "image_edit": lambda p, s: Request("image_edit", p, seed=s, source=frames(1, 28, 56, 8)),
    "video_edit": lambda p, s: Request("video_edit", p, seed=s, source=frames(2, 28, 28, 9)),
}


def latents(gen, task, prompts, seeds, use_cache=True, **options):
    samples = [gen.prepare(REQUESTS[task](p, s)) for p, s in zip(prompts, seeds)]
    with torch.no_grad():
        return sample_latents(gen.model, gen.builder, samples, seeds, SamplerOptions(**{**FAST, **options}), use_cache)


@pytest.mark.parametrize("task,options", [
    ("t2i", {}), ("t2v", {}), ("i2v", {}), ("image_edit", {"image_scale": 1.6}), ("video_edit", {}),
])
def test_kv_cache_gives_the_same_latents_as_full_recompute(gen, task, options):
    prompts, seeds = ["a red sign", 'the word "GO"'], [3, 4]
    cached = latents(gen, task, prompts, seeds, True, **options)
    full = latents(gen, task, prompts, seeds, False, **options)
    torch.testing.assert_close(cached.latents, full.latents, atol=2e-5, rtol=1e-4)
    noise = latents(gen, task, prompts, seeds, True, num_steps=1, text_scale=1.0).latents
    assert (cached.latents - noise).abs().max() > 1e-2  # the model did move the latents


def test_edit_image_guidance_runs_a_third_branch_and_changes_the_result(gen):
    sample = gen.prepare(REQUESTS["image_edit"]("make it red", 0))
    session = DenoisingSession(gen.model, gen.builder, [sample], SamplerOptions(image_scale=2.0))
    assert session.branches == ["cond", "text_uncond", "uncond_all"]
    rows = session.rendered
    assert [s.modality for s in rows[2].splits].count(2) == 0 and 0 not in [s.modality for s in rows[2].splits]
    assert 0 not in [s.modality for s in rows[1].splits] and 2 in [s.modality for s in rows[1].splits]
    with_img = latents(gen, "image_edit", ["make it red"], [0], image_scale=2.0).latents
    text_only = latents(gen, "image_edit", ["make it red"], [0], image_scale=1.0).latents
    assert (with_img - text_only).abs().max() > 1e-3


def test_cfg_scale_one_equals_the_conditional_branch(gen):
    scale_one = latents(gen, "t2i", ["a cat"], [1], text_scale=1.0, renorm="none")
    # guidance 4 but an interval that no timestep falls in -> only the conditional branch runs
    never = latents(gen, "t2i", ["a cat"], [1], text_scale=4.0, interval=(0.999, 0.9999), renorm="none")
    guided = latents(gen, "t2i", ["a cat"], [1], text_scale=4.0, renorm="none")
    torch.testing.assert_close(scale_one.latents, never.latents)
    assert (guided.latents - scale_one.latents).abs().max() > 1e-3


def test_interval_switches_guidance_exactly_at_its_bounds(gen, monkeypatch):
    ts = flow_timesteps(6, 3.5)
    interval = (float(ts[4]), float(ts[1]))  # active for t in (ts[4], ts[1]] -> steps 1, 2, 3
    calls = []
    original = DenoisingSession.raw_velocity

    def spy(self, x_rows, t):
        calls.append((t, x_rows.shape[0]))
        return original(self, x_rows, t)

    monkeypatch.setattr(DenoisingSession, "raw_velocity", spy)
    latents(gen, "t2i", ["a cat", "a dog"], [0, 1], num_steps=6, interval=interval)
    assert [rows for _, rows in calls] == [2, 4, 4, 4, 2, 2]
    assert [t for t, _ in calls] == [float(t) for t in ts[:-1]]


@pytest.mark.parametrize("task", ["t2i", "image_edit"])
def test_batched_generation_equals_single_generations(gen, task):
    prompts = ["a red sign", "hello", 'a long caption about the word "OPEN" on a blue door']
    seeds = [5, 6, 7]
    batched = latents(gen, task, prompts, seeds).latents
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        single = latents(gen, task, [p], [s]).latents
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-5)


def test_i2v_keeps_the_image_latent_as_a_clean_first_frame(gen):
    req = REQUESTS["i2v"]("waves", 2)
    out = latents(gen, "i2v", ["waves"], [2])
    image_latent = gen.vae_latent(req.source)
    assert out.latents.shape[2] == 3
    assert torch.equal(out.latents[0, :, 0], image_latent[:, 0])
    assert (out.latents[0, :, 1:] - image_latent[:, :1]).abs().max() > 1e-2


def test_target_split_positions_come_from_the_full_render(gen):
    sample = gen.prepare(REQUESTS["image_edit"]("x", 0))
    rendered = gen.builder.render(sample)
    prefix, target = split_at_target(rendered)
    n = len(prefix) + len(target)
    assert torch.equal(torch.cat([prefix.positions, target.positions], 1), rendered.positions[:, :n])
    assert target.splits[0].mode == "noise" and len(rendered) == n + 1  # only <|im_end|> is left out


def test_sde_sampler_reports_log_probs_and_noise_level_zero_is_the_ode(gen):
    sde = latents(gen, "t2i", ["a cat", "a dog"], [0, 1], noise_level=0.7)
    assert sde.log_probs.shape == (2, 4) and torch.isfinite(sde.log_probs).all()
    ode = latents(gen, "t2i", ["a cat", "a dog"], [0, 1])
    zero = latents(gen, "t2i", ["a cat", "a dog"], [0, 1], noise_level=0.0)
    torch.testing.assert_close(zero.latents, ode.latents, atol=1e-5, rtol=1e-5)
    assert (sde.latents - ode.latents).abs().max() > 1e-2


def x2t_samples(gen):
    return [gen.prepare(Request("i2t", "What does the sign say?", source=frames(1, 28, 28, 1))),
            gen.prepare(Request("v2t", "Describe the video.", source=frames(3, 28, 56, 2)))]


@pytest.mark.parametrize("options", [TextOptions(max_new_tokens=10),
                                     TextOptions(max_new_tokens=10, temperature=1.0, top_p=0.95)])
def test_text_generation_with_kv_cache_equals_full_recompute(gen, options):
    samples = x2t_samples(gen)
    with torch.no_grad():
        cached = generate_text(gen.model, gen.builder, samples, options, [1, 2], use_cache=True)
        full = generate_text(gen.model, gen.builder, samples, options, [1, 2], use_cache=False)
        single = generate_text(gen.model, gen.builder, samples[1:], options, [2], use_cache=True)
    assert [c.token_ids for c in cached] == [f.token_ids for f in full]
    assert cached[1].token_ids == single[0].token_ids
    assert all(len(c.token_ids) == 10 and not c.finished for c in cached)
    assert all(t < len(gen.tokenizer) for c in cached for t in c.token_ids)


def test_text_generation_stops_at_im_end_and_masks_ids_past_the_tokenizer():
    vocab, im_end = 263, 258
    logits = torch.full((2, 320), -5.0)
    logits[0, 300] = 50.0  # beyond the tokenizer: must never be picked
    logits[0, 65] = 10.0
    logits[1, im_end] = 10.0
    assert _pick_tokens(logits, vocab, TextOptions(), []) == [65, im_end]
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    # top-p this small keeps only the most likely allowed token
    assert _pick_tokens(logits, vocab, TextOptions(temperature=1.0, top_p=0.01), gens) == [65, im_end]


class EndAfter(torch.nn.Module):
    """An lm_head that makes <|im_end|> the best token from its `n`-th call on."""

    def __init__(self, head: torch.nn.Module, im_end: int, n: int) -> None:
        super().__init__()
        self.head, self.im_end, self.n, self.calls = head, im_end, n, 0

    def forward(self, h):
        self.calls += 1
        logits = self.head(h)
        if self.calls >= self.n:
            logits[:, self.im_end] += 1e4
        return logits


@pytest.mark.parametrize("use_cache", [True, False])
def test_text_generation_ends_at_im_end(gen, use_cache):
    im_end = gen.tokenizer.special_id("<|im_end|>")
    lm = gen.model.language_model
    head = lm.lm_head
    # swapped by hand: the head is a registered submodule, which monkeypatch's undo may delete
    lm.lm_head = EndAfter(head, im_end, 3)
    try:
        with torch.no_grad():
            [out] = generate_text(gen.model, gen.builder, x2t_samples(gen)[:1], TextOptions(max_new_tokens=8),
                                  use_cache=use_cache)
    finally:
        lm.lm_head = head
    assert lm.lm_head is head
    assert out.finished and len(out.token_ids) == 2 and im_end not in out.token_ids


def test_generator_outputs_frames_and_text(gen):
    reqs = [REQUESTS["t2v"]("a", 0), Request("i2t", "what?", source=frames(1, 28, 28, 3)),
            REQUESTS["image_edit"]("b", 1)]
    outs = gen.generate(reqs, SamplerOptions(**FAST), TextOptions(max_new_tokens=3))
    assert outs[0].frames.shape == (3, 12, 12, 3) and outs[0].frames.dtype == torch.uint8
    assert outs[1].text is not None and len(outs[1].text.token_ids) <= 3
    assert outs[2].frames.shape == (1, 28, 56, 3)


def test_requests_are_checked_before_model_work(gen):
    with pytest.raises(ValueError, match="18x16"):
        gen.prepare(Request("t2i", "a", 18, 16))
    with pytest.raises(ValueError, match="needs an input image"):
        gen.prepare(Request("image_edit", "a"))
    with pytest.raises(ValueError, match="position table"):
        gen.prepare(Request("t2i", "a", 4 * 40, 16))
    with pytest.raises(ValueError, match="task='x2i'"):
        gen.prepare(Request("x2i", "a"))
    wan = LanceConfig.from_preset("tiny")
    wan.vae.kind, wan.vae.spatial_stride, wan.vae.temporal_stride = "wan2.2", 16, 4
    from lance_model.generation import validate_request

    with pytest.raises(ValueError, match="frames=6"):
        validate_request(Request("t2v", "a", 32, 32, frames=6), wan)


# ------------------------------------------------------------------ static KV cache and the sampler loop
def _reference_attention(q, k, v):
    """Per-row attention over concatenated keys with repeated KV heads (the plain reference)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                           v.transpose(0, 1)[None])
    return out[0].transpose(0, 1)


def test_static_caches_equal_per_row_concatenation():
    """The denoising cache (rows packed, targets written in place, one attention call) and the
    decoding cache (padded rows, one token appended per row) against per-row concatenation."""
    from lance_model.generation import KVCache, TargetKVCache

    g = torch.Generator().manual_seed(0)
    hq, hkv, d, lengths, target = 8, 2, 16, [5, 9, 3], 4
    rows = len(lengths)
    # A packed prefill in mixed storage order: token i belongs to row sample[i].
    sample = torch.tensor(sum(([r] * n for r, n in enumerate(lengths)), []))[torch.randperm(sum(lengths), generator=g)]
    k_pre, v_pre = torch.randn(len(sample), hkv, d, generator=g), torch.randn(len(sample), hkv, d, generator=g)
    cache = TargetKVCache(1, lengths, target, hkv, d, torch.float32, torch.device("cpu"))
    cache.set_prefill_layout(sample)
    cache.store(0, k_pre, v_pre)
    for used in (rows, 2):  # all rows (CFG on), or only the first ones (CFG off)
        index = torch.randperm(used * target, generator=g).view(used, target)  # targets interleaved in storage
        q = torch.randn(used * target, hq, d, generator=g)
        k, v = torch.randn(used * target, hkv, d, generator=g), torch.randn(used * target, hkv, d, generator=g)
        out = cache.attend_target(0, q, k, v, index)
        for r in range(used):
            mine = sample == r
            kk, vv = torch.cat([k_pre[mine], k[index[r]]]), torch.cat([v_pre[mine], v[index[r]]])
            torch.testing.assert_close(out[index[r]], _reference_attention(q[index[r]], kk, vv), atol=1e-5, rtol=1e-5)
    # Decoding: one token per row appended at the row's own length, twice.
    dec = KVCache(1, lengths, max(lengths) + 2, hkv, d, torch.float32, torch.device("cpu"))
    dec.set_prefill_layout(sample)
    dec.store(0, k_pre, v_pre)
    keys = [torch.cat([k_pre[sample == r]]) for r in range(rows)]
    values = [torch.cat([v_pre[sample == r]]) for r in range(rows)]
    for _ in range(2):
        qd = torch.randn(rows, hq, d, generator=g)
        kd, vd = torch.randn(rows, hkv, d, generator=g), torch.randn(rows, hkv, d, generator=g)
        out = dec.attend_decode(0, qd, kd, vd)
        dec.advance()
        for r in range(rows):
            keys[r], values[r] = torch.cat([keys[r], kd[r:r + 1]]), torch.cat([values[r], vd[r:r + 1]])
            torch.testing.assert_close(out[r:r + 1], _reference_attention(qd[r:r + 1], keys[r], values[r]),
                                       atol=1e-5, rtol=1e-5)
    assert dec.lengths.tolist() == [n + 2 for n in lengths]


def _session(gen, prompts, use_cache=True, **options):
    samples = [gen.prepare(REQUESTS["t2i"](p, 0)) for p in prompts]
    return DenoisingSession(gen.model, gen.builder, samples, SamplerOptions(**{**FAST, **options}), use_cache)


def test_noise_steps_all_is_the_sde_sampler_and_none_is_the_ode_sampler(gen):
    from lance_model.generation import run_sampler
    from lance_model.sampling import euler_step, sde_step

    prompts, seeds = ["a red sign", "hello"], [3, 4]
    with torch.no_grad():
        sde = _session(gen, prompts, noise_level=0.7)
        out = run_sampler(sde, seeds, "all", return_trajectory=True)
        # Reference: the SDE recursion by hand, with the same per-sample draws.
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        n = out.trajectory[0].shape[1]
        draws = torch.stack([torch.randn(1 + FAST["num_steps"], n, sde.channels, generator=g) for g in gens])
        x, ts = draws[:, 0], out.timesteps
        for j in range(FAST["num_steps"]):
            x, logp, _, _ = sde_step(x, sde.velocity(x, float(ts[j])), float(ts[j]), float(ts[j + 1]), 0.7,
                                     noise=draws[:, j + 1])
            torch.testing.assert_close(out.log_probs[:, j], logp)
        torch.testing.assert_close(out.trajectory[-1], x)
        assert out.noise_steps == list(range(FAST["num_steps"]))
        # No noisy step: exactly the ODE sampler (noise_level None), whatever noise_level says.
        none = run_sampler(_session(gen, prompts, noise_level=0.7), seeds, None)
        ode = run_sampler(_session(gen, prompts), seeds)
        torch.testing.assert_close(none.latents, ode.latents, atol=0, rtol=0)
        assert none.log_probs is None and ode.log_probs is None
        # Windowed: noise on step 1 only; the others are Euler steps.
        win = run_sampler(_session(gen, prompts, noise_level=0.7), seeds, [1], return_trajectory=True)
        x0 = win.trajectory[0]
        v = sde.velocity(x0, float(ts[0]))
        torch.testing.assert_close(win.trajectory[1], euler_step(x0, v, float(ts[0]), float(ts[1])))
        assert (win.log_probs[:, [0, 2, 3]] == 0).all() and (win.log_probs[:, 1] != 0).all()
    with pytest.raises(ValueError, match="noise_level"):
        run_sampler(_session(gen, prompts), seeds, "all")


def test_sampler_log_probs_equal_the_recomputed_transition_log_probs(gen):
    from lance_model.generation import run_sampler
    from lance_model.sampling import sde_log_prob, sde_step

    with torch.no_grad():
        session = _session(gen, ["a cat", "a dog"], use_cache=False, noise_level=0.7)
        out = run_sampler(session, [0, 1], "all", return_trajectory=True)
        for j in range(FAST["num_steps"]):
            t, t_next = float(out.timesteps[j]), float(out.timesteps[j + 1])
            x, x_next = out.trajectory[j], out.trajectory[j + 1]
            _, _, mean, std = sde_step(x, session.velocity(x, t), t, t_next, 0.7, noise=torch.zeros_like(x))
            torch.testing.assert_close(sde_log_prob(x_next, mean, std), out.log_probs[:, j], atol=1e-5, rtol=1e-5)


def test_text_generation_ignores_a_samples_own_answer(gen):
    """A curated i2t row comes with its reference answer: it is what is to be generated, so it must
    not be rendered into the prompt (the answer would be followed by `<|im_end|>`)."""
    import dataclasses

    samples = x2t_samples(gen)
    with_answers = [dataclasses.replace(s, answer="OPEN") for s in samples]
    with_ids = [dataclasses.replace(s, answer_ids=gen.tokenizer.encode("OPEN")) for s in samples]
    options = TextOptions(max_new_tokens=6, ignore_eos=True)
    with torch.no_grad():
        plain = generate_text(gen.model, gen.builder, samples, options, [1, 2])
        answered = generate_text(gen.model, gen.builder, with_answers, options, [1, 2])
        by_ids = generate_text(gen.model, gen.builder, with_ids, options, [1, 2])
        prompted = [gen.builder.render(s) for s in with_answers]
    assert [a.token_ids for a in answered] == [p.token_ids for p in plain] == [b.token_ids for b in by_ids]
    assert with_answers[0].answer == "OPEN"  # the caller's samples are left as they were
    assert len(prompted[0]) > len(gen.builder.render(samples[0]))  # rendering it would have changed the prompt


def test_compiled_greedy_step_gives_the_eager_tokens(gen):
    """TextOptions.compile: the decode step through torch.compile, made once and reused by later calls."""
    samples = x2t_samples(gen)
    options = {"max_new_tokens": 6, "ignore_eos": True}
    with torch.no_grad():
        eager = generate_text(gen.model, gen.builder, samples, TextOptions(**options), [1, 2])
        compiled = [generate_text(gen.model, gen.builder, samples, TextOptions(**options, compile=True), [1, 2])
                    for _ in range(2)]
    for run in compiled:
        assert [c.token_ids for c in run] == [e.token_ids for e in eager]
    assert all(len(e.token_ids) == 6 for e in eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph decoding needs a CUDA GPU")
def test_graph_decoding_is_not_broken_by_another_thread_pinning_memory(gen):
    """A DataLoader's pin-memory thread keeps calling CUDA while a stage validates; the decode
    graph's capture must not fail because of it (capture_error_mode='thread_local')."""
    import copy
    import threading

    model = copy.deepcopy(gen.model).cuda()
    samples = x2t_samples(gen)
    stop = threading.Event()

    def pin() -> None:
        while not stop.is_set():
            torch.randn(1 << 16).pin_memory()

    with torch.no_grad():
        eager = generate_text(model, gen.builder, samples, TextOptions(max_new_tokens=8, cuda_graph=False), [1, 2])
        thread = threading.Thread(target=pin, daemon=True)
        thread.start()
        try:
            runs = [generate_text(model, gen.builder, samples, TextOptions(max_new_tokens=8), [1, 2]) for _ in range(5)]
        finally:
            stop.set()
            thread.join()
    for run in runs:
        assert [r.token_ids for r in run] == [e.token_ids for e in eager]


def test_sampling_keeps_no_autograd_graph_of_a_trainable_model(gen):
    """Sampling a model whose weights require grad, outside `torch.no_grad` (a training loop's
    validation, a probe): no step's activations are kept for a backward that never comes."""
    assert any(p.requires_grad for p in gen.model.parameters())
    samples = [gen.prepare(REQUESTS["t2i"](p, s)) for p, s in (("a cat", 0), ("a dog", 1))]
    out = sample_latents(gen.model, gen.builder, samples, [0, 1], SamplerOptions(**FAST))
    assert torch.is_grad_enabled() and not out.latents.requires_grad and out.latents.grad_fn is None
    answers = generate_text(gen.model, gen.builder, x2t_samples(gen), TextOptions(max_new_tokens=3))
    assert answers and torch.is_grad_enabled()

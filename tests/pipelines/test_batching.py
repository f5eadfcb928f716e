"""Mixture schedule, per-worker row routing, packing and its resumable state (no Ray needed)."""
from __future__ import annotations

import pytest

from lance_model import LanceConfig
from lance_model.sequence import SequenceBuilder
from lance_model.tokenizer import ByteTokenizer
from pipelines.batching import GroupStreams, Packer, mixture_weights
from pipelines.config import MixtureConfig, TaskGroup

TINY = LanceConfig.from_preset("tiny", caption_dropout=0.0, condition_dropout=0.0)


def progressive(ramp_steps: int = 100) -> MixtureConfig:
    return MixtureConfig(groups={"gen": TaskGroup(("t2i",), 3.0, 1.0), "und": TaskGroup(("i2t",), 1.0, 1.0),
                                 "edit": TaskGroup(("i2i",), 0.0, 2.0)}, ramp_steps=ramp_steps)


def test_weights_follow_the_ramp():
    m = progressive()
    assert mixture_weights(m, 0) == pytest.approx({"gen": 0.75, "und": 0.25, "edit": 0.0})
    assert mixture_weights(m, 50) == pytest.approx({"gen": 0.5, "und": 0.25, "edit": 0.25})
    assert mixture_weights(m, 100) == mixture_weights(m, 1000) == pytest.approx({"gen": 0.25, "und": 0.25, "edit": 0.5})


def make_packer(rows, mixture, rank=0, world=1, holdout=0, max_tokens=1500) -> Packer:
    streams = GroupStreams(lambda: iter(rows), {k: g.tasks for k, g in mixture.groups.items()}, rank, world, holdout)
    return Packer(streams, mixture, SequenceBuilder(ByteTokenizer()), TINY, max_tokens, seed=3, rank=rank)


def test_task_frequencies_match_weights_at_start_and_end(row_factory):
    rows = row_factory(20)
    # start: a ramp so long that 150 steps barely move the weights; end: every step past the ramp
    cases = ((progressive(ramp_steps=1_000_000), 0, {"gen": 0.75, "und": 0.25, "edit": 0.0}),
             (progressive(ramp_steps=100), 100, {"gen": 0.25, "und": 0.25, "edit": 0.5}))
    for mixture, first, expected in cases:
        packer = make_packer(rows, mixture)
        counts = {k: 0 for k in expected}
        for step in range(first, first + 150):
            _, stats = packer.next_pack(step)
            for g, n in stats.per_group.items():
                counts[g] += n
        total = sum(counts.values())
        assert total > 600
        for g, w in expected.items():
            assert abs(counts[g] / total - w) < 0.05, (first, counts)


def test_workers_split_rows_and_hold_out_validation_rows(row_factory):
    rows = row_factory(6)  # per task: 6 rows
    groups = {"gen": ("t2i",)}
    seen = []
    for rank in range(2):
        s = GroupStreams(lambda: iter(rows), groups, rank, 2, holdout=2)
        seen.append([s.take("gen")["sample_id"] for _ in range(2)])
        assert [r["sample_id"] for r in s.holdout_rows()] == ["t2i-0-0", "t2i-0-1"]
    assert seen == [["t2i-0-2", "t2i-0-4"], ["t2i-0-3", "t2i-0-5"]]
    # epochs wrap around: the third row of rank 0 is the first again
    s = GroupStreams(lambda: iter(rows), groups, 0, 2, holdout=2)
    assert [s.take("gen")["sample_id"] for _ in range(3)] == ["t2i-0-2", "t2i-0-4", "t2i-0-2"]


def test_state_restores_the_exact_next_packs(row_factory):
    rows = row_factory(10)
    mixture = progressive()
    a = make_packer(rows, mixture)
    for step in range(7):
        a.next_pack(step)
    state = a.state_dict()
    expected = [a.next_pack(step)[0] for step in range(7, 12)]
    b = make_packer(rows, mixture)
    b.load_state_dict(state)
    for step, want in zip(range(7, 12), expected):
        got, _ = b.next_pack(step)
        assert got.tasks == want.tasks and got.text_ids.tolist() == want.text_ids.tolist()
        assert got.vae_latents.equal(want.vae_latents)


def test_oversized_samples_are_skipped_and_counted(row_factory):
    rows = row_factory(4)
    packer = make_packer(rows, MixtureConfig(groups={"gen": TaskGroup(("t2i",)), "und": TaskGroup(("i2t",))}),
                         max_tokens=1500)
    packer.max_sample_tokens = 175  # shorter than a t2i sample (184 tokens), longer than an i2t one (167)
    batch, stats = packer.next_pack(0)
    assert set(batch.tasks) == {"i2t"} and stats.skipped_too_long > 0

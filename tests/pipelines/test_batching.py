"""Mixture schedule, per-worker row routing, packing and its resumable state (no Ray needed)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lance_model import LanceConfig
from lance_model.attention import MaskLayout
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


def test_a_group_schedule_gives_piecewise_linear_weights_beside_ramped_groups():
    """A growing-word curriculum: one letter, then two, then whole words, each fading into the next;
    a group without a schedule keeps its ramp."""
    m = MixtureConfig(groups={"one": TaskGroup(("i2t",), uri_prefixes=("synthetic://one/",),
                                               schedule=((0, 1.0), (100, 1.0), (200, 0.0))),
                              "two": TaskGroup(("i2t",), uri_prefixes=("synthetic://two/",),
                                               schedule=((100, 0.0), (200, 1.0), (300, 0.0))),
                              "words": TaskGroup(("i2t",), uri_prefixes=("synthetic://words/",),
                                                 schedule=((200, 0.0), (300, 1.0))),
                              "gen": TaskGroup(("t2i",), 0.0, 1.0)}, ramp_steps=400)
    m.validate()
    assert mixture_weights(m, 0) == pytest.approx({"one": 1.0, "two": 0.0, "words": 0.0, "gen": 0.0})
    assert mixture_weights(m, 150) == pytest.approx({"one": 0.5 / 1.375, "two": 0.5 / 1.375, "words": 0.0,
                                                     "gen": 0.375 / 1.375})
    assert mixture_weights(m, 250) == pytest.approx({"one": 0.0, "two": 0.5 / 1.625, "words": 0.5 / 1.625,
                                                     "gen": 0.625 / 1.625})
    assert mixture_weights(m, 10_000) == pytest.approx({"one": 0.0, "two": 0.0, "words": 0.5, "gen": 0.5})


@pytest.mark.parametrize("groups, message", [
    ({"a": TaskGroup(("t2i",), schedule=((100, 1.0), (50, 0.0)))}, r"mixture\.groups\.a\.schedule.*rising steps"),
    ({"a": TaskGroup(("t2i",), 1.0, 0.0, schedule=((0, 1.0),))}, r"mixture\.groups\.a=.*no weight or end_weight"),
    # nothing to draw between step 100 and 200
    ({"a": TaskGroup(("t2i",), schedule=((0, 1.0), (100, 0.0))),
      "b": TaskGroup(("i2t",), schedule=((200, 0.0), (300, 1.0)))}, r"positive sum at every step \(at step 100"),
])
def test_bad_schedules_are_refused_naming_the_group(groups, message):
    from lance_platform.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        MixtureConfig(groups=groups).validate()


def make_packer(rows, mixture, rank=0, world=1, holdout=0, max_tokens=1500) -> Packer:
    streams = GroupStreams(rows, {k: g.tasks for k, g in mixture.groups.items()}, rank, world, holdout)
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
        s = GroupStreams(rows, groups, rank, 2, holdout=2)
        seen.append([s.take("gen")["sample_id"] for _ in range(2)])
        assert [r["sample_id"] for r in s.holdout_rows()] == ["t2i-0-0", "t2i-0-1"]
    assert seen == [["t2i-0-2", "t2i-0-4"], ["t2i-0-3", "t2i-0-5"]]
    # epochs wrap around: the third row of rank 0 is the first again
    s = GroupStreams(rows, groups, 0, 2, holdout=2)
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


class TextSpy(ByteTokenizer):
    """The byte tokenizer, remembering every text it was asked to encode."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.texts.append(text)
        return super().encode(text)


def assert_same_batch(a, b) -> None:
    """Every field of two packed batches: ids, labels, positions, indexes, latents, mask layout."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, MaskLayout):
            for g in dataclasses.fields(x):
                assert torch.equal(getattr(x, g.name), getattr(y, g.name)), f"layout.{g.name}"
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def test_packing_from_stored_ids_equals_packing_from_text(row_factory):
    rows = row_factory(6)
    texts = {r[k] for r in rows for k in ("caption", "question", "answer") if r.get(k)}
    assert all(f"{k}_ids" in r for r in rows for k in ("caption", "question", "answer") if r.get(k))
    without_ids = [{k: v for k, v in r.items() if not k.endswith("_ids")} for r in rows]
    mixture = MixtureConfig(groups={"gen": TaskGroup(("t2i",)), "und": TaskGroup(("i2t",)),
                                    "edit": TaskGroup(("i2i",))})
    # CFG dropout on, so the caption-dropped renders are compared too
    config = LanceConfig.from_preset("tiny", caption_dropout=0.3, condition_dropout=0.3)

    def packer(source, tok):
        streams = GroupStreams(source, {k: g.tasks for k, g in mixture.groups.items()})
        return Packer(streams, mixture, SequenceBuilder(tok), config, 1500, seed=5)

    stored_tok, text_tok = TextSpy(), TextSpy()
    stored, from_text = packer(rows, stored_tok), packer(without_ids, text_tok)
    tasks, labels = set(), 0
    for step in range(6):
        a, _ = stored.next_pack(step)
        b, _ = from_text.next_pack(step)
        assert_same_batch(a, b)
        tasks |= set(a.tasks)
        labels += a.ce_labels.numel()
    assert tasks == {"t2i", "i2t", "image_edit"} and labels > 0
    # the stored path never tokenized a caption, question or answer; the text path did
    assert not texts & {t.removesuffix("<|im_end|>") for t in stored_tok.texts}
    assert texts & {t.removesuffix("<|im_end|>") for t in text_tok.texts}


def test_stored_ids_are_what_gets_packed(row_factory):
    """The ids in the row, not the text next to them, become the text tokens and CE labels."""
    row = next(r for r in row_factory(1) if r["task"] == "i2t")
    mixture = MixtureConfig(groups={"und": TaskGroup(("i2t",))})
    changed = {**row, "answer_ids": ByteTokenizer().encode("EXIT")}
    batches = [make_packer([r], mixture).next_pack(0)[0] for r in (row, changed)]
    im_end = ByteTokenizer().special_id("<|im_end|>")
    labels = [b.ce_labels.tolist() for b in batches]
    assert labels[1][-5:] == [*b"EXIT", im_end]
    assert labels[0][-len(row["answer"]) - 1:] == [*row["answer"].encode(), im_end]


def test_per_group_holdout(row_factory):
    rows = row_factory(4)
    s = GroupStreams(rows, {"gen": ("t2i",), "und": ("i2t",)}, 0, 1, holdout={"gen": 3, "und": 0})
    assert [r["sample_id"] for r in s.holdout_rows()] == ["t2i-0-0", "t2i-0-1", "t2i-0-2"]
    assert s.take("gen")["sample_id"] == "t2i-0-3" and s.take("und")["sample_id"] == "i2t-0-0"


def test_groups_by_source_take_only_their_sources_rows_and_ramp_between_them(row_factory):
    # two "sources" of the same tasks: rows of seed 0 (synthetic://0/...) and of seed 1 (synthetic://1/...)
    rows = row_factory(4, seed=0) + row_factory(4, seed=1)
    easy = TaskGroup(("t2i", "i2t"), 1.0, 0.0, uri_prefixes=("synthetic://0/",))
    hard = TaskGroup(("t2i", "i2t"), 0.0, 1.0, uri_prefixes=("synthetic://1/",))
    streams = GroupStreams(rows, {"easy": easy, "hard": hard})
    ids = {g: {streams.take(g)["sample_id"] for _ in range(8)} for g in ("easy", "hard")}
    assert ids["easy"] == {f"{t}-0-{i}" for t in ("t2i", "i2t") for i in range(4)}
    assert ids["hard"] == {f"{t}-1-{i}" for t in ("t2i", "i2t") for i in range(4)}
    # a curriculum: the first steps draw only the easy source, the steps past the ramp only the hard one
    mixture = MixtureConfig(groups={"easy": easy, "hard": hard}, ramp_steps=10)
    packer = Packer(GroupStreams(rows, mixture.groups), mixture, SequenceBuilder(ByteTokenizer()), TINY, 1500,
                    seed=3)
    for step, drawn in ((0, "easy"), (10, "hard"), (50, "hard")):
        _, stats = packer.next_pack(step)
        # at step 10 the easy draw that did not fit step 0's pack is dropped: its weight is now 0
        assert set(stats.per_group) == {drawn}, (step, stats.per_group)


def test_overlapping_groups_are_refused_naming_both():
    from lance_model.configio import from_dict
    from lance_platform.config import ConfigError

    def mixture(**groups):
        return from_dict(MixtureConfig, {"groups": groups}, "mixture.")

    with pytest.raises(ConfigError, match=r"mixture\.groups\.words=.*shares tasks \['t2i'\] with group 'letters'"):
        mixture(letters={"tasks": ["t2i"], "uri_prefixes": ["synthetic://letters/"]},
                words={"tasks": ["t2i", "i2t"]}).validate()
    with pytest.raises(ConfigError, match="do not overlap"):
        mixture(a={"tasks": ["t2i"], "uri_prefixes": ["synthetic://text"]},
                b={"tasks": ["t2i"], "uri_prefixes": ["synthetic://text/"]}).validate()
    mixture(letters={"tasks": ["t2i"], "uri_prefixes": ["synthetic://letters/"]},
            words={"tasks": ["t2i"], "uri_prefixes": ["synthetic://text/"]},
            und={"tasks": ["i2t"]}).validate()

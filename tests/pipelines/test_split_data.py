"""Split data (each worker reads only its dealt rows), seek-on-resume, re-split across a change of
world size, and packing ahead in a thread (no Ray, no process group)."""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from lance_model import LanceConfig
from lance_model.sequence import SequenceBuilder
from lance_model.tokenizer import ByteTokenizer
from lance_platform.schema import write_shard
from pipelines.batching import GroupStreams, ListRows, Packer, Prefetcher, ShardRows, resplit_group
from pipelines.config import MixtureConfig, TaskGroup

TINY = LanceConfig.from_preset("tiny", caption_dropout=0.0, condition_dropout=0.0)
ONE_GROUP = MixtureConfig(groups={"gen": TaskGroup(("t2i",))})
MIXED = MixtureConfig(groups={"gen": TaskGroup(("t2i",), 2.0), "und": TaskGroup(("i2t",)),
                              "edit": TaskGroup(("i2i",), 0.5)})


def packers(rows, mixture, world, block=1, holdout=0, max_tokens=1500):
    groups = {k: g.tasks for k, g in mixture.groups.items()}
    return [Packer(GroupStreams(ListRows(rows), groups, r, world, holdout, block), mixture,
                   SequenceBuilder(ByteTokenizer()), TINY, max_tokens, seed=3, rank=r) for r in range(world)]


def take_ids(packer: Packer, group: str, n: int) -> list[str]:
    return [packer.streams.take(group)["sample_id"] for _ in range(n)]


def run(ps: list[Packer], steps: range, log: list[tuple[str, int]] | None = None) -> list[str]:
    """Pack `steps` on every rank; the sample ids taken (and, into `log`, (group, position) pairs)."""
    ids = []
    for p in ps:
        original = p.streams.take

        def take(group, p=p, original=original):
            if log is not None:
                log.append((group, p.streams.peek_position(group)))
            row = original(group)
            ids.append(row["sample_id"])
            return row

        p.streams.take = take
        for step in steps:
            p.next_pack(step)
        p.streams.take = original
    return ids


# ---------------------------------------------------------------------------------------- split reads
def test_each_worker_reads_only_its_row_groups(tmp_path, row_factory):
    rows = [r for r in row_factory(64) if r["task"] == "t2i"]  # 64 rows
    files = []
    for i in range(4):  # 4 files x 2 row groups of 8 rows
        path = write_shard(rows[16 * i:16 * (i + 1)], tmp_path / f"shard-{i}.parquet")
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        pq.write_table(table, path, row_group_size=8)
        files.append(str(path))
    taken = {}
    sources = {}
    for rank in range(2):
        source = ShardRows(files)
        s = GroupStreams(source, {"gen": ("t2i",)}, rank, 2, block=8)
        taken[rank] = [s.take("gen")["sample_id"] for _ in range(32)]  # one epoch of this rank's share
        sources[rank] = source
    # rank 0 has blocks 0, 2, 4, 6 (rows 0-7, 16-23, ...), rank 1 the others: together one epoch, once
    assert taken[0][:9] == [f"t2i-0-{i}" for i in range(8)] + ["t2i-0-16"]
    assert sorted(taken[0] + taken[1]) == sorted(r["sample_id"] for r in rows)
    for rank, source in sources.items():
        # 32 rows taken + read ahead to the next fetch boundary; half the row groups, each read once
        assert source.rows_read == 32
        assert source.row_groups_read == 4, rank


def test_resume_seeks_without_replaying_rows(row_factory):
    rows = row_factory(20)
    a = packers(rows, MIXED, 1)[0]
    for step in range(6):
        a.next_pack(step)
    state = a.state_dict()
    assert set(state["streams"]["groups"]) == {"gen", "und", "edit"} and "queues" not in state["streams"]
    expected = [a.next_pack(step)[0] for step in range(6, 10)]
    b = packers(rows, MIXED, 1)[0]
    b.load_state_dict(state)
    assert b.streams.source.rows_read == 0  # seeking reads nothing
    got = [b.next_pack(step)[0] for step in range(6, 10)]
    assert [g.tasks for g in got] == [e.tasks for e in expected]
    assert all(g.text_ids.equal(e.text_ids) and g.vae_latents.equal(e.vae_latents) for g, e in zip(got, expected))
    # what b read: only what it packed in these 4 steps, rounded up to one fetch per group
    assert b.streams.source.rows_read <= sum(len(g.tasks) for g in got) + 3 * 32


# ---------------------------------------------------------------------------------------- re-split
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 3)])
def test_resume_on_another_world_size_consumes_what_an_uninterrupted_run_does(row_factory, before, after):
    """One group of equal-sized samples: every rank takes the same number per pack, so a run's
    samples are fixed by how many packs it made; N workers for 3 steps then M for 4 take exactly
    the multiset an uninterrupted single worker takes in 3N + 4M packs (into a second epoch)."""
    rows = [r for r in row_factory(10) if r["task"] == "t2i"]
    first = packers(rows, ONE_GROUP, before, block=2)
    ids = run(first, range(3))
    states = [p.state_dict() for p in first]
    second = packers(rows, ONE_GROUP, after, block=1)
    for p in second:
        p.load_states(states)
    ids += run(second, range(3, 7))
    reference = run(packers(rows, ONE_GROUP, 1), range(3 * before + 4 * after))
    assert len(ids) > len(rows)  # past the first epoch
    assert Counter(ids) == Counter(reference)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (3, 2)])
def test_resplit_never_repeats_or_skips_a_position(row_factory, before, after):
    """A mixture with samples of different sizes (ranks take different numbers): over the whole run,
    every position is taken at most once, and all below the frontier are taken."""
    rows = row_factory(12)
    log: list[tuple[str, int]] = []
    first = packers(rows, MIXED, before, block=2, holdout=1)
    run(first, range(5), log)
    states = [p.state_dict() for p in first]
    second = packers(rows, MIXED, after, block=3, holdout=1)
    for p in second:
        p.load_states(states)
    run(second, range(5, 12), log)
    for group in MIXED.groups:
        taken = [pos for g, pos in log if g == group]
        assert len(taken) == len(set(taken)), group  # nothing twice
        frontier = min(p.streams.peek_position(group) for p in second)
        assert set(range(frontier)) <= set(taken), group  # nothing skipped
        assert max(taken) - frontier < 40
    assert len({g for g, _ in log}) == 3


def test_resplit_group_deals_the_untaken_positions():
    # 2 ranks, block 1: rank 0 took positions 0, 2, 4; rank 1 took 1 -> free: 3, then 5, 6, ...
    deals = [{"leftover": [], "next": 0, "world": 2, "block": 1, "taken": 3},
             {"leftover": [], "next": 0, "world": 2, "block": 1, "taken": 1}]
    new = resplit_group(deals, 1, 1)
    assert new[0].leftover == [3] and new[0].next == 5
    assert [new[0].position(k) for k in range(4)] == [3, 5, 6, 7]
    again = resplit_group([new[0].to_dict() | {"taken": 2}], 2, 1)  # took 3 and 5
    assert [again[0].position(k) for k in range(3)] == [6, 8, 10] and [again[1].position(k) for k in range(2)] == [7, 9]
    with pytest.raises(ValueError, match="all 1 old ranks"):
        resplit_group(deals[:1], 1, 1)


def test_bad_states_are_refused(row_factory):
    rows = row_factory(4)
    s = GroupStreams(ListRows(rows), {"gen": ("t2i",)}, 0, 2)
    with pytest.raises(ValueError, match="lance-split/1"):
        s.load_states([{"epoch": 0, "read": 3, "queues": {}}])
    other = GroupStreams(ListRows(rows), {"gen": ("t2i",)}, 1, 2).state_dict()
    with pytest.raises(ValueError, match="rank 1 of 2 given to rank 0"):
        s.load_state_dict(other)
    with pytest.raises(ValueError, match="all 3 old ranks"):
        s.load_states([{**other, "world": 3}])


# ---------------------------------------------------------------------------------------- prefetch
def test_prefetcher_keeps_order_and_runs_ahead_bounded():
    produced: list[int] = []
    release = threading.Event()

    def produce(step: int) -> int:
        produced.append(step)
        if step == 3:
            release.wait(5)
        return step * step

    with Prefetcher(produce, range(10), depth=2) as ahead:
        assert ahead.get(0) == 0
        time.sleep(0.3)
        # step 3 blocks, so 1, 2 are queued (depth 2) and 3 is being made: never further ahead
        assert produced == [0, 1, 2, 3]
        release.set()
        assert [ahead.get(s) for s in range(1, 10)] == [s * s for s in range(1, 10)]
        with pytest.raises(ValueError, match="next one is None"):
            ahead.get(10)


def test_prefetcher_raises_the_producers_exception_at_its_step():
    def produce(step: int) -> int:
        if step == 2:
            raise RuntimeError("bad row at step 2")
        return step

    ahead = Prefetcher(produce, range(5), depth=3)
    assert [ahead.get(0), ahead.get(1)] == [0, 1]
    with pytest.raises(RuntimeError, match="bad row at step 2"):
        ahead.get(2)
    assert not ahead._thread.is_alive()


def test_prefetcher_close_stops_a_blocked_producer():
    calls = []
    ahead = Prefetcher(lambda s: calls.append(s) or s, range(1000), depth=1)
    assert ahead.get(0) == 0
    time.sleep(0.1)
    ahead.close()
    assert not ahead._thread.is_alive() and len(calls) <= 4


def test_prefetched_packs_equal_packs_made_in_the_step(row_factory):
    rows = row_factory(10)
    inline = packers(rows, MIXED, 1)[0]
    want = [inline.next_pack(step)[0] for step in range(8)]
    ahead_packer = packers(rows, MIXED, 1)[0]

    def pack(step):
        batch, _ = ahead_packer.next_pack(step)
        return batch, ahead_packer.state_dict()

    with Prefetcher(pack, range(8), depth=2) as ahead:
        got = [ahead.get(step) for step in range(8)]
    assert all(g.text_ids.equal(w.text_ids) and g.tasks == w.tasks for (g, _), w in zip(got, want))
    # each pack's data state is the state right after that pack, not after the packs made ahead
    resumed = packers(rows, MIXED, 1)[0]
    resumed.load_state_dict(got[4][1])
    assert resumed.next_pack(5)[0].text_ids.equal(want[5].text_ids)

"""`data.pack_process`: packing in a forked DataLoader worker gives exactly the packs, packer states
and counters of packing in a thread, from the restored position on; errors and early closes behave
as the thread prefetcher's do."""
from __future__ import annotations

import os
import time

import pytest
import torch
from test_batching import assert_same_batch

from lance_model import LanceConfig
from lance_model.sequence import SequenceBuilder
from lance_model.tokenizer import ByteTokenizer
from pipelines.batching import GroupStreams, Packer, Prefetcher, ProcessPrefetcher
from pipelines.config import MixtureConfig, TaskGroup, load_stage_config

TINY = LanceConfig.from_preset("tiny")
MIXTURE = MixtureConfig(groups={"gen": TaskGroup(tasks=("t2i", "i2i"), weight=0.6),
                                "und": TaskGroup(tasks=("i2t",), weight=0.4)})


def packer_over(rows) -> Packer:
    streams = GroupStreams(rows, {k: g.tasks for k, g in MIXTURE.groups.items()}, 0, 1, 0)
    return Packer(streams, MIXTURE, SequenceBuilder(ByteTokenizer()), TINY, 600, seed=5)


def producer(packer: Packer):
    def pack(step: int):
        batch, stats = packer.next_pack(step)
        return batch, stats, packer.state_dict(), packer.total.skipped_too_long, packer.streams.source.rows_read, \
            os.getpid()
    return pack


def test_packs_made_in_a_process_equal_packs_made_in_a_thread_after_a_restore(row_factory):
    rows = row_factory(12)
    earlier = packer_over(rows)
    for step in range(3):  # a resumed stage: the packer is restored before packing ahead starts
        earlier.next_pack(step)
    restored = earlier.state_dict()
    reference, forked = packer_over(rows), packer_over(rows)
    for p in (reference, forked):
        p.load_state_dict(restored)
    with Prefetcher(producer(reference), range(3, 9)) as thread, \
            ProcessPrefetcher(producer(forked), range(3, 9), pin_memory=torch.cuda.is_available()) as process:
        for step in range(3, 9):
            a, b = thread.get(step), process.get(step)
            assert_same_batch(a[0], b[0])
            assert (a[1], a[2], a[3], a[4]) == (b[1], b[2], b[3], b[4]), step
            assert a[2]["streams"]["groups"], "the state names the stream positions"
            assert b[5] != os.getpid() and a[5] == os.getpid()  # made in another process
    # the training process's own packer did not move: the worker packed on its copy
    assert forked.state_dict() == restored != reference.state_dict()


def test_an_error_in_the_packing_process_is_raised_at_its_step():
    def produce(step: int) -> int:
        if step == 2:
            raise ValueError("bad row at step 2")
        return step * 10

    ahead = ProcessPrefetcher(produce, range(5), depth=2)
    assert [ahead.get(0), ahead.get(1)] == [0, 10]
    with pytest.raises(ValueError, match="bad row at step 2"):
        ahead.get(2)
    with pytest.raises(ValueError, match="asked for step 4, the next one is 3"):
        ahead.get(4)


def test_close_before_the_end_stops_the_worker_and_an_empty_range_starts_none():
    def produce(step: int) -> int:
        time.sleep(0.01)
        return step

    start = time.time()
    ahead = ProcessPrefetcher(produce, range(1000), depth=2)
    assert ahead.get(0) == 0
    workers = list(ahead._it._workers)
    ahead.close()
    assert time.time() - start < 20 and not any(w.is_alive() for w in workers)
    with ProcessPrefetcher(produce, range(7, 7)) as none:
        with pytest.raises(ValueError, match="next one is None"):
            none.get(7)


def test_pack_process_is_a_stage_option():
    assert not load_stage_config(None, [], require_shards=False).data.pack_process
    assert load_stage_config(None, ["data.pack_process=true"], require_shards=False).data.pack_process

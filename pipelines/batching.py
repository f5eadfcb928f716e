"""From curated rows to packed training batches: task-group mixture, per-group streams, packing.

Each worker reads only its own part of the stage's shards and packs samples into sequences of at
most `max_tokens` tokens (text + ViT + VAE), drawing a group for every slot by the mixture weights
of the current step.

How rows are split (`GroupStreams`): the rows of each task group, in shard order and after the
group's validation hold-out, repeat epoch after epoch as one endless sequence of *positions*
(position p is row p mod n of the group, in epoch p // n). A worker takes the positions dealt to
it in blocks of `block` (block b goes to rank b mod world), and reads only the Parquet row groups
that hold them (`ShardRows`). Its data state is one cursor per group (how many of its positions it
has taken), so a resumed worker seeks straight to its next row without replaying any. When the
number of workers changes, `resplit` turns the cursors of all the old workers into the positions
none of them took (at most a few blocks per group) followed by the untouched rest, and deals those
to the new workers: over the whole run no position is taken twice and none is skipped.

Everything random is derived from (seed, step, rank). `Prefetcher` packs the next steps in a
background thread while the current step runs.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import torch.utils.data

from lance_model.attention import visible_pairs
from lance_model.config import LanceConfig
from lance_model.packing import PackedBatch, pack_rendered
from lance_model.sequence import RenderedSample, SequenceBuilder
from lance_platform.schema import row_to_sample

from .config import MixtureConfig, TaskGroup

log = logging.getLogger(__name__)
MAX_SKIPS_PER_PACK = 1000
SPLIT_FORMAT = "lance-split/1"
FETCH_AHEAD = 32  # positions of one group a worker reads at a time


def mixture_weights(mixture: MixtureConfig, step: int) -> dict[str, float]:
    """Normalised group weights at `step` (each group's schedule, or its linear ramp from weight to
    end_weight over ramp_steps)."""
    raw = {name: g.weight_at(step, mixture.ramp_steps) for name, g in mixture.groups.items()}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def step_rng(seed: int, step: int, rank: int, salt: int = 0) -> random.Random:
    return random.Random(((seed * 1_000_003 + step) * 1_009 + rank) * 31 + salt)


# ---------------------------------------------------------------------------------------- row sources
class RowSource(Protocol):
    """Rows addressed by index (dataset order): the task of every row, and chosen rows in full."""

    rows_read: int

    def tasks(self) -> list[str | None]: ...

    def uris(self) -> list[str | None]: ...

    def fetch(self, indices: Sequence[int]) -> list[dict]: ...


class ListRows:
    """Rows held in memory (tests, small data); counts the rows fetched like `ShardRows`."""

    def __init__(self, rows: Sequence[dict]) -> None:
        self.rows = list(rows)
        self.rows_read = 0

    def tasks(self) -> list[str | None]:
        return [r.get("task") for r in self.rows]

    def uris(self) -> list[str | None]:
        return [r.get("source_uri") for r in self.rows]

    def fetch(self, indices: Sequence[int]) -> list[dict]:
        self.rows_read += len(indices)
        return [self.rows[i] for i in indices]


class ShardRows:
    """The rows of Parquet shard files (file order, then row order), read by row group: `tasks()`
    reads the `task` column only; `fetch` reads just the row groups holding the asked rows (the
    last few stay cached) and turns only those rows into Python. `rows_read` / `row_groups_read`
    count what this worker read."""

    def __init__(self, files: Sequence[str], cache: int = 4) -> None:
        import pyarrow.parquet as pq

        if not files:
            raise ValueError("ShardRows needs at least one shard file")
        self.files = [str(f) for f in files]
        self._pq = pq
        self.starts: list[int] = []  # first row index of every (file, row group)
        self.groups: list[tuple[int, int]] = []
        total = 0
        for fi, f in enumerate(self.files):
            meta = pq.ParquetFile(f).metadata
            for g in range(meta.num_row_groups):
                self.starts.append(total)
                self.groups.append((fi, g))
                total += meta.row_group(g).num_rows
        self.num_rows = total
        self.rows_read = 0
        self.row_groups_read = 0
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._cache_size = cache
        self._files: dict[int, Any] = {}

    def tasks(self) -> list[str | None]:
        return self._column("task")

    def uris(self) -> list[str | None]:
        return self._column("source_uri")

    def _column(self, name: str) -> list:
        out: list = []
        for f in self.files:
            out.extend(self._pq.read_table(f, columns=[name]).column(name).to_pylist())
        return out

    def _group_table(self, gi: int):
        if gi in self._cache:
            self._cache.move_to_end(gi)
            return self._cache[gi]
        fi, g = self.groups[gi]
        if fi not in self._files:
            self._files[fi] = self._pq.ParquetFile(self.files[fi])
        table = self._files[fi].read_row_group(g)
        self.row_groups_read += 1
        self._cache[gi] = table
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return table

    def fetch(self, indices: Sequence[int]) -> list[dict]:
        import bisect

        out: list[dict | None] = [None] * len(indices)
        by_group: dict[int, list[tuple[int, int]]] = {}
        for slot, i in enumerate(indices):
            if not 0 <= i < self.num_rows:
                raise IndexError(f"row {i} is outside the {self.num_rows} rows of {len(self.files)} shard file(s)")
            gi = bisect.bisect_right(self.starts, i) - 1
            by_group.setdefault(gi, []).append((slot, i - self.starts[gi]))
        for gi, wanted in by_group.items():
            rows = self._group_table(gi).take([r for _, r in wanted]).to_pylist()
            for (slot, _), row in zip(wanted, rows):
                out[slot] = row
        self.rows_read += len(indices)
        return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------- dealing
@dataclass
class Deal:
    """One group's positions as dealt to one worker: the sequence `leftover ++ [next, next+1, ...]`
    cut into blocks of `block`, block b going to rank b mod `world`; `taken` of this rank's
    positions are consumed."""

    leftover: list[int]
    next: int
    world: int
    rank: int
    block: int = 1
    taken: int = 0

    def sequence_index(self, k: int) -> int:
        """Index in the sequence of this rank's k-th position."""
        return (k // self.block) * self.block * self.world + self.rank * self.block + k % self.block

    def position(self, k: int) -> int:
        q = self.sequence_index(k)
        return self.leftover[q] if q < len(self.leftover) else self.next + q - len(self.leftover)

    def to_dict(self) -> dict:
        return {"leftover": list(self.leftover), "next": self.next, "world": self.world, "block": self.block,
                "taken": self.taken}


def resplit_group(deals: Sequence[dict], world: int, block: int) -> list[Deal]:
    """The positions none of `deals` (one per old rank, from one segment) took, dealt to `world`
    new ranks: first those below the furthest position taken, then the untouched rest."""
    old = [Deal(d["leftover"], d["next"], d["world"], r, d["block"], d["taken"]) for r, d in enumerate(deals)]
    if not old or len({(d.world, d.block, d.next, len(d.leftover)) for d in old}) != 1 or old[0].world != len(old):
        raise ValueError(f"data state: expected the deals of all {len(old)} old ranks of one split")
    first_free = min(d.sequence_index(d.taken) for d in old)
    end = max([d.sequence_index(d.taken - 1) + 1 for d in old if d.taken] + [first_free])
    consumed = {d.sequence_index(k) for d in old for k in range(d.taken) if d.sequence_index(k) >= first_free}
    probe = old[0]
    stop = max(end, len(probe.leftover))
    leftover = [probe.leftover[q] if q < len(probe.leftover) else probe.next + q - len(probe.leftover)
                for q in range(first_free, stop) if q not in consumed]
    nxt = probe.next + max(end - len(probe.leftover), 0)
    return [Deal(list(leftover), nxt, world, r, block) for r in range(world)]


def group_members(source: RowSource, groups: dict[str, tuple[str, ...] | TaskGroup]) -> dict[str, list[int]]:
    """The row indexes of every group, in dataset order: the rows of its tasks (a `TaskGroup` with
    `uri_prefixes`: only those whose source_uri starts with one of them; the source_uri column is
    read only then). A row in no group is not trained on; a row is in at most one group (the stage
    config refuses groups that overlap; here the first one takes it)."""
    specs = {g: spec if isinstance(spec, TaskGroup) else TaskGroup(tasks=tuple(spec)) for g, spec in groups.items()}
    tasks = source.tasks()
    uris = source.uris() if any(spec.uri_prefixes for spec in specs.values()) else [None] * len(tasks)
    members: dict[str, list[int]] = {g: [] for g in specs}
    for i, (task, uri) in enumerate(zip(tasks, uris)):
        for g, spec in specs.items():
            if spec.takes(task, uri):
                members[g].append(i)
                break
    return members


class GroupStreams:
    """This worker's rows of every task group, read from `source` on demand.

    Within each group (the rows of its tasks, in dataset order) the first `holdout` rows (one
    number for every group, or a number per group as the driver's `plan_data` chose them) are
    reserved for validation; the rest are dealt to the workers as described in the module
    docstring. `state_dict` is the per-group cursor; `load_state_dict` seeks to it (reading
    nothing it does not need), and re-splits when the saved states come from another world size.
    """

    def __init__(self, source: RowSource | Sequence[dict], groups: dict[str, tuple[str, ...] | TaskGroup],
                 rank: int = 0, world: int = 1, holdout: int | dict[str, int] = 0, block: int = 1) -> None:
        self.source: RowSource = source if hasattr(source, "fetch") else ListRows(source)  # type: ignore[arg-type]
        self.rank, self.world, self.block = rank, world, max(int(block), 1)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.holdout = {g: int(holdout.get(g, 0) if isinstance(holdout, dict) else holdout) for g in groups}
        members = group_members(self.source, groups)
        self.held = {g: rows[:self.holdout[g]] for g, rows in members.items()}
        self.members = {g: rows[self.holdout[g]:] for g, rows in members.items()}
        self.deals = {g: Deal([], 0, world, rank, self.block) for g in groups}
        self.queues: dict[str, deque] = {g: deque() for g in groups}  # rows read ahead, not yet taken

    def peek_position(self, group: str) -> int:
        """The position (epoch * rows + row) of the group's next row for this worker."""
        d = self.deals[group]
        return d.position(d.taken)

    def _fill(self, group: str) -> None:
        if self.queues[group]:
            return
        rows = self.members[group]
        if not rows:
            raise ValueError(f"task group {group!r} has no rows for training (a hold-out of {self.holdout[group]} "
                             "takes them all)")
        d = self.deals[group]
        positions = [d.position(d.taken + k) for k in range(FETCH_AHEAD)]
        self.queues[group].extend(self.source.fetch([rows[p % len(rows)] for p in positions]))

    def peek(self, group: str) -> dict:
        self._fill(group)
        return self.queues[group][0]

    def take(self, group: str) -> dict:
        self._fill(group)
        self.deals[group].taken += 1
        return self.queues[group].popleft()

    def epoch(self, group: str) -> int:
        return self.peek_position(group) // max(len(self.members[group]), 1)

    def holdout_rows(self) -> list[dict]:
        """The reserved validation rows of every group (only those rows are read)."""
        indices = sorted(i for rows in self.held.values() for i in rows)
        return self.source.fetch(indices) if indices else []

    def state_dict(self) -> dict:
        return {"format": SPLIT_FORMAT, "rank": self.rank, "world": self.world,
                "groups": {g: d.to_dict() for g, d in self.deals.items()}}

    def load_state_dict(self, state: dict) -> None:
        """This worker's own saved state (same world size)."""
        self.load_states([state])

    def load_states(self, states: Sequence[dict]) -> None:
        """Resume from the saved states of every old rank (rank order). With the same world size this
        rank's own state is used as it is; otherwise every group is re-split (`resplit_group`)."""
        for s in states:
            if not isinstance(s, dict) or s.get("format") != SPLIT_FORMAT or not isinstance(s.get("groups"), dict):
                raise ValueError(f"data state is not a {SPLIT_FORMAT} state")
        old_world = int(states[0]["world"])
        if old_world == self.world:
            mine = states[0] if len(states) == 1 else states[self.rank]
            if int(mine["world"]) != self.world or int(mine["rank"]) != self.rank:
                raise ValueError(f"data state of rank {mine['rank']} of {mine['world']} given to rank {self.rank} "
                                 f"of {self.world}")
            for g in self.deals:
                d = mine["groups"].get(g)
                self.deals[g] = Deal([], 0, self.world, self.rank, self.block) if d is None else \
                    Deal(list(d["leftover"]), int(d["next"]), self.world, self.rank, int(d["block"]), int(d["taken"]))
        else:
            if len(states) != old_world or sorted(int(s["rank"]) for s in states) != list(range(old_world)):
                raise ValueError(f"re-splitting needs the data states of all {old_world} old ranks, got {len(states)}")
            states = sorted(states, key=lambda s: int(s["rank"]))
            for g in self.deals:
                saved = [s["groups"].get(g) for s in states]
                if any(d is None for d in saved):
                    self.deals[g] = Deal([], 0, self.world, self.rank, self.block)
                    continue
                self.deals[g] = resplit_group(saved, self.world, self.block)[self.rank]
            log.info("data: re-split from %d to %d workers", old_world, self.world)
        self.queues = {g: deque() for g in self.deals}


@dataclass
class PackStats:
    samples: int = 0
    skipped_too_long: int = 0
    attention_pairs: int = 0  # visible (query, key) pairs of the pack, for FLOP counts
    per_group: dict[str, int] = field(default_factory=dict)


class Packer:
    """Builds one pack per step from the group streams (CFG dropout applied while rendering)."""

    def __init__(self, streams: GroupStreams, mixture: MixtureConfig, builder: SequenceBuilder,
                 model_config: LanceConfig, max_tokens: int, max_sample_tokens: int | None = None,
                 seed: int = 0, rank: int = 0) -> None:
        self.streams, self.mixture, self.builder = streams, mixture, builder
        self.config = model_config
        self.max_tokens = max_tokens
        self.max_sample_tokens = min(max_sample_tokens or max_tokens, max_tokens)
        self.seed, self.rank = seed, rank
        self.pending: str | None = None  # group drawn for the previous pack that did not fit
        self.total = PackStats()

    def state_dict(self) -> dict:
        return {"streams": self.streams.state_dict(), "pending": self.pending,
                "skipped_too_long": self.total.skipped_too_long}

    def load_state_dict(self, state: dict) -> None:
        self.load_states([state])

    def load_states(self, states: Sequence[dict]) -> None:
        """Resume from saved packer states: this rank's own (same world size), or those of every old
        rank (rank order), which re-splits the data (`GroupStreams.load_states`)."""
        same = int(states[0]["streams"]["world"]) == self.streams.world
        self.streams.load_states([s["streams"] for s in states])
        if same:
            mine = states[0] if len(states) == 1 else states[self.rank]
            self.pending = mine.get("pending")
            self.total.skipped_too_long = int(mine.get("skipped_too_long", 0))
        else:
            self.pending = states[self.rank].get("pending") if self.rank < len(states) else None
            # a run total: rank 0 carries it on after a re-split
            self.total.skipped_too_long = sum(int(s.get("skipped_too_long", 0)) for s in states) if self.rank == 0 else 0

    def render(self, row: dict, rng: random.Random) -> RenderedSample:
        sample = row_to_sample(row, self.config.vit)
        generation = sample.task not in ("i2t", "v2t")
        drop_caption = generation and rng.random() < self.config.caption_dropout
        drop_condition = generation and sample.source is not None and rng.random() < self.config.condition_dropout
        return self.builder.render(sample, drop_caption=drop_caption, drop_condition=drop_condition, rng=rng)

    def next_pack(self, step: int) -> tuple[PackedBatch, PackStats]:
        """Draw groups i.i.d. by the step's weights and take their next samples until one does not
        fit; that draw becomes the first of the next pack (unless a schedule has brought its group's
        weight to 0), so the taken task frequencies follow the configured weights."""
        rng = step_rng(self.seed, step, self.rank)
        weights = mixture_weights(self.mixture, step)
        names = [k for k, w in weights.items() if w > 0]
        probs = [weights[k] for k in names]
        rendered: list[RenderedSample] = []
        stats = PackStats()
        used = 0
        while True:
            # the draw that did not fit the last pack comes first, unless its group's weight is now 0
            group = self.pending if weights.get(self.pending, 0) > 0 else rng.choices(names, probs)[0]
            self.pending = None
            r = self.render(self.streams.peek(group), random.Random(rng.random()))
            if len(r) > self.max_sample_tokens:
                self.streams.take(group)
                stats.skipped_too_long += 1
                if stats.skipped_too_long > MAX_SKIPS_PER_PACK:
                    raise ValueError(f"task group {group!r}: more than {MAX_SKIPS_PER_PACK} samples in a row exceed "
                                     f"data.max_sample_tokens={self.max_sample_tokens} ({len(r)} tokens)")
                continue
            if used + len(r) > self.max_tokens:
                self.pending = group
                break
            self.streams.take(group)
            rendered.append(r)
            used += len(r)
            stats.samples += 1
            stats.per_group[group] = stats.per_group.get(group, 0) + 1
        stats.attention_pairs = visible_pairs([[(x.mode, len(x)) for x in r.splits] for r in rendered])
        self.total.samples += stats.samples
        self.total.skipped_too_long += stats.skipped_too_long
        return pack_rendered(rendered, self.config), stats


# ---------------------------------------------------------------------------------------- packing ahead
T = TypeVar("T")
_DONE = object()


class Prefetcher(Generic[T]):
    """Runs `produce(step)` for `steps` in order in a background thread, at most `depth` steps
    ahead of the consumer; `get(step)` returns them in the same order. An exception in `produce`
    is raised by the `get` of that step; `close` (or leaving the `with` block) stops the thread."""

    def __init__(self, produce: Callable[[int], T], steps: range, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._produce, self._steps = produce, steps
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._expected: Iterator[int] = iter(steps)
        self._thread = threading.Thread(target=self._run, name="pack-ahead", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        for step in self._steps:
            if self._stop.is_set():
                return
            try:
                item = (step, self._produce(step), None)
            except BaseException as exc:  # handed to the consumer, which raises it
                self._put((step, None, exc))
                return
            if not self._put(item):
                return
        self._put((None, _DONE, None))

    def get(self, step: int) -> T:
        want = next(self._expected, None)
        if want != step:
            raise ValueError(f"prefetcher: asked for step {step}, the next one is {want}")
        got, item, exc = self._queue.get()
        if exc is not None:
            self.close()
            raise exc
        if got != step:
            raise RuntimeError(f"prefetcher: produced step {got} where {step} was expected")
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _StepItems(torch.utils.data.IterableDataset):
    """The iterable a DataLoader worker runs: `(step, produce(step))` for every step, in order. Under
    the `fork` start method the worker inherits `produce` (and the packer it closes over, as the
    training process left it after restoring a checkpoint); nothing is pickled."""

    def __init__(self, produce: Callable[[int], Any], steps: range) -> None:
        self.produce, self.steps = produce, steps

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for step in self.steps:
            yield step, self.produce(step)


class ProcessPrefetcher(Generic[T]):
    """`Prefetcher` with `produce` in a separate process (one `torch.utils.data.DataLoader` worker,
    forked from this one), so that packing's Python never competes with the training thread for
    the interpreter; with `pin_memory` the results' tensors arrive in page-locked memory (faster,
    asynchronous host-to-device copies). `produce` must not touch CUDA (the worker is forked) and its
    results must be picklable; state it changes lives in the worker, so `produce` returns what the
    caller needs (e.g. the packer's state after the step). Same `get` / `close` as `Prefetcher`; an
    exception in `produce` is raised by the `get` of that step."""

    def __init__(self, produce: Callable[[int], T], steps: range, depth: int = 2, pin_memory: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._expected: Iterator[int] = iter(steps)
        # no steps (a stage resumed at its end): no worker to start
        worker = {"num_workers": 1, "prefetch_factor": depth, "multiprocessing_context": "fork"} if len(steps) else {}
        loader = torch.utils.data.DataLoader(_StepItems(produce, steps), batch_size=None, pin_memory=pin_memory,
                                             **worker)
        self._it = iter(loader)

    def get(self, step: int) -> T:
        want = next(self._expected, None)
        if want != step:
            raise ValueError(f"prefetcher: asked for step {step}, the next one is {want}")
        try:
            got, item = next(self._it)
        except StopIteration:
            raise RuntimeError(f"prefetcher: the packing process ended before step {step}") from None
        except BaseException:
            self.close()
            raise
        if got != step:
            raise RuntimeError(f"prefetcher: produced step {got} where {step} was expected")
        return item

    def close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __enter__(self) -> ProcessPrefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


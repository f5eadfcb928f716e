"""From curated rows to packed training batches: task-group mixture, per-group streams, packing.

Each worker reads one row stream, routes rows into per-task-group queues, and packs samples into
sequences of at most `max_tokens` tokens (text + ViT + VAE), drawing a group for every slot by the mixture weights
of the current step. Everything random is derived from (seed, step, rank), and the data state of a
worker (epoch, rows read, rows queued) goes into every checkpoint: a resumed stage continues with
exactly the next unseen samples.
"""
from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from lance_platform.schema import row_to_sample
from lance_model.attention import visible_pairs
from lance_model.config import LanceConfig
from lance_model.packing import PackedBatch, pack_rendered
from lance_model.sequence import RenderedSample, SequenceBuilder

from .config import MixtureConfig

MAX_SKIPS_PER_PACK = 1000


def mixture_weights(mixture: MixtureConfig, step: int) -> dict[str, float]:
    """Normalised group weights at `step` (linear ramp from weight to end_weight over ramp_steps)."""
    frac = 1.0 if mixture.ramp_steps <= 0 else min(max(step / mixture.ramp_steps, 0.0), 1.0)
    raw = {}
    for name, g in mixture.groups.items():
        end = g.weight if g.end_weight is None else g.end_weight
        raw[name] = g.weight + (end - g.weight) * frac
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def step_rng(seed: int, step: int, rank: int, salt: int = 0) -> random.Random:
    return random.Random(((seed * 1_000_003 + step) * 1_009 + rank) * 31 + salt)


class GroupStreams:
    """One ordered row stream per worker, routed into per-task-group queues.

    `open_rows()` yields one epoch of rows in a fixed order. Within each group, the first
    `holdout` rows (one number for every group, or a number per group as the driver's
    `plan_data` chose them) are reserved for validation and the rest are dealt round-robin to the
    workers (this worker keeps the ones with index % world == rank). A single pass feeds every
    group, so a worker runs one Ray Data stream, however many groups the mixture has.

    State (`state_dict`): the epoch, rows read in it, and the rows queued but not yet taken (a few
    rows, stored as they are) - enough to continue with exactly the next unseen samples.
    """

    def __init__(self, open_rows: Callable[[], Iterable[dict]], groups: dict[str, tuple[str, ...]],
                 rank: int = 0, world: int = 1, holdout: int | dict[str, int] = 0) -> None:
        self.open_rows, self.rank, self.world = open_rows, rank, world
        self.group_of = {task: g for g, tasks in groups.items() for task in tasks}
        self.queues: dict[str, deque] = {g: deque() for g in groups}
        self.holdout = {g: int(holdout.get(g, 0) if isinstance(holdout, dict) else holdout) for g in groups}
        self.epoch, self.read = 0, 0
        self._it: Iterator[dict] | None = None
        self._seen: dict[str, int] = {}

    def _start_epoch(self, skip: int = 0) -> None:
        self._it = iter(self.open_rows())
        self._seen = {g: 0 for g in self.queues}
        self.read = 0
        for _ in range(skip):
            self._route(next(self._it), enqueue=False)

    def _route(self, row: dict, enqueue: bool = True) -> None:
        self.read += 1
        group = self.group_of.get(row.get("task"))
        if group is None:
            return
        j, held = self._seen[group], self.holdout[group]
        self._seen[group] = j + 1
        if enqueue and j >= held and (j - held) % self.world == self.rank:
            self.queues[group].append(row)

    def _fill(self, group: str) -> None:
        empty_epochs = 0
        while not self.queues[group]:
            if self._it is None:
                self._start_epoch()
            try:
                self._route(next(self._it))
            except StopIteration:
                self._it = None
                self.epoch += 1
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ValueError(f"task group {group!r} has no rows for worker {self.rank} (too few samples "
                                     f"for {self.world} workers and a hold-out of {self.holdout[group]})") from None

    def peek(self, group: str) -> dict:
        self._fill(group)
        return self.queues[group][0]

    def take(self, group: str) -> dict:
        self._fill(group)
        return self.queues[group].popleft()

    def holdout_rows(self) -> list[dict]:
        """The reserved validation rows of every group (one extra pass over the epoch prefix)."""
        need = dict(self.holdout)
        if not any(need.values()):
            return []
        out = []
        for row in self.open_rows():
            g = self.group_of.get(row.get("task"))
            if g is not None and need[g] > 0:
                out.append(row)
                need[g] -= 1
                if not any(need.values()):
                    break
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "read": self.read if self._it is not None else 0,
                "queues": {g: list(q) for g, q in self.queues.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.queues = {g: deque(state["queues"].get(g, [])) for g in self.queues}
        self._it = None
        if state["read"]:
            self._start_epoch(skip=int(state["read"]))


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
        self.streams.load_state_dict(state["streams"])
        self.pending = state.get("pending")
        self.total.skipped_too_long = int(state.get("skipped_too_long", 0))

    def render(self, row: dict, rng: random.Random) -> RenderedSample:
        sample = row_to_sample(row)
        generation = sample.task not in ("i2t", "v2t")
        drop_caption = generation and rng.random() < self.config.caption_dropout
        drop_condition = generation and sample.source is not None and rng.random() < self.config.condition_dropout
        return self.builder.render(sample, drop_caption=drop_caption, drop_condition=drop_condition, rng=rng)

    def next_pack(self, step: int) -> tuple[PackedBatch, PackStats]:
        """Draw groups i.i.d. by the step's weights and take their next samples until one does not
        fit; that draw becomes the first of the next pack, so every draw is eventually taken and the
        taken task frequencies follow the configured weights."""
        rng = step_rng(self.seed, step, self.rank)
        weights = mixture_weights(self.mixture, step)
        names = [k for k, w in weights.items() if w > 0]
        probs = [weights[k] for k in names]
        rendered: list[RenderedSample] = []
        stats = PackStats()
        used = 0
        while True:
            group = self.pending if self.pending in weights else rng.choices(names, probs)[0]
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

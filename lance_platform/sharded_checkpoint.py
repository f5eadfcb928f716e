"""Sharded, asynchronous training-state checkpoints: every rank writes only its own shards, while
training goes on, and a restore reads only the rows each rank needs, on any number of ranks.

A sharded checkpoint is a `lance_platform.checkpoint` directory (the same manifests, `verify` and
`latest_valid`) whose manifest says `"layout": "sharded"`:

- `<group>.rank<R>.safetensors` (groups `model`, `ema`, `optim`): the rows [start, stop) along dim
  0 of every tensor rank R holds (FSDP2 shards rows; a replicated tensor is written by one rank);
- `index.rank<R>.json`: for every tensor of rank R's files, its global shape, dtype and the rows
  the file holds; the indexes of all ranks together must cover every row of every tensor;
- JSON files the caller adds (rank 0: `trainer_state.json`, `lance_config.json`, `llm_config.json`;
  every rank its data position);
- `manifest.rank<R>.json` per rank R > 0 (its files, sizes, sha256), then `manifest.json`, which
  rank 0 writes once every rank's manifest of the same save (`token`) is there.

Writing (`AsyncCheckpointWriter.save`): the local shards are copied to host memory (pinned when
they are on a GPU) in the caller's thread, then a background thread writes them into
`step-<N>.tmp`; rank 0 waits for the other ranks' manifests, writes the main manifest and renames
the directory to `step-<N>`. A checkpoint is thus visible only when complete (`*.tmp` is never a
candidate), and the next save waits for the previous one. The ranks coordinate through the shared
filesystem only: no collective runs in the background thread.

Reading (`ShardedCheckpoint`): indexes and safetensors headers only, then `rows(group, name, a, b)`
assembles rows [a, b) of a tensor from the files that hold them (plain reads of those bytes).
Loading is strict (`check`: missing or unexpected keys and wrong shapes name the key and the
index file). `export` streams a sharded checkpoint, tensor by tensor on the CPU, into the full
layout (`model.safetensors` + `ema.safetensors` in the official key layout, and in our layout the
name-keyed optimizer state and `trainer_state.json` too). Nothing is unpickled anywhere.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lance_model.checkpoint import (
    EMBED_KEY,
    LM_HEAD_KEY,
    POS_EMBED_KEY,
    CheckpointError,
    SlicedReader,
    TensorRef,
    index_safetensors,
    official_llm_config,
)
from lance_model.config import OFFICIAL_LLM_CONFIG_FILE, LanceConfig

from . import checkpoint as ckpt

log = logging.getLogger(__name__)

LAYOUT = "sharded"
INDEX_FORMAT = "lance-sharded-index/1"
GROUPS = ("model", "ema", "optim")
COMMIT_TIMEOUT_S = 1800.0  # how long rank 0 waits for the other ranks' files of one save
_POLL_S = 0.05
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def shard_file(group: str, rank: int) -> str:
    return f"{group}.rank{rank}.safetensors"


def index_file(rank: int) -> str:
    return f"index.rank{rank}.json"


def step_name(step: int) -> str:
    """The directory name of the checkpoint taken after `step` optimizer steps (sorts by age)."""
    return f"step-{step:06d}"


@dataclass(frozen=True)
class Piece:
    """What one rank saves of one tensor: rows [start, start + len) of a tensor of global `shape`
    (a 0-dim tensor is whole)."""

    name: str
    tensor: torch.Tensor
    start: int
    shape: tuple[int, ...]

    @property
    def stop(self) -> int:
        return self.start + (self.tensor.shape[0] if self.tensor.dim() else 0)


# ---------------------------------------------------------------------------------------- writing
class AsyncCheckpointWriter:
    """Writes this rank's share of sharded checkpoints under `root`, one at a time, in a background
    thread. `before_write(tmp_dir)` runs in that thread before anything is written (a test slows
    the writer with it); `keep` newest complete checkpoints are kept (rank 0 removes older ones);
    `attempt` names this run attempt, the same on every rank (see `save`)."""

    def __init__(self, root: str | Path, rank: int = 0, world: int = 1, keep: int = 2,
                 commit_timeout_s: float = COMMIT_TIMEOUT_S,
                 before_write: Callable[[Path], None] | None = None, attempt: str = "") -> None:
        if not 0 <= rank < world or keep < 1:
            raise ValueError(f"checkpoint writer: bad rank {rank} of {world} or keep={keep}")
        self.root = Path(root)
        self.rank, self.world, self.keep = rank, world, keep
        self.commit_timeout_s = commit_timeout_s
        self.before_write = before_write
        self.attempt = attempt
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self.last_written: Path | None = None

    def save(self, step: int, tensors: Mapping[str, Iterable[Piece]], json_files: Mapping[str, Any] | None = None,
             token: str | None = None) -> Path:
        """Start writing checkpoint `step-<step>`; returns its final path (not there until complete).
        Waits for the previous save first; the tensors are copied before this returns, so the caller
        may change them right after. `token` (default: `<attempt>/<step>`) must be the same on every
        rank of one save and differ between attempts of a run, so that files an interrupted attempt
        left are never taken for this one's: every rank's writer gets the same `attempt`."""
        self.wait()
        token = f"{self.attempt}/{step}" if token is None else token
        if step < 0:
            raise ValueError(f"checkpoint step {step} < 0")
        snapshot: dict[str, list[Piece]] = {}
        on_gpu = False
        for group, pieces in tensors.items():
            if group not in GROUPS:
                raise ValueError(f"checkpoint tensor group {group!r}: expected one of {GROUPS}")
            seen: set[str] = set()
            out = snapshot[group] = []
            for p in pieces:
                _check_piece(group, p, seen)
                on_gpu |= p.tensor.device.type == "cuda"
                out.append(Piece(p.name, self._host_copy(group, p), p.start, tuple(p.shape)))
        if on_gpu:
            torch.cuda.synchronize()  # the copies are complete before the step changes the tensors
        target = self.root / step_name(step)
        files = {name: value for name, value in (json_files or {}).items()}
        for name in files:
            if not ckpt._safe_relative(name) or "/" in name or not name.endswith(".json"):
                raise ValueError(f"checkpoint JSON file name {name!r}: a plain *.json name")
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(target, step, snapshot, files, token),
                                        name=f"checkpoint-writer-{step_name(step)}", daemon=True)
        self._thread.start()
        return target

    def _host_copy(self, group: str, p: Piece) -> torch.Tensor:
        src = p.tensor.detach()
        buf = self._buffers.get((group, p.name))
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            pin = src.device.type == "cuda"
            buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
            self._buffers[(group, p.name)] = buf
        buf.copy_(src, non_blocking=src.device.type == "cuda")
        return buf

    def host_bytes(self) -> int:
        """Bytes of the host buffers the saves copy into (kept and reused from one save to the next)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> Path | None:
        """Block until the save in flight is written (rank 0: committed); its error is raised here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint under {self.root} failed: {error}") from error
        return self.last_written

    def close(self) -> None:
        """Wait for the save in flight; a failure is logged (the caller is already unwinding)."""
        try:
            self.wait()
        except CheckpointError as exc:
            log.error("%s", exc)

    def _run(self, target: Path, step: int, snapshot: dict[str, list[Piece]], json_files: dict[str, Any],
             token: str) -> None:
        try:
            t0 = time.perf_counter()
            self._write(target, step, snapshot, json_files, token)
            self.last_written = target
            log.info("rank %d wrote its part of %s in %.2f s", self.rank, target.name, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 (re-raised by wait() in the training thread)
            self._error = exc

    def _write(self, target: Path, step: int, snapshot: dict[str, list[Piece]], json_files: dict[str, Any],
               token: str) -> None:
        from safetensors.torch import save_file

        tmp = target.with_name(target.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        if self.before_write is not None:
            self.before_write(tmp)
        names: list[str] = []
        index: dict[str, Any] = {"format": INDEX_FORMAT, "rank": self.rank, "world": self.world, "step": step,
                                 "token": token, "groups": {}}
        for group, pieces in snapshot.items():
            if not pieces:
                continue
            name = shard_file(group, self.rank)
            save_file({p.name: p.tensor for p in pieces}, str(tmp / (name + ".tmp")),
                      metadata={"format": INDEX_FORMAT, "group": group, "rank": str(self.rank)})
            (tmp / (name + ".tmp")).replace(tmp / name)
            names.append(name)
            index["groups"][group] = {
                "file": name,
                "tensors": {p.name: {"shape": list(p.shape), "dtype": _DTYPE_NAMES[p.tensor.dtype],
                                     "rows": [p.start, p.stop]} for p in pieces}}
        for name, value in json_files.items():
            ckpt._write_json(tmp / name, value)
            names.append(name)
        ckpt._write_json(tmp / index_file(self.rank), index)
        names.append(index_file(self.rank))
        files = {n: ckpt._describe(tmp / n) for n in names}
        manifest: dict[str, Any] = {"format": ckpt.FORMAT, "step": step, "part": self.rank, "files": files,
                                    "token": token}
        if self.rank != 0:
            ckpt._write_json(tmp / ckpt.part_manifest(self.rank), manifest)
            return
        parts = [ckpt.part_manifest(r) for r in range(1, self.world)]
        listed = set(files) | set(parts) | {ckpt.MANIFEST}
        for part in parts:
            listed |= set(self._await_part(tmp, part, token)["files"])
        for stray in tmp.iterdir():  # left by an interrupted attempt at the same step
            if stray.name not in listed:
                shutil.rmtree(stray) if stray.is_dir() else stray.unlink()
        manifest.update(parts=parts, layout=LAYOUT, world=self.world)
        ckpt._write_json(tmp / ckpt.MANIFEST, manifest)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        self._prune(target)

    def _await_part(self, tmp: Path, part: str, token: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.commit_timeout_s
        path = tmp / part
        while True:
            if path.is_file():
                try:
                    found = json.loads(path.read_text())
                except (OSError, ValueError):
                    found = None
                if isinstance(found, dict) and found.get("token") == token and isinstance(found.get("files"), dict):
                    return found
            if time.monotonic() > deadline:
                raise CheckpointError(f"{path}: not written within {self.commit_timeout_s:.0f} s; the checkpoint "
                                      "stays incomplete (a rank failed or is stuck)")
            time.sleep(_POLL_S)

    def _prune(self, newest: Path) -> None:
        done = sorted(d for d in self.root.glob("step-*") if d.is_dir() and not d.name.endswith(".tmp"))
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
            log.debug("removed old checkpoint %s", old)
        for stale in self.root.glob("step-*.tmp"):  # interrupted saves of earlier steps
            if stale.name < newest.name:
                shutil.rmtree(stale, ignore_errors=True)


def _check_piece(group: str, p: Piece, seen: set[str]) -> None:
    if p.name in seen:
        raise ValueError(f"checkpoint group {group}: tensor {p.name!r} given twice")
    seen.add(p.name)
    t, shape = p.tensor, tuple(p.shape)
    if t.dtype not in _DTYPE_NAMES:
        raise ValueError(f"{group}/{p.name}: dtype {t.dtype} cannot be stored")
    if t.dim() != len(shape) or (shape and (tuple(t.shape[1:]) != shape[1:] or not 0 <= p.start <= p.stop <= shape[0])):
        raise ValueError(f"{group}/{p.name}: block {tuple(t.shape)} at row {p.start} does not fit the tensor {shape}")


# ---------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class _Block:
    file: Path
    index: Path
    start: int
    stop: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class ShardedCheckpoint:
    """The tensors of a sharded checkpoint, read by rows. `InvalidCheckpointError` naming the file
    for anything but what `AsyncCheckpointWriter` writes (indexes that do not parse or do not cover
    every row, shard files whose headers disagree with the index, truncated files)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.manifest = read_layout(self.directory)
        world = self.manifest.get("world")
        if not isinstance(world, int) or world < 1:
            raise ckpt.InvalidCheckpointError(self.directory / ckpt.MANIFEST, "sharded manifest needs 'world' (int)")
        self.world = world
        self.blocks: dict[str, dict[str, list[_Block]]] = {g: {} for g in GROUPS}
        for rank in range(world):
            self._read_index(rank)
        self._refs: dict[Path, dict[str, TensorRef]] = {}
        self._reader = SlicedReader()

    def _read_index(self, rank: int) -> None:
        path = self.directory / index_file(rank)
        index = ckpt._read_json(path)
        if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or index.get("rank") != rank \
                or not isinstance(index.get("groups"), dict):
            raise ckpt.InvalidCheckpointError(path, f"not a {INDEX_FORMAT} index of rank {rank}")
        for group, entry in index["groups"].items():
            if group not in GROUPS or not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict) \
                    or entry.get("file") != shard_file(group, rank):
                raise ckpt.InvalidCheckpointError(path, f"bad entry for tensor group {group!r}")
            for name, info in entry["tensors"].items():
                try:
                    shape = tuple(int(d) for d in info["shape"])
                    start, stop = (int(r) for r in info["rows"])
                    dtype = _DTYPES[info["dtype"]]
                except (KeyError, TypeError, ValueError) as exc:
                    raise ckpt.InvalidCheckpointError(path, f"bad index entry {group}/{name!r} ({exc!r})") from exc
                if shape and not 0 <= start <= stop <= shape[0]:
                    raise ckpt.InvalidCheckpointError(path, f"{group}/{name}: rows {start}:{stop} outside {shape}")
                self.blocks[group].setdefault(name, []).append(
                    _Block(self.directory / entry["file"], path, start, stop, shape, dtype))

    # -- what is there
    def names(self, group: str) -> dict[str, tuple[int, ...]]:
        return {n: b[0].shape for n, b in self.blocks[group].items()}

    def has(self, group: str) -> bool:
        return bool(self.blocks[group])

    def check(self, group: str, expected: Mapping[str, tuple[int, ...]]) -> None:
        """Strict: the group holds exactly the `expected` tensors with those global shapes."""
        problems = ckpt.key_problems(expected, self.names(group))
        if problems:
            files = ", ".join(index_file(r) for r in range(self.world))
            raise CheckpointError(f"{self.directory} ({group} tensors of {files}) does not fit: " + "; ".join(problems))

    def validate(self) -> None:
        """Every tensor's blocks agree on shape and dtype and cover all its rows, and every shard
        file's header holds what its index says (`InvalidCheckpointError` naming the file)."""
        for group, tensors in self.blocks.items():
            for name, blocks in tensors.items():
                first = blocks[0]
                for b in blocks:
                    if b.shape != first.shape or b.dtype != first.dtype:
                        raise ckpt.InvalidCheckpointError(b.index, f"{group}/{name}: {b.shape} {b.dtype}, another "
                                                                   f"index says {first.shape} {first.dtype}")
                    ref = self._ref(b, name)
                    want = (b.stop - b.start, *b.shape[1:]) if b.shape else ()
                    if tuple(ref.shape) != want or ref.dtype != b.dtype:
                        raise ckpt.InvalidCheckpointError(b.file, f"{name}: {ref.shape} {ref.dtype}, the index says "
                                                                  f"{want} {b.dtype}")
                if first.shape:
                    covered = 0
                    for b in sorted(blocks, key=lambda b: b.start):
                        if b.start > covered:
                            break
                        covered = max(covered, b.stop)
                    if covered < first.shape[0]:
                        raise ckpt.InvalidCheckpointError(
                            self.directory / index_file(0), f"{group}/{name}: rows from {covered} of {first.shape[0]} "
                                                            f"are in no rank's file")

    def _ref(self, block: _Block, name: str) -> TensorRef:
        if block.file not in self._refs:
            try:
                self._refs[block.file] = index_safetensors(block.file)
            except (CheckpointError, FileNotFoundError) as exc:
                raise ckpt.InvalidCheckpointError(block.file, str(exc)) from exc
        refs = self._refs[block.file]
        if name not in refs:
            raise ckpt.InvalidCheckpointError(block.file, f"holds no tensor {name!r} (its index lists it)")
        return refs[name]

    # -- reading
    def rows(self, group: str, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor (all of it by default; a 0-dim tensor whole), read from
        the files that hold them."""
        blocks = self.blocks[group].get(name)
        if not blocks:
            raise CheckpointError(f"{self.directory}: no {group} tensor {name!r}")
        shape, dtype = blocks[0].shape, blocks[0].dtype
        if not shape:
            return self._reader.rows(self._ref(blocks[0], name))
        start = 0 if start is None else start
        stop = shape[0] if stop is None else stop
        out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        pos = start  # rows [start, pos) are read; replicas of rows already read are skipped
        for b in sorted(blocks, key=lambda b: b.start):
            lo, hi = max(pos, b.start), min(stop, b.stop)
            if lo >= hi:
                continue
            if lo > pos:
                break
            chunk = self._reader.rows(self._ref(b, name), lo - b.start, hi - b.start)
            if lo == start and hi == stop:
                return chunk
            out[lo - start:hi - start] = chunk
            pos = hi
        if pos < stop:
            raise ckpt.InvalidCheckpointError(blocks[0].index, f"{group}/{name}: rows {pos}:{stop} are in no rank's file")
        return out

    def read_json(self, name: str) -> Any:
        return ckpt._read_json(self.directory / name)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> ShardedCheckpoint:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_layout(directory: Path) -> dict[str, Any]:
    """The main manifest of a sharded checkpoint (`InvalidCheckpointError` otherwise)."""
    manifest = ckpt._read_manifest(Path(directory) / ckpt.MANIFEST)
    if manifest.get("layout") != LAYOUT:
        raise ckpt.InvalidCheckpointError(Path(directory) / ckpt.MANIFEST,
                                          f"not a sharded checkpoint (layout {manifest.get('layout', 'full')!r})")
    return manifest


def is_sharded(directory: str | Path) -> bool:
    path = Path(directory) / ckpt.MANIFEST
    try:
        return isinstance(m := json.loads(path.read_text()), dict) and m.get("layout") == LAYOUT
    except (OSError, ValueError):
        return False


def validate(directory: str | Path) -> None:
    """The structure of a (verified) sharded checkpoint: see `ShardedCheckpoint.validate`."""
    with ShardedCheckpoint(directory) as sc:
        sc.validate()


def latest_valid(root: str | Path, pattern: str = "step-*",
                 check: Callable[[Path], None] | None = None) -> tuple[Path | None, list[ckpt.Skipped]]:
    """`checkpoint.latest_valid` that also validates a sharded checkpoint's indexes and shard
    headers, then runs `check(directory)` (e.g. that it holds every key the model has)."""
    def sharded_check(directory: Path) -> None:
        if is_sharded(directory):
            validate(directory)
        if check is not None:
            try:
                check(directory)
            except ckpt.InvalidCheckpointError:
                raise
            except CheckpointError as exc:
                raise ckpt.InvalidCheckpointError(directory, str(exc)) from exc

    return ckpt.latest_valid(root, pattern, check=sharded_check)


# ---------------------------------------------------------------------------------------- export
def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                      value: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written tensor by tensor: the header first (from `entries`), then each
    tensor's bytes as `value(key)` gives it, so only one tensor is in memory at a time. Atomic."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, shape, dtype in entries:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in entries:
            t = value(key)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise CheckpointError(f"{path.name}: {key} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())  # no bytes copy
    tmp.replace(path)


EXPORT_LAYOUTS = ("lance", "official")


def export(source: str | Path, target: str | Path, layout: str = "lance") -> Path:
    """Write the full checkpoint of a sharded one, streaming tensor by tensor on the CPU.

    `official`: `model.safetensors` (+ `ema.safetensors`), `lance_config.json`, `llm_config.json`,
    the official key layout (`Lance.from_pretrained` and the official code load it). `lance`: the
    same plus the name-keyed optimizer state and `trainer_state.json`, with a manifest: a full
    `lance_platform.checkpoint` directory (a later stage or GRPO starts from it, resumes with its
    optimizer). The source is verified first; `target` is replaced atomically."""
    source, target = Path(source), Path(target)
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"export layout {layout!r}: expected one of {EXPORT_LAYOUTS}")
    if not source.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {source}")
    if not (source / ckpt.MANIFEST).is_file():
        raise ckpt.InvalidCheckpointError(source, "no manifest.json: not a training checkpoint, or not completely "
                                                  "written")
    read_layout(source)
    manifest = ckpt.verify(source)
    state = ckpt.read_trainer_state(source)
    config = LanceConfig.from_pretrained(source)
    with ShardedCheckpoint(source) as sc:
        sc.validate()
        if not sc.has("model"):
            raise ckpt.InvalidCheckpointError(source / index_file(0), "the checkpoint holds no model tensors")

        def write_files(directory: Path) -> None:
            _write_model_files(sc, config, directory)
            if layout == "lance":
                _write_optimizer(sc, state, directory)

        if layout == "lance":
            rest = {k: v for k, v in state.items() if k not in ("format", "step", "optimizer")}
            out = ckpt.save(target, int(state.get("step", manifest["step"])), trainer_state=rest,
                            write_extra=write_files)
        else:
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_files(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
            out = target
    log.info("exported %s to %s (%s layout)", source, out, layout)
    return out


def _write_model_files(sc: ShardedCheckpoint, config: LanceConfig, directory: Path) -> None:
    model = sc.names("model")
    model.pop(POS_EMBED_KEY, None)  # a fixed table, never stored
    tied = config.text.tie_word_embeddings and EMBED_KEY in model and LM_HEAD_KEY not in model
    keys = sorted(model) + ([LM_HEAD_KEY] if tied else [])

    def source(key: str) -> str:
        return EMBED_KEY if tied and key == LM_HEAD_KEY else key

    dtypes = {k: sc.blocks["model"][k][0].dtype for k in model}
    entries = [(k, model[source(k)], dtypes[source(k)]) for k in keys]
    meta = {"format": "pt", "layout": "lance-official"}
    write_safetensors(directory / ckpt.MODEL_FILE, entries, lambda k: sc.rows("model", source(k)), meta)
    if sc.has("ema"):
        ema = sc.names("ema")

        def ema_value(k: str) -> torch.Tensor:  # EMA of the trainable tensors, the weights of the frozen ones
            k = source(k)
            t = sc.rows("ema", k) if k in ema else sc.rows("model", k)
            return t.to(dtypes[k])

        write_safetensors(directory / ckpt.EMA_FILE, entries, ema_value, meta)
    config.save(directory)
    ckpt._write_json(directory / OFFICIAL_LLM_CONFIG_FILE, official_llm_config(config))


def _write_optimizer(sc: ShardedCheckpoint, state: dict[str, Any], directory: Path) -> None:
    opt = state.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list):
        raise ckpt.InvalidCheckpointError(sc.directory / ckpt.TRAINER_STATE, "no 'optimizer' param groups")
    names = sc.names("optim")
    keys = sorted(names)
    entries = [(k, names[k], sc.blocks["optim"][k][0].dtype) for k in keys]
    write_safetensors(directory / ckpt.OPTIMIZER_TENSORS, entries, lambda k: sc.rows("optim", k),
                      {"format": ckpt.OPTIMIZER_FORMAT})
    ckpt._write_json(directory / ckpt.OPTIMIZER_JSON, {"format": ckpt.OPTIMIZER_FORMAT,
                                                       "param_groups": opt["param_groups"],
                                                       "state": opt.get("values", {})})

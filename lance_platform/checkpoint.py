"""One training-state checkpoint format for every stage that trains (PT/CT/SFT on Ray Train, GRPO).

A checkpoint is a directory:

- `model.safetensors` (+ optional `ema.safetensors`), `lance_config.json`, `llm_config.json`: the
  model in the official key layout (`lance_model.checkpoint.save_state`), so `Lance.from_pretrained`
  loads the directory as it is;
- `optimizer.safetensors` + `optimizer.json`: the optimizer state keyed by parameter *name*, so it
  maps onto any trainer of the same model: every tensor (`exp_avg`, `step`, ...) in the safetensors
  file under `<parameter name>/<state key>`, the rest (param groups with their hyper-parameters and
  parameter names, non-tensor state values) as JSON;
- `trainer_state.json`: `step` (optimizer iterations done) and whatever JSON the trainer adds
  (scheduler state, data position);
- files a caller adds through `write_extra` (a training worker's queued rows);
- `manifest.json`, written last, after the temporary directory was renamed into place: every file
  with its size and sha256. Other processes writing into the same directory (the other ranks of a
  training stage) add their own `manifest.rank<N>.json`; the main manifest lists those it expects.

Nothing is unpickled: tensors come from safetensors files, everything else from JSON, so a
tampered file fails to parse instead of running code. `verify` checks a directory against its
manifest(s) (present, sizes, safetensors headers, checksums) and raises `InvalidCheckpointError`
naming the bad file; `latest_valid` picks the newest checkpoint under a root that verifies and
names each one it skipped. Loading is strict: missing or unexpected keys and wrong shapes raise a
`CheckpointError` naming them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lance_model.checkpoint import (
    LM_HEAD_KEY,
    POS_EMBED_KEY,
    CheckpointError,
    read_tensors,
    save_state,
)
from lance_model.config import LanceConfig

log = logging.getLogger(__name__)

FORMAT = "lance-checkpoint/1"
OPTIMIZER_FORMAT = "lance-optimizer/1"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
WRAPPER_PREFIX = "_checkpoint_wrapped_module."  # activation checkpointing's wrapper module
_PART_MANIFEST = re.compile(r"^manifest\.rank[1-9]\d*\.json$")
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


class InvalidCheckpointError(CheckpointError):
    """A checkpoint directory is incomplete or damaged; `path` is the bad file (or the directory)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class Skipped:
    """A checkpoint `latest_valid` passed over, and why."""

    path: Path
    reason: str


def plain_name(key: str) -> str:
    """A parameter/state key without activation checkpointing's wrapper prefix."""
    return key.replace(WRAPPER_PREFIX, "")


def part_manifest(part: int) -> str:
    return MANIFEST if part == 0 else f"manifest.rank{part}.json"


# ---------------------------------------------------------------------------------------- writing
def save(directory: str | Path, step: int, *, config: LanceConfig | None = None,
         model_state: Mapping[str, torch.Tensor] | None = None,
         ema_state: Mapping[str, torch.Tensor] | None = None,
         optimizer_state: Mapping[str, Any] | None = None,
         trainer_state: Mapping[str, Any] | None = None,
         write_extra: Callable[[Path], None] | None = None,
         part: int = 0, parts: int = 1) -> Path:
    """Write one checkpoint (or, for `part > 0`, one rank's share of it) to `directory`.

    Everything is written under `<directory>.tmp`, renamed into place, and the manifest is written
    last, so a directory with a manifest is complete. `model_state`/`ema_state` are full
    (unsharded) state dicts of a model with `config`; `optimizer_state` is name-keyed
    (`optimizer_state_by_name`, or torch's `get_optimizer_state_dict(..., full_state_dict=True)`);
    `trainer_state` must be JSON-able. Part 0 writes `trainer_state.json` and the main manifest,
    which expects the manifests of parts 1..parts-1.
    """
    directory = Path(directory)
    if step < 0 or not 0 <= part < max(parts, 1):
        raise ValueError(f"checkpoint {directory}: bad step {step} or part {part} of {parts}")
    if (model_state is not None or ema_state is not None) and config is None:
        raise ValueError(f"checkpoint {directory}: a model state needs its LanceConfig")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if model_state is not None:
        save_state(config, dict(model_state), tmp, MODEL_FILE)
    if ema_state is not None:
        save_state(config, dict(ema_state), tmp, EMA_FILE)
    if optimizer_state is not None:
        write_optimizer_state(tmp, optimizer_state)
    if part == 0:
        _write_json(tmp / TRAINER_STATE, {**(trainer_state or {}), "format": FORMAT, "step": int(step)})
    if write_extra is not None:
        write_extra(tmp)
    files = {p.relative_to(tmp).as_posix(): _describe(p) for p in sorted(tmp.rglob("*"))
             if p.is_file() and not p.name.endswith(".tmp")}
    if directory.exists():  # an earlier, interrupted write of the same checkpoint
        shutil.rmtree(directory)
    tmp.rename(directory)
    manifest: dict[str, Any] = {"format": FORMAT, "step": int(step), "part": part, "files": files}
    if part == 0:
        manifest["parts"] = [part_manifest(r) for r in range(1, parts)]
    _write_json(directory / part_manifest(part), manifest)
    log.debug("wrote checkpoint %s (step %d, part %d, %d files)", directory, step, part, len(files))
    return directory


def copy_checkpoint(source: str | Path, target: str | Path, files: Iterable[str]) -> Path:
    """A new, verified checkpoint at `target` holding `files` of the verified `source` (e.g. the
    model and optimizer of a stage's last checkpoint, without its data position)."""
    source, target = Path(source), Path(target)
    manifest = verify(source)
    listed = _all_files(source, manifest)
    chosen = [f for f in files if f in listed]
    if MODEL_FILE not in chosen:
        raise InvalidCheckpointError(source / MODEL_FILE, "the checkpoint has no model file to export")

    def copy(tmp: Path) -> None:
        for name in chosen:
            if name != TRAINER_STATE:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, tmp / name)

    trainer_state = read_trainer_state(source) if TRAINER_STATE in chosen else {}
    trainer_state.pop("format", None)
    return save(target, int(trainer_state.pop("step", manifest["step"])), trainer_state=trainer_state,
                write_extra=copy)


def _describe(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        text = json.dumps(value, indent=1, allow_nan=True)
    except TypeError as exc:
        raise CheckpointError(f"{path.name}: state is not JSON-able ({exc})") from exc
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------- verifying
def verify(directory: str | Path, checksums: bool = True) -> dict[str, Any]:
    """The main manifest of a complete, undamaged checkpoint; `InvalidCheckpointError` naming the
    first bad file otherwise (no manifest, a file missing, of the wrong size, a safetensors file
    whose header does not parse or does not cover the file, a checksum mismatch)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidCheckpointError(directory, "not a checkpoint directory")
    manifest = _read_manifest(directory / MANIFEST)
    for part in [MANIFEST, *manifest["parts"]]:
        entries = manifest if part == MANIFEST else _read_manifest(directory / part)
        for name, entry in entries["files"].items():
            _check_file(directory / name, entry, checksums)
    return manifest


def _all_files(directory: Path, manifest: dict[str, Any]) -> set[str]:
    names = set(manifest["files"])
    for part in manifest["parts"]:
        names |= set(_read_manifest(directory / part)["files"])
    return names


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidCheckpointError(path, "manifest missing: the checkpoint was not completely written")
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InvalidCheckpointError(path, f"not a {FORMAT} manifest")
    files, parts = manifest.get("files"), manifest.get("parts", [])
    if not isinstance(files, dict) or not isinstance(parts, list) or not isinstance(manifest.get("step"), int):
        raise InvalidCheckpointError(path, "manifest needs 'step' (int), 'files' (object) and 'parts' (list)")
    for name, entry in files.items():
        if not _safe_relative(name) or not isinstance(entry, dict) or not isinstance(entry.get("size"), int) \
                or not isinstance(entry.get("sha256"), str):
            raise InvalidCheckpointError(path, f"bad manifest entry {name!r}: {entry!r}")
    for part in parts:
        if not isinstance(part, str) or not _PART_MANIFEST.match(part):
            raise InvalidCheckpointError(path, f"bad part manifest name {part!r}")
    return manifest


def _safe_relative(name: Any) -> bool:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    return all(p not in ("", ".", "..") for p in name.split("/"))


def _check_file(path: Path, entry: dict[str, Any], checksums: bool) -> None:
    if not path.is_file():
        raise InvalidCheckpointError(path, "file listed in the manifest is missing")
    size = path.stat().st_size
    if size != entry["size"]:
        raise InvalidCheckpointError(path, f"size {size} bytes, the manifest says {entry['size']} (truncated?)")
    if path.suffix == ".safetensors":
        check_safetensors_header(path)
    if checksums:
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != entry["sha256"]:
            raise InvalidCheckpointError(path, "sha256 differs from the manifest (file damaged or altered)")


def check_safetensors_header(path: Path) -> None:
    """The header parses and its tensors exactly cover the rest of the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InvalidCheckpointError(path, f"safetensors file of {size} bytes has no header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise InvalidCheckpointError(path, f"safetensors header of {n} bytes does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidCheckpointError(path, f"safetensors header does not parse ({exc})") from exc
    if not isinstance(header, dict):
        raise InvalidCheckpointError(path, "safetensors header is not an object")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise InvalidCheckpointError(path, f"safetensors header entry {key!r} has no data_offsets")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise InvalidCheckpointError(path, f"safetensors data ends at byte {8 + n + end}, the file has {size}")


def latest_valid(root: str | Path, pattern: str = "*", check: Callable[[Path], None] | None = None
                 ) -> tuple[Path | None, list[Skipped]]:
    """(newest checkpoint directory under `root` matching `pattern` that verifies, the newer ones
    skipped). Names sort by age (`step-000012`, Ray's `checkpoint_<time>`); `*.tmp` directories are
    writes in progress and not candidates. `check(directory)` may reject a verified one by raising
    `InvalidCheckpointError` (a sharded checkpoint's indexes, the keys a model needs). Each skipped
    one is logged as a warning with its reason."""
    root = Path(root)
    if not root.is_dir():
        return None, []
    candidates = sorted((d for d in root.glob(pattern) if d.is_dir() and not d.name.endswith(".tmp")),
                        key=lambda d: d.name, reverse=True)
    skipped: list[Skipped] = []
    for d in candidates:
        try:
            verify(d)
            if check is not None:
                check(d)
        except InvalidCheckpointError as exc:
            log.warning("checkpoint %s is not usable, falling back to an older one: %s", d.name, exc)
            skipped.append(Skipped(d, str(exc)))
            continue
        return d, skipped
    return None, skipped


def fallback_note(chosen: Path | None, skipped: list[Skipped]) -> str:
    """One line for the `resume_fallback` MLflow tag: what was skipped and what was used."""
    used = f"resumed from {chosen.name}" if chosen is not None else "no valid checkpoint: started from the initial weights"
    return "; ".join([*(f"skipped {s.path.name}: {s.reason}" for s in skipped), used])[:4900]


# ---------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InvalidCheckpointError(path, "file missing") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCheckpointError(path, f"not valid JSON ({exc})") from exc


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / TRAINER_STATE
    state = _read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise InvalidCheckpointError(path, "trainer state needs a non-negative integer 'step'")
    return state


def read_model_state(directory: str | Path, filename: str = MODEL_FILE) -> dict[str, torch.Tensor]:
    path = Path(directory) / filename
    if not path.is_file():
        raise InvalidCheckpointError(path, "file missing")
    return read_tensors(path)


def strict_model_state(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor], source: str,
                       tied: bool) -> dict[str, torch.Tensor]:
    """`state` restricted to what is stored, after checking it against the model's (plain) key ->
    shape map: any missing or unexpected key or wrong shape is a `CheckpointError` naming them.
    The fixed latent position table is never stored; a tied head is the embedding."""
    skip = {POS_EMBED_KEY} | ({LM_HEAD_KEY} if tied else set())
    want = {k: s for k, s in expected.items() if k not in skip}
    have = {k: v for k, v in state.items() if k not in skip}
    problems = key_problems(want, {k: tuple(v.shape) for k, v in have.items()})
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    return have


def key_problems(expected: Mapping[str, tuple[int, ...]], stored: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What keeps `stored` (key -> shape) from being exactly `expected`: missing keys, unexpected
    keys and shape mismatches, each as one phrase naming the first few (empty when they fit)."""
    problems = []
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    wrong = [f"{k} (checkpoint {tuple(stored[k])}, model {tuple(expected[k])})"
             for k in sorted(set(expected) & set(stored)) if tuple(stored[k]) != tuple(expected[k])]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_preview(wrong)}")
    return problems


def load_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load a full state dict into an unsharded model (wrapped layers included)."""
    actual = {plain_name(k): k for k in model.state_dict()}
    shapes = {plain_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    checked = strict_model_state(shapes, state, source, _tied(model))
    result = model.load_state_dict({actual[k]: v for k, v in checked.items()}, strict=False)
    left = {plain_name(k) for k in result.missing_keys} - {POS_EMBED_KEY, LM_HEAD_KEY}
    if left or result.unexpected_keys:  # the check above makes this unreachable unless the model lies
        raise CheckpointError(f"{source}: keys not loaded: {_preview(sorted(left | set(result.unexpected_keys)))}")


def _tied(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(config is not None and config.text.tie_word_embeddings)


def _preview(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------- optimizer
def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with parameter names in place of positions (unsharded models;
    for FSDP use torch's `get_optimizer_state_dict(..., full_state_dict=True)`, the same layout)."""
    names = {id(p): plain_name(n) for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    index_name: dict[int, str] = {}
    groups = []
    for group, saved in zip(optimizer.param_groups, sd["param_groups"]):
        for p, index in zip(group["params"], saved["params"]):
            if id(p) not in names:
                raise CheckpointError("the optimizer holds a parameter the model does not have")
            index_name[index] = names[id(p)]
        groups.append({**saved, "params": [index_name[i] for i in saved["params"]]})
    return {"state": {index_name[i]: dict(s) for i, s in sd["state"].items()}, "param_groups": groups}


def write_optimizer_state(directory: Path, named: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for name, entry in named["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                values.setdefault(name, {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in named["param_groups"]]
    tmp = directory / (OPTIMIZER_TENSORS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": OPTIMIZER_FORMAT})
    tmp.replace(directory / OPTIMIZER_TENSORS)
    _write_json(directory / OPTIMIZER_JSON, {"format": OPTIMIZER_FORMAT, "param_groups": groups, "state": values})


def _json_scalar_or_list(value: Any) -> bool:
    if isinstance(value, list):
        return all(_json_scalar_or_list(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def read_optimizer_state(directory: str | Path) -> dict[str, Any]:
    """The name-keyed optimizer state of a checkpoint; `InvalidCheckpointError` naming the file for
    anything but the layout `write_optimizer_state` writes."""
    directory = Path(directory)
    path = directory / OPTIMIZER_JSON
    meta = _read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != OPTIMIZER_FORMAT:
        raise InvalidCheckpointError(path, f"not a {OPTIMIZER_FORMAT} file")
    groups, values = meta.get("param_groups"), meta.get("state", {})
    if not isinstance(groups, list) or not isinstance(values, dict):
        raise InvalidCheckpointError(path, "needs 'param_groups' (list) and 'state' (object)")
    names: set[str] = set()
    for i, g in enumerate(groups):
        params = g.get("params") if isinstance(g, dict) else None
        if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
            raise InvalidCheckpointError(path, f"param group {i} needs 'params': a list of parameter names")
        bad = [k for k, v in g.items() if k != "params" and not _json_scalar_or_list(v)]
        if bad:
            raise InvalidCheckpointError(path, f"param group {i}: unsupported value(s) for {', '.join(bad)}")
        names |= set(params)
    state: dict[str, dict[str, Any]] = {}
    for name, entry in values.items():
        if not isinstance(entry, dict) or not all(_json_scalar_or_list(v) for v in entry.values()):
            raise InvalidCheckpointError(path, f"state of {name!r} must map keys to plain values")
        state[name] = dict(entry)
    tensor_path = directory / OPTIMIZER_TENSORS
    if not tensor_path.is_file():
        raise InvalidCheckpointError(tensor_path, "file missing")
    check_safetensors_header(tensor_path)
    for key, tensor in read_tensors(tensor_path).items():
        name, sep, sub = key.rpartition("/")
        if not sep or not name or not sub:
            raise InvalidCheckpointError(tensor_path, f"tensor {key!r} is not '<parameter>/<state key>'")
        state.setdefault(name, {})[sub] = tensor
    stray = sorted(set(state) - names)
    if stray:
        raise InvalidCheckpointError(path, f"state for parameters in no param group: {_preview(stray)}")
    return {"state": state, "param_groups": groups}


def check_optimizer_state(named: Mapping[str, Any], groups: list[list[str]], shapes: Mapping[str, tuple[int, ...]],
                          source: str) -> None:
    """Strict: the same number of param groups holding the same parameter names, and every
    non-scalar state tensor shaped like its parameter; the error names what differs."""
    saved = named["param_groups"]
    if len(saved) != len(groups):
        raise CheckpointError(f"{source}: {len(saved)} optimizer param group(s), the trainer has {len(groups)}")
    problems = []
    for i, (have, want) in enumerate(zip(saved, groups)):
        missing, unexpected = sorted(set(want) - set(have["params"])), sorted(set(have["params"]) - set(want))
        if missing:
            problems.append(f"group {i}: {len(missing)} missing parameter(s): {_preview(missing)}")
        if unexpected:
            problems.append(f"group {i}: {len(unexpected)} unexpected parameter(s): {_preview(unexpected)}")
    wrong = [f"{name}/{key} {tuple(v.shape)} (parameter {tuple(shapes[name])})"
             for name, entry in named["state"].items() if name in shapes
             for key, v in entry.items() if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) != tuple(shapes[name])]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_preview(wrong)}")
    if problems:
        raise CheckpointError(f"{source}: optimizer state does not fit the trainer: " + "; ".join(problems))


def optimizer_groups_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): plain_name(n) for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def load_optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                 named: Mapping[str, Any], source: str) -> None:
    """Strictly load a name-keyed optimizer state into the optimizer of an unsharded model."""
    groups = optimizer_groups_by_name(model, optimizer)
    shapes = {plain_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    check_optimizer_state(named, groups, shapes, source)
    index = {name: i for i, name in enumerate(n for g in groups for n in g)}
    sd = {"state": {index[n]: dict(s) for n, s in named["state"].items()},
          "param_groups": [{**saved, "params": [index[n] for n in want]}
                           for saved, want in zip(named["param_groups"], groups)]}
    optimizer.load_state_dict(sd)


# ---------------------------------------------------------------------------------------- one call
def restore(directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
            weights: str = MODEL_FILE, verified: bool = False) -> dict[str, Any]:
    """Verify `directory` (unless the caller just did), load the model strictly and, when given,
    the optimizer by parameter name; returns the trainer state (`step`, ...). Unsharded models."""
    directory = Path(directory)
    if not verified:
        verify(directory)
    load_model_state(model, read_model_state(directory, weights), str(directory / weights))
    if optimizer is not None:
        load_optimizer_state_by_name(model, optimizer, read_optimizer_state(directory), str(directory / OPTIMIZER_JSON))
    return read_trainer_state(directory)


def verify_if_managed(directory: str | Path) -> None:
    """A directory written by `save` (it has a manifest, or a `trainer_state.json` without one: a
    write that never finished) must verify before its weights are used; other Lance directories
    (plain `save_pretrained` output, the released checkpoints) have neither and are read as they are."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file() or (directory / TRAINER_STATE).is_file():
        verify(directory)

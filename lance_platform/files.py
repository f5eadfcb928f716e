"""Small file helpers shared by the stages."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path in `path`'s directory (made if needed) to write the file to: renamed onto
    `path` when the block ends, removed if it raises, so a reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (`atomic_target`)."""
    with atomic_target(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, value: Any, sort_keys: bool = False) -> Path:
    """Write `value` as indented JSON (non-JSON values as their `str`) to `path` atomically."""
    return write_text_atomic(path, json.dumps(value, indent=2, sort_keys=sort_keys, default=str) + "\n")

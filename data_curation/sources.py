"""Sources: list the items of a corpus cheaply on the driver, fetch their bytes later in Ray workers.

Listing yields one `SourceItem` per training sample: its `source_uri` (the ledger key), a
`fingerprint` (size + mtime of the files involved, or a hash of the generator spec) that tells a
refresh whether it has seen the item, its task, and a JSON `locator` saying how to read it.
Fetching turns a locator into `Fetched` media bytes and raw text bytes (kept as bytes so a
non-UTF-8 caption is quarantined by validation, not lost in a reader).

Source kinds (DATA.md §1): `folder` (media files with a JSONL/CSV table of captions, or sidecar
`.txt`), `webdataset` (tar members grouped by key), `parquet` (the official Lance layouts t2i, t2v,
i2i, v2v, i2t, v2t) and `synthetic`. Paths are local paths or URIs of any pyarrow filesystem, or of
any fsspec filesystem through pyarrow's fsspec handler, so object storage works like local disk.

`sample_id` is the content hash of the media bytes and text, so the same sample under two URIs is
an exact duplicate and a refresh never curates it twice.

Nothing one item does stops a listing: a problem found while listing becomes an item with an
`error` locator (quarantined with its reason when fetched), next to the good items. Reasons found
here: `caption_table_not_utf8` / `caption_table_bad_json` / `bad_caption_record` (one line of the
caption table, by line number; the other lines are kept), `unknown_task` (a `task` outside the shard
tasks, e.g. a typo "T2I"), `missing_file` (listed in the caption table, absent on disk),
`symlink_outside_source` (a symlink under a local source root that resolves outside it, unless the
source sets `follow_external_symlinks: true`) and `unreadable_tar`. While fetching, a Parquet cell of
the wrong type is `wrong_column_type` (the detail names the column and its type).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_curation.config import SourceConfig
from data_curation.media import TEXT_FIELDS, Fetched, MediaError, media_kind
from lance_platform.schema import SHARD_TASKS

UNDERSTANDING_TASKS = ("i2t", "v2t")
CAPTION_FILE_EXTENSIONS = (".txt", ".json", ".jsonl", ".csv", ".parquet")
# Official Lance Parquet layouts: column -> (slot, media kind) and text columns -> our text fields.
PARQUET_MEDIA = {
    "t2i": {"image_bytes": ("target", "image")},
    "t2v": {"video_bytes": ("target", "video")},
    "i2i": {"input_image_bytes": ("source", "image"), "output_image_bytes": ("target", "image")},
    "v2v": {"input_video_bytes": ("source", "video"), "output_video_bytes": ("target", "video")},
    "i2t": {"image_bytes": ("source", "image")},
    "v2t": {"video_bytes": ("source", "video")},
}
PARQUET_TEXT = {"caption": "caption", "caption_i": "caption", "caption_q": "question", "caption_a": "answer"}
# Text columns a layout must have (a file of another layout fails at listing, not row by row).
PARQUET_REQUIRED_TEXT = {"i2t": ("caption_q", "caption_a"), "v2t": ("caption_q", "caption_a")}


log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A source cannot be listed at all (missing path, unreadable caption table): a config problem."""


def main_slot(task: str) -> str:
    """The slot that holds an item's visual: understanding tasks read a `source`, the rest make a `target`."""
    return "source" if task in UNDERSTANDING_TASKS else "target"


@dataclass
class SourceItem:
    source_uri: str
    fingerprint: str
    task: str
    locator: str  # JSON


# ---------------------------------------------------------------------------------------- filesystems
def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path, a pyarrow URI (file://, s3://, gs://, hdfs://) or any
    fsspec URI (memory://, az://, ...)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), posixpath.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _join(uri: str, rel: str) -> str:
    return uri.rstrip("/") + "/" + rel


def read_bytes(uri: str, offset: int = 0, size: int | None = None) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        if size is None:
            return f.read()
        return f.read_at(size, offset)


def _file_infos(uri: str) -> dict[str, pafs.FileInfo]:
    """Relative path -> FileInfo of every file under the directory `uri`."""
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise SourceError(f"source directory not found: {uri}")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {posixpath.relpath(i.path, root): i for i in infos if i.type == pafs.FileType.File}


def external_links(uri: str, rels) -> dict[str, str]:
    """{relative path: resolved target} of the files under the local directory `uri` that resolve
    (through a symlinked file or directory) to somewhere outside it; {} for remote filesystems."""
    fs, root = filesystem(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        return {}
    real_root = os.path.realpath(root)
    out = {}
    for rel in rels:
        real = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([real_root, real]) != real_root:
            out[rel] = real
    return out


def _outside_detail(uri: str, rel: str, target: str) -> str:
    return f"{rel} resolves to {target}, outside the source root {uri} (set follow_external_symlinks: true to read it)"


def _container_files(uri: str, extension: str,
                     follow_external_symlinks: bool = False) -> list[tuple[str, pafs.FileInfo, str | None]]:
    """(uri, FileInfo, external target) of `uri` itself if it is a file, else of its files ending in
    `extension`; the target is where a symlink leads outside the directory (None when it does not)."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [(uri, info, None)]
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"source path not found: {uri}")
    infos = {rel: i for rel, i in sorted(_file_infos(uri).items()) if rel.endswith(extension)}
    if not infos:
        raise SourceError(f"source {uri}: no {extension} files")
    external = {} if follow_external_symlinks else external_links(uri, infos)
    return [(_join(uri, rel), i, external.get(rel)) for rel, i in infos.items()]


def _stamp(info: pafs.FileInfo) -> str:
    return f"{info.size}:{info.mtime_ns}"


def _fingerprint(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _item(uri: str, task: str, locator: dict, *stamp: object) -> SourceItem:
    return SourceItem(uri, _fingerprint(*stamp, locator), task, json.dumps(locator, sort_keys=True))


def _error_item(uri: str, reason: str, detail: str, *stamp: object, task: str = "t2i") -> SourceItem:
    """An item found unusable at listing: quarantined with `reason` when the inspect stage fetches it."""
    return _item(uri, task, {"kind": "error", "reason": reason, "detail": detail}, *stamp)


# ---------------------------------------------------------------------------------------- folder
@dataclass
class CaptionTable:
    """A folder's caption table: path -> record (and its line number), and the lines that could not
    be used: (line number, reason, detail, digest of the raw line)."""

    records: dict[str, dict]
    lines: dict[str, int]
    bad: list[tuple[int, str, str, str]]


def _digest(raw: bytes) -> str:
    return hashlib.sha1(raw).hexdigest()


def _jsonl_rows(uri: str, raw: bytes) -> tuple[list[tuple[int, object]], list[tuple[int, str, str, str]]]:
    rows, bad = [], []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
            line = line[3:]
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError as exc:
            bad.append((number, "caption_table_not_utf8", f"{uri} line {number} is not UTF-8 ({exc})", _digest(line)))
        except json.JSONDecodeError as exc:
            bad.append((number, "caption_table_bad_json", f"{uri} line {number} is not JSON ({exc})", _digest(line)))
    return rows, bad


def _csv_rows(uri: str, raw: bytes) -> tuple[list[tuple[int, object]], list[tuple[int, str, str, str]]]:
    """CSV records by line number; bytes that are not UTF-8 survive decoding as lone surrogates, so
    only the records holding them are refused."""
    rows, bad = [], []
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8-sig", errors="surrogateescape"), newline=""))
    for record in reader:
        number = reader.line_num
        values = [v for v in record.values() if isinstance(v, str)]
        try:
            for v in values:
                v.encode("utf-8")
        except UnicodeEncodeError:
            text = ",".join(values).encode("utf-8", errors="surrogateescape")
            bad.append((number, "caption_table_not_utf8", f"{uri} record ending on line {number} is not UTF-8",
                        _digest(text)))
            continue
        rows.append((number, record))
    return rows, bad


def _record_problem(rec: object) -> str | None:
    if not isinstance(rec, dict):
        return f"a record must be an object, got {type(rec).__name__}"
    if not isinstance(rec.get("path"), str) or not rec["path"]:
        return "a record needs a non-empty `path` string"
    for key in ("task", "source_path"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            return f"`{key}` must be a string, got {type(rec[key]).__name__}"
    return None


def _caption_table(uri: str) -> CaptionTable:
    """The records of a JSONL or CSV table with at least `path` and `caption` columns. A line that is
    not UTF-8, not JSON or not a usable record is set aside with its line number; the rest are kept."""
    try:
        raw = read_bytes(uri)
    except FileNotFoundError:
        raise SourceError(f"caption table not found: {uri}") from None
    rows, bad = (_csv_rows if uri.endswith(".csv") else _jsonl_rows)(uri, raw)
    records, lines = {}, {}
    for number, rec in rows:
        problem = _record_problem(rec)
        if problem:
            bad.append((number, "bad_caption_record", f"{uri} line {number}: {problem}: {rec!r}"[:500],
                        _fingerprint(rec)))
            continue
        records[rec["path"]] = rec
        lines[rec["path"]] = number
    if bad:
        log.warning("caption table %s: %d unusable line(s), e.g. %s", uri, len(bad), bad[0][2])
    return CaptionTable(records, lines, sorted(bad))


def list_folder(src: SourceConfig) -> Iterator[SourceItem]:
    files = _file_infos(src.uri)
    external = {} if src.follow_external_symlinks else external_links(src.uri, files)
    table_uri = _join(src.uri, src.captions) if src.captions else None
    table = _caption_table(table_uri) if table_uri else CaptionTable({}, {}, [])
    for number, reason, detail, digest in table.bad:
        yield _error_item(f"{table_uri}#line={number}", reason, detail, digest)
    records = table.records
    for rel in sorted(set(records) - set(files)):
        yield _error_item(_join(src.uri, rel), "missing_file",
                          f"{src.captions} line {table.lines[rel]} lists {rel!r}, which does not exist under {src.uri}",
                          records[rel], task=_task_or_default(records[rel].get("task")))
    paired_sources = {r["source_path"] for r in records.values() if r.get("source_path")}
    for rel in sorted(files):
        if rel.lower().endswith(CAPTION_FILE_EXTENSIONS) or rel in paired_sources:
            continue
        uri = _join(src.uri, rel)
        kind = media_kind(rel)
        rec = records.get(rel, {})
        task = rec.get("task") or ("t2v" if kind == "video" else "t2i")
        if task not in SHARD_TASKS:
            yield _error_item(uri, "unknown_task", f"{src.captions} line {table.lines.get(rel)}: task {task!r} of "
                              f"{rel!r} is not one of {list(SHARD_TASKS)}", _stamp(files[rel]), rec)
            continue
        media = {main_slot(task): [uri, kind]}
        stamps = [_stamp(files[rel])]
        used = [rel]
        if rec.get("source_path"):
            src_rel = rec["source_path"]
            if src_rel not in files:
                yield _error_item(uri, "missing_file", f"{src.captions} line {table.lines[rel]}: source_path "
                                  f"{src_rel!r} of {rel!r} does not exist under {src.uri}", _stamp(files[rel]), rec,
                                  task=task)
                continue
            media["source"] = [_join(src.uri, src_rel), media_kind(src_rel)]
            stamps.append(_stamp(files[src_rel]))
            used.append(src_rel)
        text = {name: rec.get(name) for name in TEXT_FIELDS}
        sidecar = posixpath.splitext(rel)[0] + ".txt"
        text_files = {}
        if text["caption"] is None and sidecar in files:
            text_files["caption"] = [_join(src.uri, sidecar), 0, None]
            stamps.append(_stamp(files[sidecar]))
            used.append(sidecar)
        outside = [r for r in used if r in external]
        if outside:
            yield _error_item(uri, "symlink_outside_source",
                              "; ".join(_outside_detail(src.uri, r, external[r]) for r in outside), *stamps, task=task)
            continue
        locator = {"kind": "files", "media": media, "text": text, "text_files": text_files}
        yield _item(uri, task, locator, *stamps)


def _task_or_default(task: str | None) -> str:
    return task if task in SHARD_TASKS else "t2i"


# ---------------------------------------------------------------------------------------- webdataset
def _tar_groups(uri: str) -> tuple[dict[str, dict[str, tarfile.TarInfo]], str | None]:
    """key -> {extension: member} of one tar (WebDataset: key = member path up to its first dot),
    and the error that stopped the reading (None when the whole tar was read). A truncated or corrupt
    tar keeps the groups read before the damage, minus any group with a member cut off by it."""
    fs, path = filesystem(uri)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    error = None
    with fs.open_input_file(path) as f:
        size = f.size()
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    directory, base = posixpath.split(member.name)
                    stem, _, ext = base.partition(".")
                    groups.setdefault(posixpath.join(directory, stem), {})["." + ext.lower()] = member
        except tarfile.TarError as exc:
            error = f"{type(exc).__name__}: {exc}"
    cut = sorted(k for k, ms in groups.items() if any(m.offset_data + m.size > size for m in ms.values()))
    if cut:
        error = error or "tar ends inside a member"
        error += f"; incomplete sample(s) {cut} left out"
        groups = {k: ms for k, ms in groups.items() if k not in cut}
    return groups, error


def list_webdataset(src: SourceConfig) -> Iterator[SourceItem]:
    """One item per sample key: its first media member (sorted by extension), `.txt` as the caption
    and `.json` ({caption, question, answer}) as metadata; a `.txt` caption wins over a JSON one.
    A key without a media member or a caption is quarantined by validation; a damaged tar yields an
    `unreadable_tar` item (quarantined with the error) next to the samples read before the damage."""
    for tar_uri, info, outside in _container_files(src.uri, ".tar", src.follow_external_symlinks):
        if outside is not None:
            yield _error_item(tar_uri, "symlink_outside_source", _outside_detail(src.uri, tar_uri, outside),
                              _stamp(info))
            continue
        groups, error = _tar_groups(tar_uri)
        if error is not None:
            locator = {"kind": "error", "reason": "unreadable_tar", "detail": f"{tar_uri}: {error}"}
            yield _item(tar_uri, "t2i", locator, _stamp(info))
        for key, members in sorted(groups.items()):
            media_ext = next((e for e in sorted(members) if media_kind(e)), None)
            kind = media_kind(media_ext) if media_ext else None
            media = {}
            if media_ext:
                member = members[media_ext]
                media["target"] = [tar_uri, kind, member.offset_data, member.size]
            text_files = {name: [tar_uri, members[ext].offset_data, members[ext].size]
                          for name, ext in (("caption", ".txt"), ("json", ".json")) if ext in members}
            locator = {"kind": "files", "media": media, "text": {}, "text_files": text_files}
            yield _item(f"{tar_uri}#{key}", "t2v" if kind == "video" else "t2i", locator, _stamp(info), key)


# ---------------------------------------------------------------------------------------- parquet
def list_parquet(src: SourceConfig) -> Iterator[SourceItem]:
    needed = set(PARQUET_MEDIA[src.layout]) | set(PARQUET_REQUIRED_TEXT.get(src.layout, ("caption",)))
    for file_uri, info, outside in _container_files(src.uri, ".parquet", src.follow_external_symlinks):
        if outside is not None:
            yield _error_item(file_uri, "symlink_outside_source", _outside_detail(src.uri, file_uri, outside),
                              _stamp(info), task=src.layout)
            continue
        fs, path = filesystem(file_uri)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        columns = meta.schema.to_arrow_schema().names  # top-level (an HF Image column is a struct)
        missing = needed - set(columns)
        if missing:
            raise SourceError(f"{file_uri}: layout {src.layout!r} needs columns {sorted(missing)}; "
                              f"the file has {columns}")
        for group in range(meta.num_row_groups):
            for row in range(meta.row_group(group).num_rows):
                locator = {"kind": "parquet", "uri": file_uri, "layout": src.layout, "row_group": group, "row": row}
                yield _item(f"{file_uri}#rg={group}&row={row}", src.layout, locator, _stamp(info))


# ---------------------------------------------------------------------------------------- synthetic
def list_synthetic(src: SourceConfig) -> Iterator[SourceItem]:
    from data_curation.synthetic import synthetic_specs

    spec = asdict(src.synthetic)
    for item in synthetic_specs(src.synthetic):
        locator = {"kind": "synthetic", "spec": spec, "item": item}
        yield _item(f"synthetic://{src.name}/{item['kind']}/{item['index']}", item["task"], locator)


LISTERS = {"folder": list_folder, "webdataset": list_webdataset, "parquet": list_parquet,
           "synthetic": list_synthetic}


def list_source(src: SourceConfig) -> list[SourceItem]:
    return list(LISTERS[src.kind](src))


# ---------------------------------------------------------------------------------------- fetching
def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _media_cell(value: object, column: str, arrow_type: object) -> bytes:
    """A Parquet media cell: raw bytes or an HF `Image`/`Video` struct {bytes, path}; anything else
    is a `wrong_column_type` MediaError naming the column and its type."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    raise MediaError("wrong_column_type", f"column {column!r} is {arrow_type} (this row: {type(value).__name__} "
                                          f"{_short(value)}); expected binary or an {{bytes, path}} struct")


def _text_cell(value: object, column: str, arrow_type: object) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise MediaError("wrong_column_type", f"column {column!r} is {arrow_type} (this row: {type(value).__name__} "
                                          f"{_short(value)}); expected a string")


class Fetcher:
    """Reads items; keeps the last Parquet row group, since items of a file arrive in order."""

    def __init__(self) -> None:
        self._group_key: tuple[str, int] | None = None
        self._group: list[dict] = []
        self._types: dict[str, object] = {}

    def fetch(self, item: dict) -> Fetched:
        locator = json.loads(item["locator"])
        kind = locator["kind"]
        if kind == "synthetic":
            from data_curation.synthetic import render_item

            return render_item(locator["spec"], locator["item"])
        if kind == "parquet":
            return self._fetch_parquet(locator)
        if kind == "error":  # found unusable at listing: quarantined with its reason
            raise MediaError(locator["reason"], locator["detail"])
        return self._fetch_files(locator)

    def _fetch_files(self, locator: dict) -> Fetched:
        media = {}
        for slot, (uri, media_type, *span) in locator["media"].items():
            media[slot] = (read_bytes(uri, *span), media_type)
        text = {name: (v.encode("utf-8") if isinstance(v, str) else None)
                for name, v in locator["text"].items()}
        # JSON metadata first, so an explicit caption file (`.txt`) wins over its `caption`
        for name, (uri, offset, size) in sorted(locator["text_files"].items(), key=lambda kv: kv[0] != "json"):
            raw = read_bytes(uri, offset, size)
            if name == "json":
                text.update(_json_text(raw))
            else:
                text[name] = raw
        return Fetched(media, {name: text.get(name) for name in TEXT_FIELDS})

    def _fetch_parquet(self, locator: dict) -> Fetched:
        key = (locator["uri"], locator["row_group"])
        if key != self._group_key:
            self._group_key, self._group, self._types = None, [], {}
            fs, path = filesystem(locator["uri"])
            try:
                with fs.open_input_file(path) as f:
                    table = pq.ParquetFile(f).read_row_group(locator["row_group"])
            except (OSError, pa.ArrowException) as exc:
                raise MediaError("unreadable_parquet", f"{locator['uri']} row group {locator['row_group']}: "
                                                       f"{exc}"[:500]) from None
            self._group, self._types = table.to_pylist(), {f.name: f.type for f in table.schema}
            self._group_key = key
        row = self._group[locator["row"]]
        media = {slot: (_media_cell(row[col], col, self._types.get(col)), kind)
                 for col, (slot, kind) in PARQUET_MEDIA[locator["layout"]].items()}
        text: dict[str, bytes | None] = dict.fromkeys(TEXT_FIELDS)
        for col, name in PARQUET_TEXT.items():
            if row.get(col) is not None:
                text[name] = _text_cell(row[col], col, self._types.get(col))
        return Fetched(media, text)


def _json_text(raw: bytes) -> dict[str, bytes | None]:
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MediaError("bad_metadata", f"sidecar JSON is unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise MediaError("bad_metadata", f"sidecar JSON is a {type(meta).__name__}, expected an object")
    return {name: str(meta[name]).encode("utf-8") for name in TEXT_FIELDS if meta.get(name) is not None}

"""A text source opened as shards: the units WindowStream orders per epoch and reads row by row.

  FileShard     one local JSONL / JSONL.gz file; row i = i-th non-blank line
  TableShard    HF_SHARD_ROWS consecutive rows of a map-style `datasets.Dataset`
  StreamShard   one file shard of a streamed `datasets.IterableDataset`

Every shard has iter_rows(start) -> (row, "where", dict) and count_rows() (None when unknown).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

from trainkit.config import ConfigError
from trainkit.data_sources import JSONL_SUFFIXES, iter_jsonl_rows, load_hf, manifest_rows, resolve_local_files
from trainkit.fileio import JsonlError, count_jsonl_rows
from trainkit.text_documents import TOKENIZE_BATCH

HF_SHARD_ROWS = 1000      # map-style HF datasets: shuffled blocks of this many consecutive rows


@dataclass
class TextSource:
    """Where the text comes from. `key` names the config key in error messages."""

    path: str
    split: str = "train"
    name: str | None = None
    text_field: str | None = "text"
    streaming: bool = False
    cache_dir: str | None = None
    local_files_only: bool = False
    key: str = "data_path"

    @classmethod
    def from_any(cls, source) -> "TextSource":
        if isinstance(source, TextSource):
            return source
        if isinstance(source, (str, os.PathLike)):
            return cls(path=str(source))
        if not isinstance(source, dict):
            raise TypeError(f"source must be a path, a dict or a TextSource, got {type(source).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(source) - known)
        if unknown:
            raise ValueError(f"source: unknown keys {unknown} (known: {sorted(known)})")
        if not source.get("path"):
            raise ConfigError(f"{source.get('key', 'data_path')}: no data path given")
        values = {k: v for k, v in source.items() if v is not None or k in ("name", "text_field", "cache_dir")}
        values["path"] = str(values["path"])
        return cls(**values)


class FileShard:
    """Rows of one local JSONL / JSONL.gz file; row i = i-th non-blank line."""

    def __init__(self, path: Path, key: str, rows: int | None = None):
        self.path, self.key, self.rows = path, key, rows

    def iter_rows(self, start: int = 0) -> Iterator[tuple[int, str, dict]]:
        yield from iter_jsonl_rows(self.path, self.key, start)

    def count_rows(self) -> int:
        if self.rows is None:
            try:
                self.rows = count_jsonl_rows(self.path)
            except JsonlError as e:
                raise ConfigError(f"{self.key}: {e}") from None
        return self.rows


class TableShard:
    """Rows [lo, hi) of a map-style `datasets.Dataset`."""

    def __init__(self, ds, lo: int, hi: int, shown: str):
        self.ds, self.lo, self.hi, self.shown, self.rows = ds, lo, hi, shown, hi - lo

    def iter_rows(self, start: int = 0):
        for a in range(self.lo + start, self.hi, TOKENIZE_BATCH):
            batch = self.ds[a:min(a + TOKENIZE_BATCH, self.hi)]
            names = list(batch)
            for i, values in enumerate(zip(*(batch[n] for n in names))):
                yield a + i - self.lo, f"{self.shown} row {a + i}", dict(zip(names, values))

    def count_rows(self) -> int:
        return self.rows


class StreamShard:
    """One file shard of a streamed `datasets.IterableDataset` (rows unknown until read)."""

    def __init__(self, ds, shown: str):
        self.ds, self.shown, self.rows = ds, shown, None

    def iter_rows(self, start: int = 0):
        for i, row in enumerate(self.ds.skip(start) if start else self.ds, start):
            yield i, f"{self.shown} row {i}", row

    def count_rows(self):
        return None


def open_shards(src: TextSource) -> tuple[list, int | None]:
    """The source's shards in canonical order, and its total row count when known up front."""
    files = resolve_local_files(src.path, src.key)
    if files is not None and all(p.name.endswith(JSONL_SUFFIXES) for p in files):
        rows = manifest_rows(src.path)
        return [FileShard(p, src.key, rows.get(p)) for p in files], None
    ds = load_hf(src.path, split=src.split, name=src.name, streaming=src.streaming, cache_dir=src.cache_dir,
                 local_files_only=src.local_files_only, data_files=files, key=src.key)
    shown = src.path if files is None else str(src.path)
    import datasets

    if isinstance(ds, datasets.Dataset):
        n = len(ds)
        return [TableShard(ds, lo, min(n, lo + HF_SHARD_ROWS), shown) for lo in range(0, n, HF_SHARD_ROWS)], n
    n_shards = ds.num_shards
    shards = [StreamShard(ds, shown)] if n_shards <= 1 else [
        StreamShard(ds.shard(num_shards=n_shards, index=i, contiguous=True), f"{shown} (shard {i})") for i in range(n_shards)]
    total = None
    try:
        info = ds.info.splits[src.split.split("[")[0]] if ds.info and ds.info.splits else None
        total = int(info.num_examples) if info is not None and info.num_examples else None
    except (KeyError, TypeError, AttributeError):
        total = None
    return shards, total

"""Write (a subset of) a dataset as gzip JSONL shards + manifest.json, the local source WindowStream reads fastest.

Command line: scripts/make_shards.py.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

from trainkit.config import ConfigError
from trainkit.data_sources import MANIFEST, load_hf, resolve_local_files
from trainkit.fileio import atomic_file, write_bytes_atomic
from trainkit.text_documents import eos_id, render_row, tokenize_documents
from trainkit.text_shards import FileShard


def _write_shard(path: Path, rows: list[dict]) -> int:
    """gzip JSONL written to a temp file, then renamed (fileio.atomic_file): a shard exists whole or not at all.
    mtime 0 and no file name in the header: the same rows give the same bytes."""
    with atomic_file(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            for row in rows:
                gz.write((json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
    return path.stat().st_size


def write_shards(source: str, out_dir, *, split: str = "train", name: str | None = None,
                 text_field: str | None = "text", max_rows: int | None = None, max_tokens: int | None = None,
                 tokenizer=None, rows_per_shard: int = 10000, streaming: bool = True, cache_dir: str | None = None,
                 local_files_only: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Write (a subset of) a dataset as out_dir/shard-00000.jsonl.gz ... + manifest.json; returns the manifest.

    source: an HF datasets id, or local .jsonl / .jsonl.gz / .json / .parquet / .csv / .txt files
    (a file, a directory or a glob), all read through `datasets.load_dataset`.
    text_field: rows are written as {"text": row[text_field]}; None writes rows whole (chat
    `messages`, `prompt`/`response` rows for stage 2). Stops after max_rows rows, or once
    max_tokens tokens (documents + eos, counted with `tokenizer`) are written.
    Each shard is written to a temp file and renamed; the manifest is rewritten (atomically) after
    each shard with "complete": false, and "complete": true at the end, so an interrupted run
    leaves whole shards and a manifest that lists exactly those.
    """
    from tqdm.auto import tqdm

    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if max_tokens is not None and tokenizer is None:
        raise ValueError("max_tokens needs a tokenizer to count tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # temp files (fileio.temp_path) of an interrupted run too: ".shard-00001.jsonl.gz.tmp<pid>-<thread>"
    old = sorted(out.glob("shard-*.jsonl.gz")) + sorted(out.glob(".shard-*.jsonl.gz.tmp*")) + \
        [p for p in (out / MANIFEST,) if p.exists()] + sorted(out.glob(f".{MANIFEST}.tmp*"))
    if old and not overwrite:
        raise ValueError(f"{out} already holds shards or a manifest ({old[0].name}); pass overwrite=True (--overwrite)")
    for p in old:
        p.unlink()

    files = resolve_local_files(str(source), key="source")
    ds = load_hf(str(source), split=split, name=name, streaming=streaming, cache_dir=cache_dir,
                 local_files_only=local_files_only, data_files=files, key="source")
    eos = None
    if max_tokens is not None:
        eos = eos_id(tokenizer, "tokenizer")
    import datasets

    known = len(ds) if isinstance(ds, datasets.Dataset) else None
    manifest: dict[str, Any] = {
        "source": str(source), "name": name, "split": split, "text_field": text_field,
        "format": "jsonl.gz", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "complete": False,
        "rows": 0, "tokens": 0 if max_tokens is not None else None, "max_rows": max_rows, "max_tokens": max_tokens,
        "rows_per_shard": rows_per_shard, "shards": [],
    }

    def flush(rows: list[dict]) -> None:
        path = out / f"shard-{len(manifest['shards']):05d}.jsonl.gz"
        size = _write_shard(path, rows)
        manifest["shards"].append({"file": path.name, "rows": len(rows), "bytes": size})
        manifest["rows"] += len(rows)
        write_bytes_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())

    bounds = [x for x in (max_rows, known) if x is not None]
    total = min(bounds) if bounds else None
    bar = tqdm(total=total, unit="row", desc=f"shards {out.name}", disable=not progress, dynamic_ncols=True)
    rows: list[dict] = []
    n_rows = n_tokens = 0
    try:
        for i, row in enumerate(ds):
            if max_rows is not None and n_rows >= max_rows:
                break
            if max_tokens is not None and n_tokens >= max_tokens:
                break
            if text_field is not None:
                value = row.get(text_field)
                if not isinstance(value, str):
                    got = "no" if value is None else f"a {type(value).__name__} in the"
                    raise ConfigError(f"source: {source} row {i} has {got} `{text_field}` field "
                                      f"(fields: {', '.join(sorted(row)) or 'none'})")
                row = {"text": value}
            if max_tokens is not None:
                text = row["text"] if text_field is not None else render_row(row, tokenizer, None, f"{source} row {i}", "source")
                n_tokens += len(tokenize_documents([text], tokenizer, eos)[0])
            rows.append(row)
            n_rows += 1
            bar.update(1)
            if len(rows) >= rows_per_shard:
                flush(rows)
                rows = []
        if rows:
            flush(rows)
    finally:
        bar.close()
    if n_rows == 0:
        raise ConfigError(f"source: {source} (split {split!r}) has no rows")
    manifest["tokens"] = n_tokens if max_tokens is not None else None
    manifest["complete"] = True
    write_bytes_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def read_shard_rows(path) -> list[dict]:
    """All rows of the shards of `path` (file, directory or glob), in order (for checks and tests)."""
    files = resolve_local_files(str(path)) or []
    return [row for p in files for _, _, row in FileShard(p, "data_path").iter_rows()]
